"""The model and the training set-up the memory estimate reads: exact shapes from a config, and ``Setup``.

``model_shape`` builds the model on the ``meta`` device from its config (no weights are allocated) and counts its
parameters per part, what each mode trains (the package's modes table: ``modes.lora_targets``, ``modes.part_of``)
and the dimensions the formulas need. ``load_config`` reads a local folder, a tiny model or one of the published
shapes in ``KNOWN_MODELS`` (no hub access needed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlmtune.errors import ConfigError
from vlmtune.families import FAMILIES
from vlmtune.flags import check_value

_QWEN2_VISION = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4}
_QWEN25_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                  "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112, "tokens_per_second": 2}
_QWEN3_VISION_SMALL = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "patch_size": 16,
                       "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]}


_QWEN3_VISION_LARGE = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16,
                       "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]}
_QWEN3_5_VISION = {k: v for k, v in _QWEN3_VISION_LARGE.items() if k != "deepstack_visual_indexes"}
_QWEN3_5_LINEAR = {"linear_num_key_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                   "linear_conv_kernel_dim": 4, "full_attention_interval": 4}


def _moe35(hidden, layers, heads, kv_heads, experts, top_k, moe_intermediate, **extra):
    """A Qwen3.5-MoE text config: head_dim 256, a shared expert as wide as each routed one, vocabulary 248320."""
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": 256, "num_experts": experts, "num_experts_per_tok": top_k,
            "moe_intermediate_size": moe_intermediate, "shared_expert_intermediate_size": moe_intermediate,
            "vocab_size": 248320, "tie_word_embeddings": False, **_QWEN3_5_LINEAR, **extra}


def _text(hidden, intermediate, layers, heads, kv_heads, vocab, tied, **extra):
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "tie_word_embeddings": tied, **extra}


KNOWN_MODELS: dict[str, tuple[str, dict, dict]] = {
    "Qwen2-VL-2B": ("qwen2_vl", _text(1536, 8960, 28, 12, 2, 151936, True), {**_QWEN2_VISION, "hidden_size": 1536}),
    "Qwen2-VL-7B": ("qwen2_vl", _text(3584, 18944, 28, 28, 4, 152064, False), {**_QWEN2_VISION, "hidden_size": 3584}),
    "Qwen2.5-VL-3B": ("qwen2_5_vl", _text(2048, 11008, 36, 16, 2, 151936, True),
                      {**_QWEN25_VISION, "out_hidden_size": 2048}),
    "Qwen2.5-VL-7B": ("qwen2_5_vl", _text(3584, 18944, 28, 28, 4, 152064, False),
                      {**_QWEN25_VISION, "out_hidden_size": 3584}),
    "Qwen2.5-VL-32B": ("qwen2_5_vl", _text(5120, 27648, 64, 40, 8, 152064, False),
                       {**_QWEN25_VISION, "out_hidden_size": 5120}),
    "Qwen2.5-VL-72B": ("qwen2_5_vl", _text(8192, 29568, 80, 64, 8, 152064, False),
                       {**_QWEN25_VISION, "out_hidden_size": 8192}),
    "Qwen3-VL-2B": ("qwen3_vl", _text(2048, 6144, 28, 16, 8, 151936, True, head_dim=128),
                    {**_QWEN3_VISION_SMALL, "out_hidden_size": 2048}),
    "Qwen3-VL-4B": ("qwen3_vl", _text(2560, 9728, 36, 32, 8, 151936, True, head_dim=128),
                    {**_QWEN3_VISION_SMALL, "out_hidden_size": 2560}),
    "Qwen3-VL-8B": ("qwen3_vl", _text(4096, 12288, 36, 32, 8, 151936, False, head_dim=128),
                    {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16,
                     "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
                     "out_hidden_size": 4096}),
    "Qwen3-VL-30B-A3B": ("qwen3_vl_moe", _text(2048, 6144, 48, 32, 4, 151936, False, head_dim=128,
                                                moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8),
                         {**_QWEN3_VISION_LARGE, "out_hidden_size": 2048}),
    "Qwen3-VL-235B-A22B": ("qwen3_vl_moe", _text(4096, 12288, 94, 64, 4, 151936, False, head_dim=128,
                                                  moe_intermediate_size=1536, num_experts=128, num_experts_per_tok=8),
                           {**_QWEN3_VISION_LARGE, "out_hidden_size": 4096}),
    "Qwen3.5-27B": ("qwen3_5", _text(5120, 17408, 64, 24, 4, 248320, False, head_dim=256, **_QWEN3_5_LINEAR,
                                     linear_num_value_heads=48),
                    {**_QWEN3_5_VISION, "out_hidden_size": 5120}),
    "Qwen3.5-35B-A3B": ("qwen3_5_moe", _moe35(2048, 40, 16, 2, 256, 8, 512, linear_num_value_heads=32),
                        {**_QWEN3_5_VISION, "out_hidden_size": 2048}),
    "Qwen3.5-397B-A17B": ("qwen3_5_moe", _moe35(4096, 60, 32, 2, 512, 10, 1024, linear_num_value_heads=64),
                          {**_QWEN3_5_VISION, "out_hidden_size": 4096}),
}
"""Published shapes (the models' config.json) of the checkpoints the estimator knows without a hub. The MoE and
Qwen3.5 rows are transcribed from public copies of their config.json (see the README's family table)."""

PRECISIONS = ("bf16", "pure_bf16", "amp", "fp32")



# ------------------------------------------------------------------ the model


def known_model_key(name: str) -> str | None:
    """The KNOWN_MODELS key for a hub name such as ``Qwen/Qwen2.5-VL-7B-Instruct`` (None if unknown)."""
    base = name.rsplit("/", 1)[-1].lower()
    base = re.sub(r"-(instruct|thinking|base|awq|gptq.*|fp8)$", "", base)
    for key in KNOWN_MODELS:
        if base == key.lower():
            return key
    return None


def load_config(model: str | None):
    """A model config from ``tiny[:family]`` (or None), a local folder / config.json, or a known hub name."""
    from transformers import AutoConfig

    if not model or model == "tiny" or model.startswith("tiny:"):
        from vlmtune.testing.tiny import DEFAULT_FAMILY, tiny_model_path

        family = model.split(":", 1)[1] if model and ":" in model else DEFAULT_FAMILY
        if family not in FAMILIES:
            raise ConfigError(f"model {model}: no tiny {family!r} family; use one of {', '.join(FAMILIES)}")
        return AutoConfig.from_pretrained(tiny_model_path(family))
    path = Path(model)
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: no config.json in this folder")
        try:
            return AutoConfig.from_pretrained(path)
        except ValueError as exc:
            raise ConfigError(f"{path}: its config.json is not a model's ({exc})") from None
    key = known_model_key(model)
    if key is None:
        raise ConfigError(f"unknown model {model!r}: give a local folder with config.json, 'tiny[:family]', or one "
                          f"of the built-in shapes: {', '.join(KNOWN_MODELS)}")
    model_type, text, vision = KNOWN_MODELS[key]
    return AutoConfig.for_model(model_type, text_config=dict(text), vision_config=dict(vision),
                                tie_word_embeddings=text["tie_word_embeddings"])


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need, read from a model built on the meta device (exact counts, no weights)."""

    model_type: str
    params: int
    by_part: dict[str, int]
    quantizable: int
    """Weights of the language model's linear layers (what bitsandbytes quantizes; lm_head and visual skipped)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_factor: int
    """Pixel side of one vision token (patch size x spatial merge)."""
    deepstack: int
    largest_layer: int
    trainable: dict[str, int] = field(default_factory=dict)
    """mode -> non-LoRA trainable parameters."""
    lora_dims: dict[str, int] = field(default_factory=dict)
    """mode -> sum of (in + out features) over the LoRA'd linears: LoRA parameters = rank x this."""
    lora_layer: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    """mode -> (sum of input features, count, sum of distinct inputs' features) of LoRA'd linears in one decoder
    layer (q / k / v, gate / up and Gated DeltaNet's in_proj_* read one tensor)."""
    lora_block: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    """mode -> the same in one vision block."""
    experts: int = 0
    """MoE: experts per layer (0: dense MLP)."""
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    """Qwen3.5-MoE's shared expert (0: none)."""
    expert_params: int = 0
    """All fused expert weights (every layer)."""
    expert_lora: dict[str, bool] = field(default_factory=dict)
    """mode -> whether LoRA reaches the fused experts (PEFT's target_parameters: no dropout anywhere then)."""
    linear_layers: int = 0
    """Qwen3.5: layers whose token mixer is linear attention (Gated DeltaNet); the others are full attention."""
    linear_heads: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(key heads, value heads, key head dim, value head dim) of the Gated DeltaNet layers."""
    linear_conv: int = 0
    """Kernel width of their causal depthwise convolution."""

    def lora(self, mode: str, rank: int) -> int:
        return rank * self.lora_dims[mode]

    @property
    def active_params(self) -> int:
        """Parameters a token passes through: all but the experts it is not routed to."""
        if not self.experts:
            return self.params
        return self.params - self.expert_params + self.expert_params * self.experts_per_token // self.experts

    @property
    def full_layers(self) -> int:
        return self.layers - self.linear_layers

    @property
    def recurrent_state(self) -> int:
        """Elements of one sequence's recurrent state in one linear-attention layer: value heads x dk x dv."""
        _, hv, dk, dv = self.linear_heads
        return hv * dk * dv

    @property
    def conv_state(self) -> int:
        """Elements of one sequence's convolution state in one linear-attention layer: channels x kernel width."""
        hk, hv, dk, dv = self.linear_heads
        return (2 * hk * dk + hv * dv) * self.linear_conv


_SHARED_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"},
                 {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"})
"""Sibling linears that read one and the same tensor."""


def _lora_inputs(targets: list[str], linears: dict) -> tuple[int, int, int]:
    """(summed input features, count, summed features of the distinct input tensors) of LoRA'd linears."""
    distinct = {}
    for t in targets:
        parent, _, leaf = t.rpartition(".")
        group = next((i for i, g in enumerate(_SHARED_INPUT) if leaf in g), leaf)
        distinct[(parent, group)] = linears[t].in_features
    return sum(linears[t].in_features for t in targets), len(targets), sum(distinct.values())


def model_shape(config, lora_target: str | None = None) -> ModelShape:
    """Exact parameter counts and shapes of a config, with trainables per mode from the package's modes table."""
    from vlmtune.families import family_for
    from vlmtune.model import modes

    try:
        family = family_for(config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    with torch.device("meta"):
        model = family.model_cls()._from_config(config)
    params = dict(model.named_parameters())
    by_part = dict.fromkeys(modes.PARTS, 0)
    for name, p in model.named_parameters():
        by_part[modes.part_of(name, family)] += p.numel()
    quantizable = sum(m.weight.numel() for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and n.startswith(family.language_model + "."))
    text, vision = config.text_config, config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    layers = f"{family.language_model}.layers."
    block0 = f"{family.vision}.blocks.0."
    layer_params = max(sum(p.numel() for n, p in model.named_parameters() if n.startswith(f"{layers}{i}."))
                       for i in range(text.num_hidden_layers))
    embed = model.get_input_embeddings().weight.numel()
    experts = [n for n in params if modes.is_expert_weight(n, family)]
    trainable, lora_dims, lora_layer, lora_block, expert_lora = {}, {}, {}, {}, {}
    linears = dict(model.named_modules())
    for mode, plan in modes.PRESETS.items():
        targets = modes.lora_targets(model, family, plan, lora_target) if plan.uses_lora else []
        lora_params = modes.lora_target_parameters(model, family, plan, lora_target) if plan.uses_lora else []
        # PEFT's LoRA on a fused [E, out, in] stack: lora_A [r * E, in], lora_B [out, r * E]
        lora_dims[mode] = (sum(linears[t].in_features + linears[t].out_features for t in targets)
                           + sum(params[n].shape[0] * (params[n].shape[1] + params[n].shape[2]) for n in lora_params))
        expert_lora[mode] = bool(lora_params)
        # LLM layers differ (Qwen3.5: linear or full attention): per layer on average
        n = text.num_hidden_layers
        lora_layer[mode] = tuple(x / n for x in _lora_inputs([t for t in targets if t.startswith(layers)], linears))
        lora_block[mode] = _lora_inputs([t for t in targets if t.startswith(block0)], linears)
        full = modes.fully_trained_names(model, family, plan)
        trainable[mode] = sum(p.numel() for n, p in params.items() if n in full)
    layer_types = getattr(text, "layer_types", None) or []
    moe = bool(experts)
    return ModelShape(
        model_type=config.model_type, params=sum(p.numel() for p in model.parameters()), by_part=by_part,
        quantizable=quantizable, hidden=text.hidden_size, intermediate=getattr(text, "intermediate_size", 0),
        layers=text.num_hidden_layers, heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
        head_dim=head_dim, vocab=text.vocab_size, vision_depth=vision.depth,
        vision_hidden=getattr(vision, "embed_dim", None) or vision.hidden_size,
        vision_intermediate=getattr(vision, "intermediate_size", None)
        or int(vision.embed_dim * getattr(vision, "mlp_ratio", 4)),
        vision_factor=vision.patch_size * vision.spatial_merge_size,
        deepstack=len(getattr(vision, "deepstack_visual_indexes", None) or []),
        largest_layer=max(layer_params, embed), trainable=trainable, lora_dims=lora_dims, lora_layer=lora_layer,
        lora_block=lora_block, experts=text.num_experts if moe else 0,
        experts_per_token=text.num_experts_per_tok if moe else 0,
        moe_intermediate=text.moe_intermediate_size if moe else 0,
        shared_intermediate=getattr(text, "shared_expert_intermediate_size", 0) if moe else 0,
        expert_params=sum(params[n].numel() for n in experts), expert_lora=expert_lora,
        linear_layers=sum(t == "linear_attention" for t in layer_types),
        linear_heads=(getattr(text, "linear_num_key_heads", 0), getattr(text, "linear_num_value_heads", 0),
                      getattr(text, "linear_key_head_dim", 0), getattr(text, "linear_value_head_dim", 0)),
        linear_conv=getattr(text, "linear_conv_kernel_dim", 0),
    )


# ------------------------------------------------------------------ the setup


@dataclass(frozen=True)
class Setup:
    """One training configuration, per GPU."""

    mode: str = "lora"
    precision: str = "bf16"
    """bf16: weights, gradients and AdamW states in bf16 (``vlmtune train --bf16``). amp: fp32 weights with bf16
    autocast. fp32: everything fp32."""
    bits: int = 16
    zero: int = 0
    offload: str = "none"
    """none, optimizer (ZeRO optimizer states on the CPU) or all (optimizer states and parameters, ZeRO-3)."""
    gpus: int = 1
    batch_size: int = 1
    seq_len: int = 1024
    """Text tokens per sample (vision tokens come from the pixel budgets and are added)."""
    images: int = 1
    image_pixels: int = 448 * 448
    videos: int = 0
    video_frames: int = 16
    video_pixels: int = 360 * 420
    gradient_checkpointing: bool = False
    liger: bool = False
    lora_rank: int = 64
    lora_dropout: float = 0.05
    attn: str = "sdpa"
    optim: str = "adamw_torch_fused"
    device: str = "cuda"
    """cuda, or cpu (torch's CPU dropout keeps an fp32 mask): only the LoRA dropout term depends on it."""
    """The Trainer's optimizer: adamw_torch_fused (its default on torch >= 2.8) or adamw_torch (foreach)."""
    packing: bool = False
    sequence_parallel_size: int = 1
    """Ranks that share one sample's tokens (Ulysses): the decoder and the logits hold 1/N of the tokens each."""
    linear_kernels: bool | None = None
    """Qwen3.5: flash-linear-attention runs the Gated DeltaNet layers (default: on CUDA, as vlmtune[gpu] installs
    it); False: transformers' PyTorch path."""

    @property
    def quantized(self) -> bool:
        """QLoRA: the language model's linear layers are 4- or 8-bit."""
        return self.bits < 16

    @property
    def uses_linear_kernels(self) -> bool:
        return self.device == "cuda" if self.linear_kernels is None else self.linear_kernels

    def check(self) -> None:
        if self.mode not in ("full", "lora", "lora_vision"):
            raise ConfigError(f"--mode must be full, lora or lora_vision, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.bits not in (4, 8, 16):
            raise ConfigError(f"--bits must be 4, 8 or 16, got {self.bits}")
        if self.bits < 16 and self.mode == "full":
            raise ConfigError("--bits 4/8 (QLoRA) trains LoRA adapters: use --mode lora or lora_vision")
        if self.bits < 16 and self.zero == 3:
            raise ConfigError("--bits 4/8 with ZeRO-3 is not supported by bitsandbytes + DeepSpeed here")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"--zero must be 0 (no DeepSpeed), 1, 2 or 3, got {self.zero}")
        if self.offload not in ("none", "optimizer", "all"):
            raise ConfigError(f"--offload must be none, optimizer or all, got {self.offload!r}")
        if self.offload != "none" and self.zero == 0:
            raise ConfigError("--offload needs DeepSpeed: give --zero 2 or 3")
        if self.offload == "all" and self.zero != 3:
            raise ConfigError("--offload all (parameters too) needs --zero 3")
        if self.gpus < 1 or self.batch_size < 1 or self.seq_len < 1:
            raise ConfigError("--gpus, --batch_size and --seq_len must be positive")
        for name in ("images", "image_pixels", "videos", "video_frames", "video_pixels"):
            check_value(f"--{name}", getattr(self, name), (0, None, False, False))
        check_value("--lora_rank", self.lora_rank, (1, None, False, False))
        check_value("--lora_dropout", self.lora_dropout, (0, 1, False, True))
        if self.optim not in ("adamw_torch_fused", "adamw_torch"):
            raise ConfigError(f"--optim must be adamw_torch_fused or adamw_torch, got {self.optim!r}")
        if self.attn not in ("sdpa", "flash_attention_2", "eager"):
            raise ConfigError(f"--attn must be sdpa, flash_attention_2 or eager, got {self.attn!r}")
        sp = self.sequence_parallel_size
        if sp < 1 or self.gpus % sp:
            raise ConfigError(f"--sequence_parallel_size {sp} must be positive and divide --gpus {self.gpus}")
        if sp > 1 and (self.attn == "eager" or self.packing and self.attn != "sdpa"):
            raise ConfigError(f"--sequence_parallel_size {sp} runs with sdpa or flash-attn, and with --packing on "
                              "sdpa only")



def vision_tokens(shape: ModelShape, setup: Setup) -> int:
    """Vision tokens per sample: pixels / (patch x merge)^2 per image, and per pair of frames for videos."""
    per_token = shape.vision_factor**2
    image = setup.images * max(setup.image_pixels // per_token, 4) if setup.images else 0
    video = setup.videos * math.ceil(setup.video_frames / 2) * max(setup.video_pixels // per_token, 4)
    return image + video
