"""Qwen3.5 (dense): natively multimodal, Qwen3-VL's processor, a hybrid language model.

Three of every four decoder layers mix tokens with linear attention (Gated DeltaNet, ``linear_attn``: a
causal depthwise convolution and a recurrent state), the fourth with gated full attention (``self_attn``);
``text_config.layer_types`` says which. No DeepStack mergers. Its chat template thinks (``<think>``).
"""

from vlmtune.families.base import THINK_TOKENS, Family

QWEN3_5 = Family(
    model_type="qwen3_5",
    model_class="Qwen3_5ForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    video_processor_class="Qwen3VLVideoProcessor",
    liger_patch="apply_liger_kernel_to_qwen3_5",
    box_format="norm1000",  # Qwen3-VL's convention (qwen3_vl.py): Qwen3.5 inherits its vision stack and processor
    patch_size=16,
    video_timestamps=True,
    extra_tokens=THINK_TOKENS,
)
