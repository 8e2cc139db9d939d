"""Qwen3.5-MoE (Qwen3.5-35B-A3B, 122B-A10B, 397B-A17B): Qwen3.5's hybrid layers with a sparse-MoE MLP.

Every MLP is ``Qwen3_5MoeSparseMoeBlock``: a top-k router ``mlp.gate``, fused experts
``mlp.experts.gate_up_proj`` / ``down_proj`` (saved to disk split per expert and re-fused on load), and a shared
expert whose output is scaled by ``sigmoid(mlp.shared_expert_gate(x))``.
"""

from vlmtune.families.base import THINK_TOKENS, Family

QWEN3_5_MOE = Family(
    model_type="qwen3_5_moe",
    model_class="Qwen3_5MoeForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    video_processor_class="Qwen3VLVideoProcessor",
    liger_patch="apply_liger_kernel_to_qwen3_5_moe",
    box_format="norm1000",  # Qwen3-VL's convention (qwen3_vl.py): Qwen3.5 inherits its vision stack and processor
    patch_size=16,
    video_timestamps=True,
    experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    routers=("mlp.gate", "mlp.shared_expert_gate"),
    extra_tokens=THINK_TOKENS,
)
