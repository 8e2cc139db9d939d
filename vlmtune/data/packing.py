"""Packing: several records in one row, with no attention across records and M-RoPE restarted per record.

The data half (the model half, which readies a loaded model and refuses what cannot be exact, is
``vlmtune.model.packing``), used by ``stages/sft.py`` when ``--packing`` is on:

* ``pack_indices``: greedy first-fit decreasing over the lengths the dataset already knows (text + vision tokens,
  no media decoded), then the same number of packs evened out, so every pack holds at most ``max_seq_length``
  tokens and packs batched together need little padding.
* ``PackedDataset``: a pack of records is one dataset item (a list of the wrapped dataset's items); its
  ``lengths`` are the packs' lengths, so ``--group_by_length`` still applies to packs.
* ``PackedCollator``: concatenates each pack's records into one row. Each record's 3-D M-RoPE positions come
  from the model class's own ``get_rope_index`` run on that record alone, exactly as an unpacked forward
  computes them, and the batch carries ``position_ids`` of shape ``(4, B, L)``: row 0 holds plain text
  positions restarting at 0 for every record, rows 1-3 the M-RoPE positions.

How attention stays inside a record (transformers >= 5, Qwen2-VL / Qwen2.5-VL / Qwen3-VL): the language model
splits the 4-row ``position_ids`` into text positions and M-RoPE positions and, when no 2-D ``attention_mask`` is
given, derives the sequence boundaries from where the text positions restart.

* sdpa / eager / flex: ``create_causal_mask`` turns those boundaries into a block-diagonal causal mask (exact).
  Rows of a batch are padded to the longest; the padding is a segment of its own (positions 0..n) with label
  -100, so it attends only to itself and never reaches the loss.
* flash_attention_2 / 3: the batch is flattened into one row with no padding at all (padding-free); flash-attn's
  varlen kernel gets the boundaries from the restarting positions. Flash-attn only does this for a batch of one
  row, so the collator never gives it more than one.

The first label of every record is set to -100, so the last token of one record is never trained to predict the
first token of the next: the same labelled tokens as running each record alone.

Refused: models with linear-attention layers (Qwen3.5, Qwen3.5-MoE). Their Gated DeltaNet layers run a causal
convolution and a recurrent state along the whole row, and transformers 5.22 restarts neither where the text
positions restart; it only can with flash-linear-attention and causal-conv1d given ``cu_seq_lens`` and ``seq_idx``
(CUDA), which this packer does not produce. A packed record would see the previous one through that state.
"""

from __future__ import annotations

import heapq
import sys

import torch
from torch.utils.data import Dataset

from vlmtune.data.collator import Collator
from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.errors import ConfigError


def pack_indices(lengths: list[int], capacity: int) -> list[list[int]]:
    """Record indices grouped into packs of at most ``capacity`` tokens: as few packs as greedy first-fit finds,
    then as even as possible.

    1. First-fit decreasing fixes the number of packs ``k``: records longest first, each into the first pack with
       room (a max segment tree over the packs' free room finds it in O(log n)).
    2. The same records are dealt again, longest first, each to the least-filled of ``k`` packs (LPT). Packs of
       equal length matter because a batch of packs is padded to its longest row; first-fit alone leaves one
       nearly empty remainder pack that pads every batch it lands in. If a record does not fit any of the ``k``
       packs this way, the first-fit packs are kept.

    Within a pack, indices are in dataset order. Deterministic.
    """
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"{len(too_long)} record(s) longer than the pack capacity {capacity} (e.g. item {i}: "
                         f"{n} tokens); the dataset's max_seq_length filter should have skipped them")
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    first_fit = _first_fit(order, lengths, capacity)
    balanced = _least_filled(order, lengths, capacity, len(first_fit))
    return [sorted(p) for p in (balanced or first_fit)]


def _first_fit(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    size = 1
    while size < max(len(order), 1):
        size *= 2
    room = [0] * (2 * size)  # leaves: free room of pack k (capacity once opened; unopened packs look full)
    packs: list[list[int]] = []
    for i in order:
        need = lengths[i]
        if room[1] >= need:  # the leftmost open pack with room
            node = 1
            while node < size:
                node = 2 * node if room[2 * node] >= need else 2 * node + 1
            k = node - size
        else:  # open a new pack
            k = len(packs)
            packs.append([])
            node = size + k
            room[node] = capacity
        packs[k].append(i)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return packs


def _least_filled(order: list[int], lengths: list[int], capacity: int, k: int) -> list[list[int]] | None:
    heap = [(0, j) for j in range(k)]
    packs: list[list[int]] = [[] for _ in range(k)]
    for i in order:
        load, j = heapq.heappop(heap)
        if load + lengths[i] > capacity:
            return None
        packs[j].append(i)
        heapq.heappush(heap, (load + lengths[i], j))
    return packs


class PackedDataset(Dataset):
    """Packs of a dataset's items: item ``i`` is the list of items of pack ``i``.

    ``lengths`` (tokens per pack) lets a length-grouped sampler batch packs of similar size.
    """

    def __init__(self, dataset, max_seq_length: int):
        self.dataset = dataset
        self.max_seq_length = max_seq_length
        self.packs = pack_indices(list(dataset.lengths), max_seq_length)
        self.lengths = [sum(dataset.lengths[i] for i in pack) for pack in self.packs]

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        return [self.dataset[j] for j in self.packs[i]]

    def fill_fraction(self) -> float:
        """Share of the packs' capacity that holds tokens."""
        return sum(self.lengths) / max(len(self.packs) * self.max_seq_length, 1)


def _base_model_class(config):
    """The family's ``*Model`` class (the one that owns ``get_rope_index``), from the config's family."""
    from vlmtune.families import family_for

    cls = family_for(config).model_cls()
    base = getattr(sys.modules[cls.__module__], cls.__name__.replace("ForConditionalGeneration", "Model"), None)
    if base is None or not hasattr(base, "get_rope_index"):
        raise ConfigError(f"packing needs {cls.__name__}'s get_rope_index (M-RoPE positions); this transformers "
                          "version does not have it where expected")
    return base


class RopeIndex:
    """One record's 3-D M-RoPE positions, by the model class's own ``get_rope_index`` (no model instance needed).

    The method reads only ``self.config`` and ``self.get_vision_position_ids``, which this object provides, so
    positions are exactly those an unpacked forward of the same record computes.
    """

    def __init__(self, config):
        self.config = config
        self._base = _base_model_class(config)

    def get_vision_position_ids(self, *args, **kwargs):
        return self._base.get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, item: dict[str, torch.Tensor]) -> torch.Tensor:
        """(3, n) positions of one dataset item (``input_ids`` of shape (n,))."""
        extra = {"second_per_grid_ts": item["second_per_grid_ts"]} if "second_per_grid_ts" in item else {}
        positions, _ = self._base.get_rope_index(
            self,
            input_ids=item["input_ids"][None],
            mm_token_type_ids=item["mm_token_type_ids"][None],
            image_grid_thw=item.get("image_grid_thw"),
            video_grid_thw=item.get("video_grid_thw"),
            attention_mask=None,
            **extra,
        )
        return positions[:, 0]


class PackedCollator(Collator):
    """Packs -> batch: ``input_ids``, ``labels``, ``mm_token_type_ids``, ``position_ids`` (4, B, L), vision tensors.

    No ``attention_mask``: record boundaries are carried by the restarting text positions (see the module doc).
    ``padding_free``: all packs of the batch in one row, for flash-attn varlen. ``fillers`` (``vision_fillers``):
    an inert image / video appended as a segment of its own when the batch has none (ZeRO-3 / DDP).
    """

    def __init__(self, pad_token_id: int, rope_index: RopeIndex, padding_free: bool = False,
                 fillers: dict[str, dict[str, torch.Tensor]] | None = None):
        super().__init__(pad_token_id, fillers=fillers)
        self.rope_index = rope_index
        self.padding_free = padding_free

    def __call__(self, packs: list) -> dict[str, torch.Tensor]:
        rows = [list(p) if isinstance(p, (list, tuple)) else [p] for p in packs]
        if self.padding_free:
            rows = [[it for row in rows for it in row]]
        return self.assemble(rows)

    def join(self, row: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labels = []
        for item in row:
            label = item["labels"].clone()
            label[0] = IGNORE_INDEX  # the previous record's last token must not learn to predict this one
            labels.append(label)
        positions = [torch.cat([torch.arange(len(it["input_ids"]))[None], self.rope_index(it).to(torch.long)])
                     for it in row]
        return {"input_ids": torch.cat([it["input_ids"] for it in row]), "labels": torch.cat(labels),
                "mm_token_type_ids": torch.cat([it["mm_token_type_ids"] for it in row]),
                "position_ids": torch.cat(positions, dim=1)}


def padding_fraction(batch: dict[str, torch.Tensor], pad_token_id: int) -> float:
    """Share of the batch's token slots that are padding."""
    return 1.0 - count_tokens(batch, pad_token_id) / batch["input_ids"].numel()


def count_tokens(batch: dict[str, torch.Tensor], pad_token_id: int | None) -> int:
    """Real (non-padding) tokens in a batch, padded (2-D ``attention_mask``) or packed (trailing pad run per row)."""
    return int(_real_tokens(batch, pad_token_id).sum())


def count_samples(batch: dict[str, torch.Tensor], pad_token_id: int | None) -> int:
    """Records in a batch: rows of a padded batch, records (segments other than padding) of a packed one."""
    positions = batch.get("position_ids")
    if positions is None or positions.ndim != 3 or positions.shape[0] != 4:
        return int(batch["input_ids"].shape[0])
    return int((positions[0].eq(0) & _real_tokens(batch, pad_token_id)).sum())


def _real_tokens(batch: dict[str, torch.Tensor], pad_token_id: int | None) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        return mask.bool()
    ids = batch["input_ids"]
    if pad_token_id is None:
        return torch.ones_like(ids, dtype=torch.bool)
    trailing = ids.eq(pad_token_id).flip(-1).long().cumprod(-1).flip(-1).bool()
    return ~trailing
