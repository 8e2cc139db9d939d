"""Qwen2-VL."""

from vlmtune.families.base import Family

QWEN2_VL = Family(
    model_type="qwen2_vl",
    model_class="Qwen2VLForConditionalGeneration",
    processor_class="Qwen2VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    video_processor_class="Qwen2VLVideoProcessor",
    liger_patch="apply_liger_kernel_to_qwen2_vl",
)
