"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, 235B-A22B): Qwen3-VL's vision side and template, a sparse-MoE language model.

Every decoder layer's MLP is ``Qwen3VLMoeTextSparseMoeBlock``: a top-k router ``mlp.gate`` (weight [E, H]) and the
experts as two fused parameters ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]
in memory; the hub checkpoints store both transposed ([E, H, 2I], [E, I, H]), and so does vlmtune.
"""

from dataclasses import replace

from vlmtune.families.base import THINK_TOKENS
from vlmtune.families.qwen3_vl import QWEN3_VL

QWEN3_VL_MOE = replace(
    QWEN3_VL,  # the same vision stack (DeepStack mergers), processor and grounding convention; MoE MLPs
    model_type="qwen3_vl_moe",
    model_class="Qwen3VLMoeForConditionalGeneration",
    liger_patch="apply_liger_kernel_to_qwen3_vl_moe",
    experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    hub_transposed=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    routers=("mlp.gate",),
    extra_tokens=THINK_TOKENS,
)
