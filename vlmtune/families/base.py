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
"""Text that opens every assistant turn in the ChatML templates of every family."""


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
    experts: tuple[str, ...] = ()
    """Name suffixes of the fused MoE expert weights: ``nn.Parameter`` stacks of all experts (not ``nn.Linear``),
    which LoRA reaches through PEFT's ``target_parameters``. Empty for dense models."""
    hub_transposed: tuple[str, ...] = ()
    """Name suffixes of the expert weights that the family's hub checkpoints store transposed (Qwen3-VL-MoE:
    ``[E, H, 2I]`` / ``[E, I, H]``, where transformers keeps ``[E, 2I, H]`` / ``[E, H, I]`` in memory and writes
    that). vlmtune writes model folders in the hub's layout (``vlmtune.model.hub_layout``): the one vLLM reads, and
    the only one transformers loads under ZeRO-3."""
    routers: tuple[str, ...] = ()
    """Name suffixes of the modules that route tokens between experts (the top-k router; Qwen3.5-MoE's
    shared-expert gate too): frozen unless ``--train_router``."""
    extra_tokens: tuple[str, ...] = ()
    """Added (not special) tokens of the real tokenizer that the family's chat template writes."""

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)

    @property
    def factor(self) -> int:
        """Pixel side that image sizes are rounded to: patch size times the 2x2 spatial merge."""
        return self.patch_size * 2

    def model_cls(self):
        import transformers

        return getattr(transformers, self.model_class)


THINK_TOKENS = ("<think>", "</think>")
"""Qwen3's reasoning delimiters: added (not special) tokens of the Qwen3-VL and Qwen3.5 tokenizers."""
LINEAR_ATTENTION_KERNELS = (("fla", "flash-linear-attention"), ("causal_conv1d", "causal-conv1d"))
"""(module, PyPI name) of the CUDA kernels transformers uses for Gated DeltaNet layers when they import."""
