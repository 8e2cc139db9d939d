"""Qwen2.5-VL: Qwen2-VL plus window attention in the vision tower and absolute time in M-RoPE."""

from vlmtune.families.base import Family

QWEN2_5_VL = Family(
    model_type="qwen2_5_vl",
    model_class="Qwen2_5_VLForConditionalGeneration",
    processor_class="Qwen2_5_VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    video_processor_class="Qwen2VLVideoProcessor",
    liger_patch="apply_liger_kernel_to_qwen2_5_vl",
)
