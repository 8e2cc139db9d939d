"""Qwen3-VL: patch 16, DeepStack mergers, interleaved M-RoPE and text timestamps for video frames."""

from vlmtune.families.base import Family

QWEN3_VL = Family(
    model_type="qwen3_vl",
    model_class="Qwen3VLForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    video_processor_class="Qwen3VLVideoProcessor",
    liger_patch="apply_liger_kernel_to_qwen3_vl",
    patch_size=16,
    video_timestamps=True,
    mergers=("model.visual.merger", "model.visual.deepstack_merger_list"),
)
