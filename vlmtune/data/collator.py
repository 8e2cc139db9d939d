"""Batching: pad the token sequences on the right and concatenate the vision tensors in order.

Under DeepSpeed ZeRO-3 (and DDP) every rank must run the same modules in the same order, or the collective
that gathers their weights waits forever. A batch with no image (or no video) therefore gets a *filler*: one
minimal image (video) whose tokens sit after the last row's text with attention mask 0 and label -100. The
model's own forward runs the vision tower on it, so every rank calls it once per modality, and the result
cannot reach the loss.
"""

from __future__ import annotations

import torch
from PIL import Image

from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.families.base import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

SEQUENCE_KEYS = {"input_ids": None, "labels": IGNORE_INDEX, "attention_mask": 0, "mm_token_type_ids": 0}
"""Per-token keys and their padding value (``None``: the tokenizer's pad id)."""
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
MODALITY_KEY = {"image": "pixel_values", "video": "pixel_values_videos"}


def vision_fillers(processor, factor: int) -> dict[str, dict[str, torch.Tensor]]:
    """The smallest image and video the processor takes, encoded as inert items (mask 0, label -100)."""
    image = Image.new("RGB", (factor, factor))
    video = torch.zeros(2, 3, factor, factor)
    fillers = {}
    for kind, pad, media in (("image", IMAGE_PAD, {"images": [image]}),
                             ("video", VIDEO_PAD, {"videos": [video], "video_metadata": [
                                 {"fps": 2.0, "frames_indices": [0, 1], "total_num_frames": 2}]})):
        enc = processor(text=[VISION_START + pad + VISION_END], do_resize=False, do_sample_frames=False,
                        return_tensors="pt", **media)
        item = {k: (v[0] if k in SEQUENCE_KEYS else v) for k, v in enc.items()}
        item["attention_mask"] = torch.zeros_like(item["input_ids"])
        item["labels"] = torch.full_like(item["input_ids"], IGNORE_INDEX)
        if "second_per_grid_ts" in item:
            item["second_per_grid_ts"] = torch.as_tensor(item["second_per_grid_ts"], dtype=torch.float32)
        fillers[kind] = item
    return fillers


class Collator:
    """Items -> batch. Mixed batches (text-only, image, video, both) are fine.

    The one batch-assembly core: a batch is a list of rows, each row a list of items whose per-token tensors are
    joined (``join``), padded on the right to the longest row, with every item's vision tensors concatenated in
    order. Here each row is one item; ``packing.PackedCollator`` puts several records in a row.

    ``fillers`` (from ``vision_fillers``): add an inert image / video to batches that lack one, so the vision
    tower runs on every rank for every batch (needed for ZeRO-3 and DDP with a trainable vision part).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None,
                 fillers: dict[str, dict[str, torch.Tensor]] | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.fillers = fillers or {}

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return self.assemble([[item] for item in items])

    def join(self, row: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The per-token tensors of one row: its items' tensors, concatenated."""
        return {key: torch.cat([it[key] for it in row]) for key in SEQUENCE_KEYS if key in row[0]}

    def assemble(self, rows: list[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        rows = [list(row) for row in rows]
        for kind, filler in self.fillers.items():
            if not any(MODALITY_KEY[kind] in it for row in rows for it in row):
                rows[-1].append(filler)  # after the last row's own tokens: mask 0, label -100
        joined = [self.join(row) for row in rows]
        longest = max(len(r["input_ids"]) for r in joined)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {key: _pad([r[key] for r in joined], longest, self.pad_token_id if value is None else value)
                 for key, value in SEQUENCE_KEYS.items() if key in joined[0]}
        if "position_ids" in joined[0]:  # (4, n) per row -> (4, B, L); the padding is a segment of its own
            batch["position_ids"] = torch.stack([
                torch.cat([r["position_ids"], torch.arange(longest - r["position_ids"].shape[1]).expand(4, -1)], 1)
                for r in joined], dim=1)
        items = [it for row in rows for it in row]
        for key in VISION_KEYS:
            parts = [it[key] for it in items if key in it]
            if parts:
                batch[key] = torch.cat(parts)
        return batch


def _pad(rows: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(row, (0, length - len(row)), value=value) for row in rows])
