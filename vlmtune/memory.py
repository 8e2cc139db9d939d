"""Estimate the memory one GPU needs to fine-tune a Qwen-VL model, item by item.

Parameter counts are exact: the model is built on the ``meta`` device from its config (no weights are allocated)
and the package's own modes table (``modes.lora_targets``, ``modes.part_of``) says what trains. Everything else is
a formula over those counts and the shapes, written from what transformers 5.22, PEFT and torch do in a step:

* weights: the load dtype (bf16 for ``--bf16``, fp32 for AMP or fp32); with ``--bits 4|8`` the language model's
  linear layers are bitsandbytes nf4 / int8 and every other weight is upcast to fp32 by PEFT's
  ``prepare_model_for_kbit_training`` (what ``vlmtune train`` calls). LoRA adapters are fp32 (PEFT's default).
* gradients: one per trainable parameter, in its dtype. ZeRO-2/3 divide them by the number of GPUs.
* optimizer states: torch AdamW keeps two states in the parameter's dtype; DeepSpeed keeps fp32 master weights and
  two fp32 states (12 bytes per parameter, 8 when the parameters are already fp32), divided over GPUs from ZeRO-1,
  moved to the CPU with offload.
* activations: what autograd saves per token in a decoder layer (see ``_layer_bytes``: softmax or Gated DeltaNet
  token mixer, dense or MoE MLP), times layers and tokens, plus what a layer keeps per sequence (the delta rule's
  chunked tensors) or per step (the expert stacks PEFT folds for LoRA on MoE experts); with gradient checkpointing
  only each layer's input plus one layer recomputed during backward. Qwen3.5's recurrent state has a row of its own.
* MoE: total and active parameters (a token passes through ``k`` of ``E`` experts); LoRA on the experts has rank
  ``r`` per expert.
* vision tokens: how many the pixel budgets give, and what the vision tower and merger save for backward when
  they train (nothing but their output when frozen).
* logits: the model-dtype logits, the fp32 log-probabilities cross-entropy keeps and one fp32 gradient of the same
  size; Liger's fused linear cross-entropy never materialises them: one chunk of ``ceil(T / ceil(V / H))`` rows
  (rounded up to a power of two), the input's gradient, and lm_head's gradient when it trains.

The peak is an upper bound: weights + optimizer states + gradients + the larger of (activations + vision + logits)
and the optimizer step's temporaries, as if every gradient already existed while every activation is still held.
Not counted: the CUDA context and kernels (about 0.5-1 GB per process), allocator fragmentation, NCCL buffers.
``torch.cuda.max_memory_allocated`` measures the same tensor memory this estimates.
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

GB = 1e9
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""bitsandbytes nf4 with double quantization: 4 bits, an 8-bit absmax per 64 weights, an fp32 scale per 256 absmaxes."""
LAYER_NORM_UPCAST = 4
"""Qwen RMSNorm upcasts its input to fp32 and keeps that copy for backward."""

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
    linear_kernels: bool | None = None
    """Qwen3.5: flash-linear-attention runs the Gated DeltaNet layers (default: on CUDA, as vlmtune[gpu] installs
    it); False: transformers' PyTorch path."""

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


@dataclass(frozen=True)
class Row:
    name: str
    bytes: float
    detail: str


@dataclass
class Estimate:
    """Rows of one estimate; ``peak`` combines them (see the module doc)."""

    model: str
    setup: Setup
    shape: ModelShape
    rows: dict[str, Row]
    alternatives: dict[str, float]
    notes: list[str]

    def bytes(self, name: str) -> float:
        return self.rows[name].bytes

    @property
    def peak(self) -> float:
        b = self.bytes
        held = b("weights") + b("lora adapters") + b("optimizer states") + b("gradients")
        state = self.rows["linear-attention state"].bytes if "linear-attention state" in self.rows else 0.0
        return held + max(b("optimizer step temporaries"), b("activations") + state + b("vision") + b("logits + loss")
                          + b("attention mask"))

    def table(self) -> str:
        s = self.setup
        unit, scale = ("GB", GB) if self.peak >= 0.1 * GB else ("MB", 1e6)
        sh = self.shape
        active = f", {_count(sh.active_params)} active per token ({sh.experts_per_token} of {sh.experts} experts)" \
            if sh.experts else ""
        head = (f"{self.model} ({sh.model_type}, {_count(sh.params)} params{active}): mode {s.mode}, "
                f"{s.precision}{f', {s.bits}-bit base' if s.bits < 16 else ''}, "
                f"{'ZeRO-' + str(s.zero) if s.zero else 'no DeepSpeed'}"
                f"{', offload ' + s.offload if s.offload != 'none' else ''}, {s.gpus} GPU(s), batch {s.batch_size}, "
                f"{s.seq_len} text tokens + {vision_tokens(self.shape, s)} vision tokens per sample, "
                f"{s.attn}{', gradient checkpointing' if s.gradient_checkpointing else ''}"
                f"{', Liger' if s.liger else ''}{', packing' if s.packing else ''}")
        lines = [head, f"{'per GPU':<28}{unit:>9}  detail"]
        for row in self.rows.values():
            lines.append(f"{row.name:<28}{row.bytes / scale:>9.2f}  {row.detail}")
        lines.append(f"{'peak (upper bound)':<28}{self.peak / scale:>9.2f}  weights + optimizer + gradients + "
                     "max(step temporaries, activations + vision + logits + mask)")
        lines.append("alternatives: " + ", ".join(f"{k} {v / scale:.2f} {unit}" for k, v in self.alternatives.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def vision_tokens(shape: ModelShape, setup: Setup) -> int:
    """Vision tokens per sample: pixels / (patch x merge)^2 per image, and per pair of frames for videos."""
    per_token = shape.vision_factor**2
    image = setup.images * max(setup.image_pixels // per_token, 4) if setup.images else 0
    video = setup.videos * math.ceil(setup.video_frames / 2) * max(setup.video_pixels // per_token, 4)
    return image + video


def _dtype_bytes(setup: Setup) -> tuple[int, int]:
    """(bytes per weight of the loaded model, bytes per activation)."""
    return {"bf16": (2, 2), "pure_bf16": (2, 2), "amp": (4, 2), "fp32": (4, 4)}[setup.precision]


_QK_NORM = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
"""Families whose attention normalises q and k per head (RMSNorm)."""
_GATED_ATTENTION = ("qwen3_5", "qwen3_5_moe")
"""Qwen3.5: q_proj also gives a sigmoid output gate per head; q_norm sees a view of that double-width output."""
DELTA_CHUNK = 64
"""Chunk length of the Gated DeltaNet kernels (transformers' PyTorch path and flash-linear-attention alike)."""


def _layer_bytes(shape: ModelShape, a: int, base_trains: bool, kv_expanded: bool, lora: tuple[int, int],
                 setup: Setup, experts_train: bool = False) -> float:
    """Bytes autograd keeps per token in one decoder layer (HF Qwen2 / Qwen3 / Qwen3.5 text layers, sdpa or flash),
    averaged over the layers: token mixer + MLP + the two RMSNorms.

    Always: both RMSNorms' fp32 upcast input, the token mixer's (``_attention_bytes``, ``_linear_attention_bytes``)
    and the MLP's (``_mlp_bytes``). When the layer's own weights train (full): the norms' normalised copies and the
    linears' inputs (a frozen linear keeps no input). Each LoRA'd linear adds its own (see ``_lora_bytes``).
    """
    h = shape.hidden
    norms = 2 * LAYER_NORM_UPCAST * h + (2 * a * h if base_trains else 0)
    mixer = (shape.full_layers * _attention_bytes(shape, a, base_trains, kv_expanded)
             + shape.linear_layers * _linear_attention_bytes(shape, a, base_trains)) / shape.layers
    return norms + mixer + _mlp_bytes(shape, a, base_trains, experts_train) + _lora_bytes(lora, a, setup)


def _attention_bytes(shape: ModelShape, a: int, base_trains: bool, kv_expanded: bool) -> float:
    """Per token, full (softmax) attention: q and k after RoPE and v (k and v at every head when sdpa gets a mask
    and repeats the KV heads), the attention output; Qwen3 on: q_norm's and k_norm's fp32 inputs; Qwen3.5: the
    output gate's input and sigmoid. Trained: q_proj's and o_proj's inputs (and the q / k norms' copies)."""
    h, q = shape.hidden, shape.heads * shape.head_dim
    kv = q if kv_expanded else shape.kv_heads * shape.head_dim
    always = a * (q + 2 * kv + q)
    trained = a * (h + q) if base_trains else 0
    if shape.model_type in _QK_NORM:
        qk = q + shape.kv_heads * shape.head_dim
        if shape.model_type in _GATED_ATTENTION:
            always += 2 * a * q
            qk += q if a == LAYER_NORM_UPCAST else 0  # fp32: the norm's input is a view of the [q | gate] storage
        always += LAYER_NORM_UPCAST * qk
        trained += a * (q + shape.kv_heads * shape.head_dim) if base_trains else 0
    return always + trained


def _linear_attention_bytes(shape: ModelShape, a: int, base_trains: bool) -> float:
    """Per token, one Gated DeltaNet layer outside the delta-rule kernel: the causal convolution's input and
    output, beta, the decay's fp32 input, q and k L2-normalised in fp32 (at every value head), the gated RMSNorm's
    fp32 tensors. Trained: in_proj's and out_proj's inputs and the norm's copy. The kernel's own tensors depend on
    the sequence and its chunks: ``_delta_rule_bytes``."""
    hk, hv, dk, dv = shape.linear_heads
    channels = 2 * hk * dk + hv * dv
    always = 2 * a * channels + a * hv + 4 * hv + 8 + 2 * 4 * hv * (dk + 1) + 4 * (4 * hv * dv + hv)
    trained = a * (shape.hidden + hv * dv) + 4 * hv * dv if base_trains else 0
    return always + trained


def _delta_rule_bytes(shape: ModelShape, a: int, setup: Setup, seq: int) -> tuple[float, float]:
    """(bytes per sequence besides the states, the chunk states per sequence) of one Gated DeltaNet layer's delta
    rule.

    transformers' PyTorch path (CPU, or CUDA without flash-linear-attention): fp32 tensors over the sequence
    padded to 64-token chunks (five chunk x chunk matrices per head, the padded q / k / v, decays), the
    convolution's left padding, and the recurrent state itself, [value heads, dk, dv] in fp32, once per chunk,
    all kept for backward. flash-linear-attention (``setup.uses_linear_kernels``): q, k, v, g, beta and its
    chunk-local A [T, heads, 64] (read from fla's source, not measured here); it holds the chunk states of one
    layer while it runs and recomputes them in backward.
    """
    hk, hv, dk, dv = shape.linear_heads
    chunks = math.ceil(seq / DELTA_CHUNK)
    states = chunks * 4 * hv * dk * dv
    conv = a * (2 * hk * dk + hv * dv) * (shape.linear_conv - 1)
    if setup.uses_linear_kernels:
        return seq * (a * hv * (2 * dk + dv + 1) + 4 * hv * (DELTA_CHUNK + 3)) + conv, states
    padded = chunks * DELTA_CHUNK
    return padded * 4 * hv * (5 * DELTA_CHUNK + 6 * dk + 2 * dv + 4) + conv, states


def _mlp_bytes(shape: ModelShape, a: int, base_trains: bool, experts_train: bool) -> float:
    """Per token. Dense: the MLP's gate, SiLU(gate) and up; trained: gate_proj's and down_proj's inputs.
    MoE: the router's fp32 probabilities and top-k choice, and per routed copy (k per token) the expert's
    gate / up output, up, its weight and the expert output; the shared expert as a dense MLP plus its gate.
    Trained or LoRA'd experts: each copy's input and down-projection input too."""
    h = shape.hidden
    if not shape.experts:
        return 3 * a * shape.intermediate + (a * (h + shape.intermediate) if base_trains else 0)
    k, inter, shared = shape.experts_per_token, shape.moe_intermediate, shape.shared_intermediate
    router = 4 * shape.experts + 12 * k + 4
    routed = 24 * k + a * k * (3 * inter + 1 + h) + (a * k * (h + inter) if base_trains or experts_train else 0)
    common = 3 * a * shared + a * (h + 1) + (a * (h + shared) if base_trains else 0) if shared else 0
    return router + routed + common


def _lora_bytes(lora: tuple[float, float, float], a: int, setup: Setup) -> float:
    """Per token, for LoRA'd linears with these (summed input features, count, distinct inputs' features): the
    dropout mask (bool on CUDA, the input's dtype in torch's CPU dropout), the dropped input lora_A keeps (the
    autocast copy when activations are 16-bit), and lora_A's rank-r output that lora_B keeps. Without dropout
    lora_A keeps its input as is: one copy per distinct input (q, k and v share theirs)."""
    inputs, count, distinct = lora
    if not count:
        return 0.0
    if setup.lora_dropout > 0:
        return ((1 if setup.device == "cuda" else 4) + a) * inputs + a * setup.lora_rank * count
    return a * distinct + a * setup.lora_rank * count


def _vision_block_bytes(shape: ModelShape, a: int, base_trains: bool, lora: tuple[int, int], setup: Setup) -> float:
    """Bytes autograd keeps per patch in one vision block when the tower trains: the norms' inputs (fp32 upcast
    for Qwen2.5-VL's RMSNorm), q, k, v and the attention output, the MLP activation's inputs (QuickGELU: x and
    sigmoid; SwiGLU: gate, SiLU, up; GELU: x) and, when the block's own weights train, the linears' inputs."""
    d, m = shape.vision_hidden, shape.vision_intermediate
    norm_in = LAYER_NORM_UPCAST if shape.model_type == "qwen2_5_vl" else a
    mlp = {"qwen2_vl": 2, "qwen2_5_vl": 3}.get(shape.model_type, 1) * a * m
    trained = a * (4 * d + m) if base_trains else 0
    return 2 * norm_in * d + 4 * a * d + mlp + trained + _lora_bytes(lora, a, setup)


def estimate(model: str | None, setup: Setup, shape: ModelShape | None = None) -> Estimate:
    """The itemised per-GPU estimate for ``model`` (see ``load_config``) under ``setup``."""
    setup.check()
    if shape is None:
        shape = model_shape(load_config(model))
    p, a = _dtype_bytes(setup)
    n = setup.gpus
    if setup.bits < 16 and shape.experts:
        raise ConfigError(f"--bits {setup.bits}: vlmtune refuses QLoRA for MoE models (bitsandbytes leaves the fused "
                          "experts unquantized and PEFT upcasts them to fp32)")
    notes: list[str] = []
    plan_trainable = shape.trainable[setup.mode]
    lora = shape.lora(setup.mode, setup.lora_rank)
    quantized = setup.bits < 16
    # vlmtune's --bf16 without DeepSpeed keeps what trains in fp32 (modes.fp32_master_weights); DeepSpeed keeps
    # fp32 masters in its optimizer instead, and --pure_bf16 keeps everything in bf16.
    fp32_masters = setup.precision == "bf16" and setup.zero == 0 and not quantized
    rows: dict[str, Row] = {}

    # weights
    if quantized:
        per_q = NF4_BYTES if setup.bits == 4 else 1.0
        other = shape.params - shape.quantizable
        weights = shape.quantizable * per_q + other * 4
        detail = (f"{_count(shape.quantizable)} LLM linear weights at {per_q:.3f} B + {_count(other)} others "
                  "(vision, embeddings, lm_head, norms) upcast to fp32 by prepare_model_for_kbit_training")
        notes.append("QLoRA: PEFT's prepare_model_for_kbit_training upcasts every non-quantized weight to fp32; "
                     f"here that is {other * 4 / GB:.1f} GB of the weights")
    elif fp32_masters:
        weights = (shape.params - plan_trainable) * p + plan_trainable * 4
        detail = f"{_count(shape.params - plan_trainable)} params x {p} B + {_count(plan_trainable)} trained x 4 B"
    else:
        weights = shape.params * p
        detail = f"{_count(shape.params)} params x {p} B"
    if setup.zero == 3:
        gathered = shape.largest_layer * (4 if quantized else p)
        resident = 0 if setup.offload == "all" else weights / n
        weights = resident + gathered
        detail += f", ZeRO-3: /{n} GPUs" + (" (offloaded)" if setup.offload == "all" else "") + " + 1 gathered layer"
    rows["weights"] = Row("weights", weights, detail)
    rows["lora adapters"] = Row("lora adapters", lora * 4 / (n if setup.zero == 3 else 1),
                                f"{_count(lora)} LoRA params x 4 B (fp32 adapters)" if lora else "no LoRA")

    # gradients and optimizer
    train_bytes = 4 if quantized or fp32_masters else p  # non-LoRA trainables: fp32, or the weights' dtype
    grads = plan_trainable * train_bytes + lora * 4
    grad_detail = f"{_count(plan_trainable + lora)} trainable params"
    if setup.zero >= 2:
        grads /= n
        grad_detail += f", ZeRO-{setup.zero}: /{n}"
    rows["gradients"] = Row("gradients", grads, grad_detail)
    if setup.zero == 0:
        states = 2 * (plan_trainable * train_bytes + lora * 4)
        opt_detail = "AdamW exp_avg + exp_avg_sq in each parameter's dtype"
        if setup.optim == "adamw_torch":
            temporaries = plan_trainable * train_bytes + lora * 4
            temp_detail = "foreach AdamW: one state-sized temporary (sqrt of exp_avg_sq)"
        else:
            temporaries, temp_detail = 0.0, "fused AdamW updates each tensor in place"
    else:
        master = lambda nbytes: 12 if nbytes < 4 else 8  # noqa: E731 - fp32 master copy unless already fp32
        states = (plan_trainable * master(train_bytes) + lora * 8) / n
        opt_detail = f"DeepSpeed: fp32 master + 2 fp32 Adam states, ZeRO-{setup.zero}: /{n}"
        if setup.offload != "none":
            notes.append(f"offloaded optimizer states need {states * n / GB:.1f} GB of CPU RAM per node "
                         "(shared by its GPUs)")
            states, opt_detail = 0.0, "offloaded to CPU"
        temporaries, temp_detail = 0.0, "DeepSpeed's Adam updates in place"
    rows["optimizer states"] = Row("optimizer states", states, opt_detail)
    rows["optimizer step temporaries"] = Row("optimizer step temporaries", temporaries, temp_detail)

    # activations
    v_tokens = vision_tokens(shape, setup)
    seq = setup.seq_len + v_tokens
    tokens = setup.batch_size * seq
    kv_expanded = setup.attn in ("sdpa", "eager") and (setup.batch_size > 1 or setup.packing)
    llm_trains = setup.mode == "full"
    expert_lora = shape.expert_lora.get(setup.mode, False)
    if expert_lora:  # PEFT's LoRA on parameters has no dropout, and one setting covers every LoRA layer
        setup = Setup(**{**setup.__dict__, "lora_dropout": 0.0})
    per_layer = _layer_bytes(shape, a, llm_trains, kv_expanded, shape.lora_layer[setup.mode], setup, expert_lora)
    head = (LAYER_NORM_UPCAST + a + (a if llm_trains else 0)) * shape.hidden  # final norm + lm_head input
    # Per layer but not per token: the Gated DeltaNet kernel's chunked tensors, and the expert stacks PEFT folds
    # (W + B A, in the weights' dtype) for every forward of LoRA'd experts, kept for the backward.
    delta, states = _delta_rule_bytes(shape, a, setup, seq) if shape.linear_layers else (0.0, 0.0)
    per_layer_fixed = (setup.batch_size * delta * shape.linear_layers
                       + (shape.expert_params * p if expert_lora else 0)) / shape.layers
    kept = not setup.uses_linear_kernels  # the PyTorch path keeps every chunk state of every layer for backward
    full_acts = tokens * (shape.layers * per_layer + head) + shape.layers * per_layer_fixed
    checkpointed = tokens * (shape.layers * a * shape.hidden + per_layer + head) + per_layer_fixed
    if setup.attn == "eager":
        eager = setup.batch_size * shape.heads * seq * seq * a * 2 * shape.layers  # probabilities + dropout input
        full_acts += eager
        checkpointed += eager / shape.layers
        notes.append("eager attention keeps heads x seq^2 probabilities per layer; use sdpa or flash_attention_2")
    acts = checkpointed if setup.gradient_checkpointing else full_acts
    rows["activations"] = Row(
        "activations", acts,
        f"{tokens:,} tokens x {shape.layers} layers x {per_layer / 1e3:.1f} kB"
        + (" (checkpointed: layer inputs + 1 layer)" if setup.gradient_checkpointing else "")
        + (", KV heads repeated for sdpa" if kv_expanded else ""))
    if shape.linear_layers:
        held = setup.batch_size * states * (shape.linear_layers if kept and not setup.gradient_checkpointing else 1)
        rows["activations"] = Row("activations", acts, rows["activations"].detail
                                  + f"; {shape.linear_layers} Gated DeltaNet layers: "
                                  + ("flash-linear-attention" if setup.uses_linear_kernels else "PyTorch path"))
        rows["linear-attention state"] = Row(
            "linear-attention state", held,
            f"recurrent state {shape.linear_heads[1]}x{shape.linear_heads[2]}x{shape.linear_heads[3]} fp32 "
            f"({4 * shape.recurrent_state / 1e6:.2f} MB) + conv state {shape.conv_state:,} per sequence and layer; "
            + (f"flash-linear-attention holds one per {DELTA_CHUNK}-token chunk of one layer, recomputed in backward"
               if setup.uses_linear_kernels else f"the PyTorch path keeps one per {DELTA_CHUNK}-token chunk of every "
               "layer for backward"))
    if expert_lora:
        notes.append(f"LoRA on the MoE experts: PEFT folds W + BA into a new expert stack on every forward, kept for "
                     f"backward: {shape.expert_params * p / GB:.1f} GB over all layers without gradient checkpointing "
                     f"({shape.expert_params * p / shape.layers / GB:.2f} GB per layer with it); in activations")

    # vision
    patches = 4 * v_tokens * setup.batch_size
    vision_trains = setup.mode == "lora_vision"
    merger_trains = setup.mode in ("full", "lora_vision")
    merger = v_tokens * setup.batch_size * 4 * shape.vision_hidden * (LAYER_NORM_UPCAST + 3 * a)
    merger *= 1 + shape.deepstack
    if vision_trains:
        block = _vision_block_bytes(shape, a, False, shape.lora_block[setup.mode], setup)
        tower = patches * (shape.vision_depth * block if not setup.gradient_checkpointing
                           else shape.vision_depth * a * shape.vision_hidden + block)
        vision_detail = f"tower trains: {patches:,} patches x {shape.vision_depth} blocks + merger"
    else:
        tower = 0.0
        vision_detail = "tower frozen: nothing kept" + (" but the merger's activations" if merger_trains else "")
    vision = tower + (merger if merger_trains else 0.0) + v_tokens * setup.batch_size * shape.hidden * a
    rows["vision"] = Row("vision", vision, f"{v_tokens:,} vision tokens per sample; {vision_detail}")

    # logits
    plain_logits = tokens * shape.vocab * (a + 4 + 4)
    inc = math.ceil(shape.vocab / shape.hidden)
    chunk = 2 ** math.ceil(math.log2(max(math.ceil(tokens / inc), 1)))
    liger_logits = a * chunk * shape.vocab + a * tokens * shape.hidden  # one logits chunk + the input's gradient
    if setup.mode == "full":
        liger_logits += p * shape.vocab * shape.hidden  # lm_head's gradient, computed during the forward
    logits = liger_logits if setup.liger else plain_logits
    rows["logits + loss"] = Row(
        "logits + loss", logits,
        f"Liger fused CE: chunks of {chunk:,} rows" if setup.liger
        else f"{tokens:,} x {shape.vocab:,} logits: model dtype + fp32 log-probs + fp32 gradient")
    mask = setup.batch_size * seq * seq if setup.attn in ("sdpa", "eager") and (
        setup.batch_size > 1 or setup.packing) else 0
    rows["attention mask"] = Row("attention mask", mask, "4-D bool mask built once per step" if mask
                                 else "none (flash-attn, or one unpadded row)")

    alternatives = {
        "activations without checkpointing": full_acts, "activations with checkpointing": checkpointed,
        "logits without Liger": plain_logits, "logits with Liger": liger_logits,
    }
    return Estimate(model or "tiny", setup, shape, rows, alternatives, notes)


def main(argv: list[str] | None = None) -> int:
    """``vlmtune estimate-memory``: print the itemised estimate."""
    import argparse

    d = Setup()
    parser = argparse.ArgumentParser(
        prog="vlmtune estimate-memory",
        description="Estimate GPU memory per device for a fine-tuning setup (tensor memory, GB = 1e9 bytes).")
    parser.add_argument("model", nargs="?", default="tiny",
                        help=f"hub name with a built-in shape ({', '.join(KNOWN_MODELS)}; org prefix and -Instruct "
                        "are fine), a local folder with config.json, or tiny[:family] (default: tiny)")
    parser.add_argument("--mode", default=d.mode, choices=["full", "lora", "lora_vision"])
    parser.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                        help="bf16: what --bf16 trains in: frozen weights in bf16, trained ones with fp32 gradients "
                        "and AdamW states (fp32 masters; DeepSpeed keeps them in its optimizer); pure_bf16: all in "
                        "bf16 (--pure_bf16); amp: fp32 weights with bf16 autocast; fp32")
    parser.add_argument("--bits", type=int, default=d.bits, choices=[4, 8, 16], help="4 or 8: QLoRA")
    parser.add_argument("--zero", type=int, default=d.zero, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (0: none)")
    parser.add_argument("--offload", default=d.offload, choices=["none", "optimizer", "all"])
    parser.add_argument("--gpus", type=int, default=d.gpus)
    parser.add_argument("--batch_size", type=int, default=d.batch_size, help="per GPU")
    parser.add_argument("--seq_len", type=int, default=d.seq_len, help="text tokens per sample")
    parser.add_argument("--images", type=int, default=d.images, help="images per sample")
    parser.add_argument("--image_pixels", type=int, default=d.image_pixels, help="pixels per image after resizing")
    parser.add_argument("--videos", type=int, default=d.videos, help="videos per sample")
    parser.add_argument("--video_frames", type=int, default=d.video_frames, help="sampled frames per video")
    parser.add_argument("--video_pixels", type=int, default=d.video_pixels, help="pixels per frame after resizing")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--liger", action="store_true", help="Liger's fused linear cross-entropy")
    parser.add_argument("--lora_rank", type=int, default=d.lora_rank)
    parser.add_argument("--lora_dropout", type=float, default=d.lora_dropout)
    parser.add_argument("--attn", default=d.attn, choices=["sdpa", "flash_attention_2", "eager"])
    parser.add_argument("--optim", default=d.optim, choices=["adamw_torch_fused", "adamw_torch"])
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--device", default=d.device, choices=["cuda", "cpu"],
                        help="cpu: torch's CPU dropout keeps an fp32 mask (only the LoRA term changes)")
    parser.add_argument("--linear_kernels", choices=["fla", "torch"], default=None,
                        help="Qwen3.5's Gated DeltaNet layers: flash-linear-attention (default on cuda) or "
                        "transformers' PyTorch path (default on cpu)")
    args = vars(parser.parse_args(argv))
    args["linear_kernels"] = None if args["linear_kernels"] is None else args["linear_kernels"] == "fla"
    model = args.pop("model")
    print(estimate(model, Setup(**args)).table())
    return 0
