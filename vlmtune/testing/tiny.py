"""The embedded tiny Qwen-VL model: the real architecture at toy sizes, random weights, a real processor.

Nothing can be downloaded on CI, so tests, the quickstart and the benchmarks run on a model this module
builds: ``build_tiny_model(out_dir, family)`` writes a folder that ``from_pretrained`` loads offline.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from vlmtune import cache_root
from vlmtune.families import FAMILIES, Family
from vlmtune.families.base import SPECIAL_TOKENS
from vlmtune.model.hub_layout import write_hub_layout
from vlmtune.model.zero3 import whole_weights

TINY_VOCAB_SIZE = 1024
TINY_TEXT_INIT_STD = 0.1
"""Larger than transformers' 0.02: with a 64-wide hidden state, 0.02 leaves the frozen lm_head too weak to
express a peaked distribution, so LoRA-only runs could not fit the examples the way a pretrained model does."""
TINY_SPEC_VERSION = 4  # bump when the tiny model changes, so cached copies are rebuilt
DEFAULT_FAMILY = "qwen2_vl"

# Pixel budgets of the tiny processor, in tokens (one token = one merged 2x2 patch group).
TINY_IMAGE_TOKENS = (4, 64)
TINY_VIDEO_TOKENS = (4, 16)
TINY_VIDEO_FPS = 2.0
TINY_VIDEO_MAX_FRAMES = 8

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

TINY_QWEN3_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64,
                     "patch_size": 16, "deepstack_visual_indexes": [0], "num_position_embeddings": 64}
"""Qwen3-VL's vision tower at toy sizes (Qwen3.5 uses it without DeepStack)."""

TINY_QWEN3_5_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 2,
    "attn_output_gate": True,
    "mamba_ssm_dtype": "float32",  # vLLM keeps the linear-attention state in this dtype (else the model's: bf16)
    "mlp_only_layers": [],
    "mtp_num_hidden_layers": 0,  # real checkpoints: 1 (a multi-token-prediction layer); the tiny model has none
    "mtp_use_dedicated_embeddings": False,
    "max_position_embeddings": 4096,
    # Qwen3.5 rotates a quarter of head_dim (8 of 32): the M-RoPE sections must sum to 4. Without mrope_section its
    # rotary embedding falls back to the real models' [11, 11, 10] and silently slices past a tiny head.
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                        "mrope_section": [2, 1, 1], "mrope_interleaved": True},
}
"""Qwen3.5's hybrid language model at toy sizes: linear attention in layers 0 and 2, full attention in 1 and 3. It
carries every key of the published configs (tests/test_tiny_configs.py), those transformers does not read included:
vLLM reads them."""

TINY_QWEN3_5_VISION = {**TINY_QWEN3_VISION, "deepstack_visual_indexes": []}
"""Qwen3.5's vision tower: Qwen3-VL's without DeepStack (the published configs say so with an empty list)."""


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


def _official_template(name: str) -> str:
    """An official Qwen chat template shipped as package data (``vlmtune/testing/templates/``, byte for byte the files
    of tests/fixtures/chat_templates/, whose SOURCES.md names where each comes from)."""
    from importlib.resources import files

    return files("vlmtune.testing").joinpath("templates", name).read_text(encoding="utf-8")


TINY_CONFIGS: dict[str, dict] = {
    "qwen2_vl": {
        "text_config": TINY_TEXT_CONFIG,
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2},
    },
    "qwen2_5_vl": {
        "text_config": TINY_TEXT_CONFIG,
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                          "out_hidden_size": 64, "fullatt_block_indexes": [1], "window_size": 56},
    },
    "qwen3_vl": {
        "text_config": {
            **TINY_TEXT_CONFIG,
            "head_dim": 16,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        },
        "vision_config": TINY_QWEN3_VISION,
    },
    "qwen3_vl_moe": {
        "text_config": {
            **TINY_TEXT_CONFIG,
            "head_dim": 16,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            "moe_intermediate_size": 24,  # 2 x 24 != hidden 64: a transposed expert layout would show in the shapes
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,  # as the real configs: transformers always normalises, vLLM reads the key
        },
        "vision_config": TINY_QWEN3_VISION,
    },
    "qwen3_5": {
        "text_config": TINY_QWEN3_5_TEXT,
        "vision_config": TINY_QWEN3_5_VISION,
    },
    "qwen3_5_moe": {
        "text_config": {**{k: v for k, v in TINY_QWEN3_5_TEXT.items() if k != "intermediate_size"},
                        "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
                        "num_experts": 4, "num_experts_per_tok": 2},
        "vision_config": TINY_QWEN3_5_VISION,
    },
}
"""Config kwargs (without vocabulary and token ids) of each family's embedded tiny model."""

TINY_TEMPLATES: dict[str, str] = {
    "qwen2_vl": chatml_template("You are a helpful assistant."),
    "qwen2_5_vl": chatml_template("You are a helpful assistant."),
    "qwen3_vl": chatml_template(None),
    "qwen3_vl_moe": _official_template("qwen3_vl_instruct.jinja"),
    "qwen3_5": _official_template("qwen3_5.jinja"),
    "qwen3_5_moe": _official_template("qwen3_5.jinja"),
}
"""The chat template of each tiny model: ChatML as the family's checkpoints render it, or (newer families) the
official template their checkpoints ship: Qwen3-VL-Instruct's (dense and MoE alike) and Qwen3.5's, which thinks."""

_CORPUS = """
A photo of a red circle on a white background. A blue square next to a green triangle.
The cat sits on the mat and looks at the camera. Two dogs run across a field of grass.
What is in this image? Describe the picture in one sentence. How many objects are there?
There are three shapes: a circle, a square and a triangle. The video shows a ball moving
from the left to the right. What color is the ball? The ball is yellow. Compare the two
images. The first image is brighter than the second one. Answer the question briefly.
You are a helpful assistant. The user asks, the assistant answers, the system sets the rules.
Please read the text in the image. The sign says stop.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 seconds minutes left right up down.
The quick brown fox jumps over the lazy dog. Hello, world! Yes. No. Maybe; perhaps?
"""


def _train_tokenizer(seed: int, extra_tokens: tuple[str, ...] = ()):
    """Byte-level BPE in Qwen2's pre-tokenization, trained on a fixed corpus (deterministic), plus the family's
    added tokens (Qwen3's ``<think>`` / ``</think>``: added, not special, as in the real tokenizers)."""
    from transformers import Qwen2Tokenizer

    base = Qwen2Tokenizer()
    corpus = [line.strip() for line in _CORPUS.strip().splitlines()] * 4
    tokenizer = base.train_new_from_iterator(
        corpus, vocab_size=TINY_VOCAB_SIZE - len(SPECIAL_TOKENS), new_special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,  # the tokenizers trainer's bars mean nothing to a user of the tiny model
    )
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    return tokenizer


def _processor(family: Family, tokenizer):
    import transformers

    f2 = family.factor**2
    image_processor = getattr(transformers, family.image_processor_class)(
        patch_size=family.patch_size,
        min_pixels=TINY_IMAGE_TOKENS[0] * f2,
        max_pixels=TINY_IMAGE_TOKENS[1] * f2,
    )
    video_processor = getattr(transformers, family.video_processor_class)(
        patch_size=family.patch_size,
        size={"shortest_edge": TINY_VIDEO_TOKENS[0] * f2, "longest_edge": TINY_VIDEO_TOKENS[1] * f2},
        fps=TINY_VIDEO_FPS,
        max_frames=TINY_VIDEO_MAX_FRAMES,
        cap_pixels_per_frame=True,
    )
    processor_cls = getattr(transformers, family.processor_class)
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=TINY_TEMPLATES[family.model_type],
    )


def tiny_config(family: Family, tokenizer, text_overrides: dict | None = None):
    """The family's config at tiny sizes, with token ids from the tiny tokenizer; ``text_overrides`` replace
    entries of its ``text_config`` (e.g. head sizes a server needs)."""
    from transformers import AutoConfig

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]}
    kwargs = json.loads(json.dumps(TINY_CONFIGS[family.model_type]))
    kwargs["text_config"].update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=TINY_TEXT_INIT_STD,
    )
    kwargs["text_config"].update(text_overrides or {})
    return AutoConfig.for_model(family.model_type, **kwargs, **ids)


@contextlib.contextmanager
def _quiet_progress():
    """transformers' progress bars off for the block (as they were after it)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def build_tiny_model(out_dir: str | Path, family: str = DEFAULT_FAMILY, seed: int = 0,
                     text_overrides: dict | None = None) -> Path:
    """Write a tiny ``family`` model folder (weights, config, processor, chat template) to ``out_dir``;
    ``text_overrides``: see ``tiny_config``."""
    from transformers import GenerationConfig

    fam = FAMILIES[family]
    out = Path(out_dir)
    tokenizer = _train_tokenizer(seed, fam.extra_tokens)
    config = tiny_config(fam, tokenizer, text_overrides)
    torch.manual_seed(seed)
    with whole_weights():
        model = fam.model_cls()(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    # A cache file, not a checkpoint: whichever process builds it writes it. Inside a torchrun job
    # transformers would write weights from global rank 0 only, leaving other builders a folder without them.
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    with _quiet_progress():  # "Writing model shards" of a 1-shard cache file: no news to a user
        model.save_pretrained(out)
    write_hub_layout(out, fam)  # as a real checkpoint of the family: loading exercises transformers' conversion
    _processor(fam, tokenizer).save_pretrained(out)
    return out


def tiny_model_path(family: str = DEFAULT_FAMILY) -> Path:
    """Folder of the embedded tiny model, built on first use (cached under ``$VLMTUNE_CACHE``).

    Every process of a job may ask at once: one builds under a file lock while the others wait, and the
    folder appears complete or not at all (built aside, then renamed).
    """
    import fcntl
    import os
    import shutil

    import transformers

    path = cache_root() / f"tiny-{family}-v{TINY_SPEC_VERSION}-tf{transformers.__version__}"
    if (path / "model.safetensors").is_file():  # the folder is renamed into place only once complete
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "model.safetensors").is_file():
            shutil.rmtree(path, ignore_errors=True)  # an incomplete folder left by an older version
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            build_tiny_model(tmp, family)
            tmp.rename(path)
    return path
