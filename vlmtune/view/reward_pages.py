"""GRPO's reward settings on the page: those a GRPO data view is given (the GRPO stage's own flags, declared once in
``GRPOArguments``) and, per prompt, what each reward function will be called with; a GRPO run's, from its
``vlmtune_run.json``. The calls' arguments come from ``Reward.kwargs``: what training passes, not a second reading
of the record."""

from __future__ import annotations

from vlmtune.rewards import Reward
from vlmtune.stage_config import REWARD_FIELDS


def reward_settings(values: dict) -> dict:
    """The reward settings among ``GRPOArguments``' fields (``values``: the parsed flags, or a run's ``"grpo"``
    entry): each reward function with its weight (1 when no ``--reward_weights``), the reward model with its, and
    the other settings that shape a completion's reward (``REWARD_FIELDS``)."""
    funcs = list(values.get("reward_funcs") or [])
    weights = values.get("reward_weights") or [1.0] * len(funcs)
    out = {"functions": [{"name": name, "weight": float(weight)} for name, weight in zip(funcs, weights)],
           "reward_model": None,
           "settings": {k: values[k] for k in REWARD_FIELDS if k in values and not k.startswith("reward_")}}
    if values.get("reward_model"):
        out["reward_model"] = {"name": values["reward_model"], "weight": float(values.get("reward_model_weight", 1.0))}
    return out


def prompt_rewards(rewards: list[Reward], settings: dict, record) -> dict:
    """How one prompt will be scored: each reward function, its weight, the record fields it reads and the keyword
    arguments training calls it with for this record (a field it reads that the record lacks is one of the record's
    problems: ``DataView`` checks them with ``rewards.check_fields``, as ``vlmtune grpo`` does)."""
    call = {"fields": record.fields, "id": record.id}  # the record as the trainer hands it to Reward.kwargs
    functions = [{"name": reward.name, "weight": reward.weight, "reads": list(reward.fields),
                  "kwargs": reward.kwargs(call)} for reward in rewards]
    return {**settings, "functions": functions}
