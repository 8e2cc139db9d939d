"""Qwen2.5-VL: Qwen2-VL plus window attention in the vision tower and absolute time in M-RoPE."""

from vlmtune.families.base import Family

# Grounding: absolute pixel coordinates on the image as the processor resized it (JSON "bbox_2d" /
# "point_2d"). Sources: Qwen's qwen-vl-finetune/tools/process_bbox.ipynb ("Qwen2.5-VL using the absolute
# coordinated for the resized image", convert_to_qwen25vl_format scales by smart_resize's size); QwenLM/Qwen3-VL
# issue #676, maintainer: "absolute coordinates based on the actual input size of the image ... the size after
# processer"; issue #1161 (translated): ground-truth boxes must be resized with the image, "because we use
# absolute coordinates".
QWEN2_5_VL = Family(
    model_type="qwen2_5_vl",
    model_class="Qwen2_5_VLForConditionalGeneration",
    processor_class="Qwen2_5_VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    video_processor_class="Qwen2VLVideoProcessor",
    liger_patch="apply_liger_kernel_to_qwen2_5_vl",
    box_format="pixel_resized",
)
