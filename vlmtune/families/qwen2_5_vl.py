"""Qwen2.5-VL: Qwen2-VL plus window attention in the vision tower and absolute time in M-RoPE."""

from vlmtune.families.base import TINY_TEXT_CONFIG, Family, chatml_template

QWEN2_5_VL = Family(
    model_type="qwen2_5_vl",
    model_class="Qwen2_5_VLForConditionalGeneration",
    processor_class="Qwen2_5_VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    video_processor_class="Qwen2VLVideoProcessor",
    liger_patch="apply_liger_kernel_to_qwen2_5_vl",
    chat_template=chatml_template("You are a helpful assistant."),
    uses_second_per_grid_ts=True,
    tiny_config={
        "text_config": TINY_TEXT_CONFIG,
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
            "window_size": 56,
        },
    },
)
