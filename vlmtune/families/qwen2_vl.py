"""Qwen2-VL."""

from vlmtune.families.base import Family

# Grounding: coordinates normalised to 0-1000 of the original width and height, in
# <|box_start|>(x1,y1),(x2,y2)<|box_end|> text. Sources: Qwen's qwen-vl-finetune/tools/process_bbox.ipynb
# ("Qwen2-VL using the relative coordinated with range 0-1000", convert_to_qwen2vl_format: round(x / w * 1000));
# QwenLM/Qwen3-VL issue #866, maintainer: "Qwen2-VL (using coordinates normalized between [0,1000])".
QWEN2_VL = Family(
    model_type="qwen2_vl",
    model_class="Qwen2VLForConditionalGeneration",
    processor_class="Qwen2VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    video_processor_class="Qwen2VLVideoProcessor",
    liger_patch="apply_liger_kernel_to_qwen2_vl",
    box_format="norm1000",
)
