"""Qwen3-VL: patch 16, DeepStack mergers, interleaved M-RoPE and text timestamps for video frames."""

from vlmtune.families.base import TINY_TEXT_CONFIG, Family, chatml_template

QWEN3_VL = Family(
    model_type="qwen3_vl",
    model_class="Qwen3VLForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    video_processor_class="Qwen3VLVideoProcessor",
    liger_patch="apply_liger_kernel_to_qwen3_vl",
    chat_template=chatml_template(None),
    patch_size=16,
    video_timestamps=True,
    mergers=("model.visual.merger", "model.visual.deepstack_merger_list"),
    tiny_config={
        "text_config": {
            **TINY_TEXT_CONFIG,
            "head_dim": 16,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": 64,
            "patch_size": 16,
            "deepstack_visual_indexes": [0],
            "num_position_embeddings": 64,
        },
    },
)
