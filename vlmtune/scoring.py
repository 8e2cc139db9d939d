"""A trained reward model as a reward (``vlmtune grpo --reward_model``, ``vlmtune sample --reward_model``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vlmtune import run
from vlmtune.generation import on_model
from vlmtune.model import reward
from vlmtune.model.compat import check_compatible
from vlmtune.model.load import load_family

logger = logging.getLogger(__name__)


def load_reward_model(path: str, processor, family, device, flag: str = "--reward_model") -> nn.Module:
    """The reward model in ``path`` (a `vlmtune reward-model` output, a checkpoint of one, or its merged folder):
    body and head, eval mode, no gradients, on ``device``; checked to read the run's ids and pixels."""
    if reward.is_seq_cls_folder(path):  # a merged Qwen3.5 reward model, in transformers' layout (model/reward.py)
        model = reward.load_seq_cls(path).to(device)
        saved = run.read_run(path) if Path(path, run.RUN_FILE).is_file() else None
        check_compatible(processor, family, run.load_run_processor(saved, path), load_family(path), f"{flag} {path}")
        logger.info("reward model: %s (%s)", path, type(model).__name__)
        return model.requires_grad_(False)
    loaded = run.load_for_inference(path, device=str(device))
    reward.load_head(loaded.model, path)
    check_compatible(processor, family, loaded.processor, loaded.family, f"{flag} {path}")
    model = loaded.model.eval().requires_grad_(False)
    logger.info("reward model: %s", loaded.source)
    return model


@torch.no_grad()
def score_rows(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows,) rewards of prompt + reply rows (no padding after a row's tokens but the collator's): the head at each
    row's last real token, as the reward model was trained (the reply's end-of-turn token)."""
    mask = batch["attention_mask"]
    positions = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    return reward.sequence_rewards(model, on_model(batch, model), positions).cpu()
