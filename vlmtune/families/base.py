"""The ``Family`` record and the chat-template pieces the Qwen-VL generations share."""

from __future__ import annotations

from dataclasses import dataclass

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
    box_format: str
    """How the family's checkpoints write grounding coordinates (a ``vlmtune.data.boxes.FORMATS`` name):
    ``pixel_resized`` (absolute pixels of the image after resizing) or ``norm1000`` (0-1000 of width and
    height). Each family file names its source."""
    patch_size: int = 14
    video_timestamps: bool = False
    """Qwen3-VL writes ``<t seconds>`` text before each frame group of a video."""
    vision: str = "model.visual"
    mergers: tuple[str, ...] = ("model.visual.merger",)
    language_model: str = "model.language_model"
    lm_head: str = "lm_head"

    @property
    def factor(self) -> int:
        """Pixel side that image sizes are rounded to: patch size times the 2x2 spatial merge."""
        return self.patch_size * 2

    def model_cls(self):
        import transformers

        return getattr(transformers, self.model_class)
