"""The 3-D rotary positions of GRPO's rows, computed once per prompt.

A Qwen-VL forward given no ``position_ids`` computes M-RoPE positions for every row of the batch with the model's
``get_rope_index``, a Python loop over each row's text and vision spans: for GRPO's ``num_generations`` rows of a
prompt, the same prompt's positions ``num_generations`` times, at every forward (old policy, reference, policy).
``row_positions`` computes each prompt's positions once, with the same ``get_rope_index``, and gives each row its
prompt's positions followed by its completion's. A completion is text after the prompt's last token (text: the
generation prompt), and M-RoPE numbers a text span on from the position before it, one by one, in all three
axes; padding keeps position 0, as ``get_rope_index`` leaves it.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmtune.stages import vision_once


def row_positions(model: nn.Module, prompts: list[dict], completions: list[list[torch.Tensor]],
                  batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(3, rows, length) positions of ``batch``: each prompt followed by each of its completions (``completions``
    per prompt, in order), padded on the right; None where the model would not compute 3-D positions itself (no
    image or video in the batch, no ``mm_token_type_ids``, or no ``get_rope_index``): its forward then does as
    before."""
    if (batch.get("image_grid_thw") is None and batch.get("video_grid_thw") is None) or (
            "mm_token_type_ids" not in batch):
        return None
    rope_index = getattr(getattr(vision_once.backbone(model), "model", None), "get_rope_index", None)
    if rope_index is None:
        return None
    ids = batch["input_ids"]
    positions = torch.zeros(3, *ids.shape, dtype=ids.dtype, device=ids.device)
    row = 0
    for prompt, group in zip(prompts, completions):
        own, _ = rope_index(input_ids=prompt["input_ids"][None], mm_token_type_ids=prompt["mm_token_type_ids"][None],
                            image_grid_thw=prompt.get("image_grid_thw"), video_grid_thw=prompt.get("video_grid_thw"),
                            second_per_grid_ts=prompt.get("second_per_grid_ts"), attention_mask=None)
        own = own[:, 0].to(ids.device)
        n = own.shape[1]
        for completion in group:
            positions[:, row, :n] = own
            positions[:, row, n:n + len(completion)] = own[:, -1:] + torch.arange(
                1, len(completion) + 1, device=ids.device)
            row += 1
    return positions
