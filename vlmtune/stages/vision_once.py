"""The vision tower once per distinct image or video of a batch.

DPO's chosen and rejected rows carry the same prompt media, and GRPO's ``num_generations`` completions of a prompt
carry its media once per row: a plain forward runs the vision tower on every copy. ``encoder_outputs`` finds the
copies (same grid, same pixels), runs the tower on each distinct item once, and lays its features out for every
copy, as the model's ``mm_encoder_outputs`` argument (transformers 5.22, every Qwen-VL family). The forward then
places those features exactly where it would place the tower's own, so the log-probs are the plain forward's; in
a run where the tower trains, each copy's gradient flows back into the one tower call, summed as the copies' would
be.

Not under FSDP: its sharded parameters are gathered by the wrapped model's own forward, which a direct call of the
tower would bypass; FSDP runs keep the plain forward.
"""

from __future__ import annotations

import torch
from torch import nn

MODALITIES = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


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


def _backbone(model: nn.Module) -> nn.Module | None:
    """The transformers model inside DeepSpeed / DDP and PEFT wrappers; None under FSDP."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        if type(model).__name__ == "FullyShardedDataParallel":
            return None
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in base.modules()):
        return None
    return base


def encoder_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict | None:
    """``mm_encoder_outputs`` for the batch with each distinct image and video encoded once, or None when no item
    repeats (or the model cannot take them): the plain forward is then the same work."""
    present = {m: keys for m, keys in MODALITIES.items() if batch.get(keys[0]) is not None}
    if not present:
        return None
    layouts = {m: distinct(batch[pix], batch[grid]) for m, (pix, grid) in present.items()}
    if all(len(firsts) == len(order) for firsts, order in layouts.values()):
        return None
    base = _backbone(model)
    if base is None or not hasattr(base, "get_image_features"):
        return None
    outputs = {}
    for modality, (pix, grid_key) in present.items():
        firsts, order = layouts[modality]
        grid = batch[grid_key]
        chunks = batch[pix].split(grid.prod(-1).tolist())
        encode = getattr(base, f"get_{modality}_features")
        out = encode(torch.cat([chunks[i] for i in firsts]), grid[firsts], return_dict=True)
        out.pooler_output = tuple(out.pooler_output[n] for n in order)
        if getattr(out, "deepstack_features", None) is not None:  # Qwen3-VL: per layer, per item
            out.deepstack_features = [tuple(layer[n] for n in order) for layer in out.deepstack_features]
        outputs[modality] = out
    return outputs


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor], keys) -> dict[str, torch.Tensor]:
    """The batch's ``keys`` for a forward of ``model``, the vision tower run once per distinct item: the pixels
    replaced by ``mm_encoder_outputs`` where an item repeats (the grids stay: the 3-D positions read them)."""
    inputs = {k: v for k, v in batch.items() if k in keys}
    shared = encoder_outputs(model, inputs)
    if shared is not None:
        for pix, _ in MODALITIES.values():
            inputs.pop(pix, None)
        inputs["mm_encoder_outputs"] = shared
    return inputs
