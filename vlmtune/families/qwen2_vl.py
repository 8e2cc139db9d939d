"""Qwen2-VL."""

from vlmtune.families.base import TINY_TEXT_CONFIG, Family, chatml_template

QWEN2_VL = Family(
    model_type="qwen2_vl",
    model_class="Qwen2VLForConditionalGeneration",
    processor_class="Qwen2VLProcessor",
    image_processor_class="Qwen2VLImageProcessor",
    video_processor_class="Qwen2VLVideoProcessor",
    liger_patch="apply_liger_kernel_to_qwen2_vl",
    chat_template=chatml_template("You are a helpful assistant."),
    tiny_config={
        "text_config": TINY_TEXT_CONFIG,
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2},
    },
)
