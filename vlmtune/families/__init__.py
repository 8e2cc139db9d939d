"""Per-family facts: everything that differs between the Qwen-VL generations (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE).

A new Qwen-VL generation is one small module here and one line in ``FAMILIES``.
The family is always read from the model's config (``model_type``), never from a path.
"""

from __future__ import annotations

from vlmtune.families.base import Family
from vlmtune.families.qwen2_5_vl import QWEN2_5_VL
from vlmtune.families.qwen2_vl import QWEN2_VL
from vlmtune.families.qwen3_5 import QWEN3_5
from vlmtune.families.qwen3_5_moe import QWEN3_5_MOE
from vlmtune.families.qwen3_vl import QWEN3_VL
from vlmtune.families.qwen3_vl_moe import QWEN3_VL_MOE

FAMILIES: dict[str, Family] = {
    f.model_type: f for f in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE, QWEN3_5, QWEN3_5_MOE)
}


def family_for(config) -> Family:
    """Return the family of a model config (a ``PreTrainedConfig`` or a dict with ``model_type``)."""
    model_type = config["model_type"] if isinstance(config, dict) else config.model_type
    try:
        return FAMILIES[model_type]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"model_type {model_type!r} is not a supported Qwen-VL family (supported: {known})") from None


__all__ = ["FAMILIES", "Family", "family_for"]
