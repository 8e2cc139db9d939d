"""Qwen3.5-MoE (Qwen3.5-35B-A3B, 122B-A10B, 397B-A17B): Qwen3.5's hybrid layers with a sparse-MoE MLP.

Every MLP is ``Qwen3_5MoeSparseMoeBlock``: a top-k router ``mlp.gate``, fused experts
``mlp.experts.gate_up_proj`` / ``down_proj`` (saved to disk split per expert and re-fused on load), and a shared
expert whose output is scaled by ``sigmoid(mlp.shared_expert_gate(x))``.
"""

from dataclasses import replace

from vlmtune.families.qwen3_5 import QWEN3_5

QWEN3_5_MOE = replace(
    QWEN3_5,  # the same vision stack, processor, template and hybrid layers; the MLPs are sparse MoE blocks
    model_type="qwen3_5_moe",
    model_class="Qwen3_5MoeForConditionalGeneration",
    liger_patch="apply_liger_kernel_to_qwen3_5_moe",
    experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    routers=("mlp.gate", "mlp.shared_expert_gate"),
)
