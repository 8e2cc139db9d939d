"""Batching: pad the token sequences on the right and concatenate the vision tensors in order."""

from __future__ import annotations

import torch

from vlmtune.data.conversation import IGNORE_INDEX

SEQUENCE_KEYS = {"input_ids": None, "labels": IGNORE_INDEX, "attention_mask": 0, "mm_token_type_ids": 0}
"""Per-token keys and their padding value (``None``: the tokenizer's pad id)."""
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


class Collator:
    """Items -> batch. Mixed batches (text-only, image, video, both) are fine."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {}
        for key, value in SEQUENCE_KEYS.items():
            if key not in items[0]:
                continue
            pad = self.pad_token_id if value is None else value
            rows = [torch.nn.functional.pad(it[key], (0, longest - len(it[key])), value=pad) for it in items]
            batch[key] = torch.stack(rows)
        for key in VISION_KEYS:
            parts = [it[key] for it in items if key in it]
            if parts:
                batch[key] = torch.cat(parts)
        return batch
