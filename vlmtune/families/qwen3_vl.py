"""Qwen3-VL: patch 16, DeepStack mergers, interleaved M-RoPE and text timestamps for video frames."""

from vlmtune.families.base import Family

# Grounding: relative coordinates 0-1000 (JSON "bbox_2d" / "point_2d"). Sources: QwenLM/Qwen3-VL README
# (cookbook 2d_grounding: "Using relative position coordinates"); issues #1486 and #1633, maintainer: for
# Qwen3-VL use the "Convert to Qwen2-VL training format" section of process_bbox.ipynb (round(x / w * 1000)).
QWEN3_VL = Family(
    model_type="qwen3_vl",
    model_class="Qwen3VLForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    video_processor_class="Qwen3VLVideoProcessor",
    liger_patch="apply_liger_kernel_to_qwen3_vl",
    box_format="norm1000",
    patch_size=16,
    video_timestamps=True,
    mergers=("model.visual.merger", "model.visual.deepstack_merger_list"),
)
