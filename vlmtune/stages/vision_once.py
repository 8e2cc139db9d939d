"""The vision tower once per distinct image or video of a batch, and (GRPO) once per rollout.

DPO's chosen and rejected rows carry the same prompt media, and GRPO's ``num_generations`` completions of a prompt
carry its media once per row: a plain forward runs the vision tower on every copy. ``encoder_outputs`` finds the
copies (same grid, same pixels), runs the tower on each distinct item once, and lays its features out for every
copy, as the model's ``mm_encoder_outputs`` argument (transformers 5.22, every Qwen-VL family). The forward then
places those features exactly where it would place the tower's own, so the log-probs are the plain forward's; in
a run where the tower trains, each copy's gradient flows back into the one tower call, summed as the copies' would
be.

``Encodings`` goes further where the tower is frozen (no tower parameter trains: ``lora``, ``full`` with the tower
frozen): GRPO samples, scores and trains on the same prompts' media within a step, so the tower's outputs of the
sampling call are kept and every later forward of the rollout (old policy, reference with adapters off, policy)
reads them instead of running the tower again. A frozen tower gives the same outputs at every one of those calls.

Not under FSDP: its sharded parameters are gathered by the wrapped model's own forward, which a direct call of the
tower would bypass; FSDP runs keep the plain forward. ``Encodings`` is also off under DeepSpeed ZeRO-3, whose
ranks must all call the tower in each forward (a rank with a cached batch would skip the gather the others wait
in).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

MODALITIES = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
ENCODINGS = "vision_encodings"
"""The batch key that carries a rollout's ``Encodings`` to its forwards."""


def distinct(pixels: torch.Tensor, grid: torch.Tensor) -> tuple[list[int], list[int]]:
    """(the position of each distinct item among the batch's items, and for each item the number of the distinct
    item it repeats): items are the batch's images (or videos) in order, ``grid`` rows of patches each."""
    sizes = grid.prod(-1).tolist()
    chunks = pixels.split(sizes)
    firsts: list[int] = []
    order: list[int] = []
    seen: dict[tuple, list[int]] = {}  # grid -> numbers of the distinct items with that grid
    for i, chunk in enumerate(chunks):
        same_grid = seen.setdefault(tuple(grid[i].tolist()), [])
        match = next((n for n in same_grid if torch.equal(chunks[firsts[n]], chunk)), None)
        if match is None:
            match = len(firsts)
            firsts.append(i)
            same_grid.append(match)
        order.append(match)
    return firsts, order


def backbone(model: nn.Module) -> nn.Module | None:
    """The transformers model inside DeepSpeed / DDP and PEFT wrappers; None under FSDP (which needs a process
    group: single-process runs skip the walk over every module)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        if type(model).__name__ == "FullyShardedDataParallel":
            return None
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in base.modules()):
            return None
    return base


class Encodings:
    """The vision tower's outputs of the items a rollout has encoded (per modality: grid, pixels, features), for
    the rollout's later forwards of the same model. ``for_model`` gives one only where the tower is frozen."""

    def __init__(self, base: nn.Module):
        self.base = base
        self.items: dict[str, list[tuple[tuple, torch.Tensor, torch.Tensor, list | None]]] = {}
        self.template: dict[str, object] = {}  # an output of the tower per modality, to lay features out in

    @classmethod
    def for_model(cls, model: nn.Module) -> Encodings | None:
        """An empty store for ``model``'s rollout, or None where its tower trains (or under FSDP / ZeRO-3)."""
        base = backbone(model)
        tower = getattr(getattr(base, "model", None), "visual", None)
        if tower is None or not hasattr(base, "get_image_features"):
            return None
        params = list(tower.parameters())
        if any(p.requires_grad or hasattr(p, "ds_id") for p in params):  # trains, or ZeRO-3 partitions it
            return None
        return cls(base)

    def find(self, modality: str, grid: tuple, pixels: torch.Tensor) -> int | None:
        """The number of the stored item with this grid and these pixels, or None."""
        return next((n for n, (g, p, _, _) in enumerate(self.items.get(modality, []))
                     if g == grid and torch.equal(p, pixels)), None)


def _encode(base: nn.Module, modality: str, chunks, grid: torch.Tensor, firsts: list[int],
            encodings: Encodings | None):
    """(output of the tower, features of each distinct item, DeepStack features of each or None): the items
    ``firsts`` encoded in one tower call, or read from ``encodings`` where it holds them all (new ones are
    encoded and stored)."""
    encode = getattr(base, f"get_{modality}_features")
    if encodings is None:
        out = encode(torch.cat([chunks[i] for i in firsts]), grid[firsts], return_dict=True)
        deep = getattr(out, "deepstack_features", None)
        return out, list(out.pooler_output), None if deep is None else [list(layer) for layer in deep]
    known = [encodings.find(modality, tuple(grid[i].tolist()), chunks[i]) for i in firsts]
    missing = [i for i, n in zip(firsts, known) if n is None]
    if missing:
        out = encode(torch.cat([chunks[i] for i in missing]), grid[missing], return_dict=True)
        deep = getattr(out, "deepstack_features", None)
        encodings.template.setdefault(modality, out)
        stored = encodings.items.setdefault(modality, [])
        for j, i in enumerate(missing):
            stored.append((tuple(grid[i].tolist()), chunks[i], out.pooler_output[j],
                           None if deep is None else [layer[j] for layer in deep]))
        known = [encodings.find(modality, tuple(grid[i].tolist()), chunks[i]) for i in firsts]
    entries = [encodings.items[modality][n] for n in known]
    deep = None if entries[0][3] is None else [[e[3][k] for e in entries] for k in range(len(entries[0][3]))]
    return copy.copy(encodings.template[modality]), [e[2] for e in entries], deep


def encoder_outputs(model: nn.Module, batch: dict[str, torch.Tensor],
                    encodings: Encodings | None = None) -> dict | None:
    """``mm_encoder_outputs`` for the batch with each distinct image and video encoded once (and, with
    ``encodings`` of this model, not at all where it holds them), or None when no item repeats and nothing is
    stored (or the model cannot take them): the plain forward is then the same work."""
    present = {m: keys for m, keys in MODALITIES.items() if batch.get(keys[0]) is not None}
    if not present:
        return None
    base = backbone(model)
    if encodings is not None and encodings.base is not base:
        encodings = None  # another model's (a reference copy): its own tower
    layouts = {m: distinct(batch[pix], batch[grid]) for m, (pix, grid) in present.items()}
    if encodings is None and all(len(firsts) == len(order) for firsts, order in layouts.values()):
        return None
    if base is None or not hasattr(base, "get_image_features"):
        return None
    outputs = {}
    for modality, (pix, grid_key) in present.items():
        firsts, order = layouts[modality]
        grid = batch[grid_key]
        chunks = batch[pix].split(grid.prod(-1).tolist())
        out, features, deep = _encode(base, modality, chunks, grid, firsts, encodings)
        out.pooler_output = tuple(features[n] for n in order)
        if deep is not None:  # Qwen3-VL: per layer, per item
            out.deepstack_features = [tuple(layer[n] for n in order) for layer in deep]
        outputs[modality] = out
    return outputs


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor], keys) -> dict[str, torch.Tensor]:
    """The batch's ``keys`` for a forward of ``model``, the vision tower run once per distinct item (none where the
    batch's ``ENCODINGS`` hold them): the pixels replaced by ``mm_encoder_outputs`` where an item repeats (the
    grids stay: the 3-D positions read them)."""
    inputs = {k: v for k, v in batch.items() if k in keys}
    shared = encoder_outputs(model, inputs, batch.get(ENCODINGS))
    if shared is not None:
        for pix, _ in MODALITIES.values():
            inputs.pop(pix, None)
        inputs["mm_encoder_outputs"] = shared
    return inputs
