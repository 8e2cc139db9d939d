"""The ``Family`` record and the chat-template pieces the Qwen-VL generations share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
"""The special tokens every Qwen-VL tokenizer has; the tiny tokenizer gets exactly these."""

ASSISTANT_HEADER = f"{IM_START}assistant\n"
"""Text that opens every assistant turn in the ChatML templates of all three families."""


TINY_TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
}
"""The tiny language model every family's embedded test model starts from (M-RoPE sections sum to head_dim/2)."""


def chatml_template(default_system: str | None) -> str:
    """A ChatML chat template in the Qwen-VL form (content as a string or a list of typed parts).

    Used for the embedded tiny model; real checkpoints bring their own template.
    """
    system = ""
    if default_system:
        system = (
            "{%- if messages[0]['role'] != 'system' -%}"
            "{{ '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}"
            "{%- endif -%}"
        )
    return (
        system + "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
        "{%- elif part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


@dataclass(frozen=True)
class Family:
    """What vlmtune needs to know about one Qwen-VL generation."""

    model_type: str
    model_class: str
    """Name of the ``transformers`` class for image-text-to-text generation."""
    processor_class: str
    image_processor_class: str
    video_processor_class: str
    liger_patch: str
    """Name of the liger-kernel function that patches this family."""
    chat_template: str
    tiny_config: dict[str, Any]
    """Config kwargs (without vocabulary and token ids) of the embedded tiny model."""
    patch_size: int = 14
    uses_second_per_grid_ts: bool = False
    video_timestamps: bool = False
    """Qwen3-VL writes ``<t seconds>`` text before each frame group of a video."""
    vision: str = "model.visual"
    mergers: tuple[str, ...] = ("model.visual.merger",)
    language_model: str = "model.language_model"
    lm_head: str = "lm_head"
    extra_forward_keys: tuple[str, ...] = field(default=("mm_token_type_ids",))

    @property
    def factor(self) -> int:
        """Pixel side that image sizes are rounded to: patch size times the 2x2 spatial merge."""
        return self.patch_size * 2

    def model_cls(self):
        import transformers

        return getattr(transformers, self.model_class)
