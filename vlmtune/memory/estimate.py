"""The estimate: one function per row of the table, over the quantities every row reads (``Step``).

A row is ``(step, notes) -> Row`` (or None when it does not apply), listed in ``ROWS`` in the table's order; a new
row (sequence parallelism, FSDP2, ...) is one more function there. ``Estimate.peak`` combines the rows (see the
package's doc).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from vlmtune.errors import ConfigError
from vlmtune.memory.layers import (
    DELTA_CHUNK,
    LAYER_NORM_UPCAST,
    delta_rule_bytes,
    dtype_bytes,
    layer_bytes,
    vision_block_bytes,
)
from vlmtune.memory.shapes import KNOWN_MODELS, PRECISIONS, ModelShape, Setup, load_config, model_shape, vision_tokens

GB = 1e9
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""bitsandbytes nf4 with double quantization: 4 bits, an 8-bit absmax per 64 weights, an fp32 scale per 256 absmaxes."""


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
        active = (f", {format_count(sh.active_params)} active per token ({sh.experts_per_token} of {sh.experts} "
                  "experts)" if sh.experts else "")
        head = (f"{self.model} ({sh.model_type}, {format_count(sh.params)} params{active}): mode {s.mode}, "
                f"{s.precision}{f', {s.bits}-bit base' if s.bits < 16 else ''}, "
                f"{'ZeRO-' + str(s.zero) if s.zero else 'no DeepSpeed'}"
                f"{', offload ' + s.offload if s.offload != 'none' else ''}, {s.gpus} GPU(s), batch {s.batch_size}, "
                f"{s.seq_len} text tokens + {vision_tokens(self.shape, s)} vision tokens per sample, "
                f"{s.attn}{', gradient checkpointing' if s.gradient_checkpointing else ''}"
                f"{f', sequence parallel over {s.sequence_parallel_size}' if s.sequence_parallel_size > 1 else ''}"
                f"{', Liger' if s.liger else ''}{', packing' if s.packing else ''}")
        lines = [head, f"{'per GPU':<28}{unit:>9}  detail"]
        for row in self.rows.values():
            lines.append(f"{row.name:<28}{row.bytes / scale:>9.2f}  {row.detail}")
        lines.append(f"{'peak (upper bound)':<28}{self.peak / scale:>9.2f}  weights + optimizer + gradients + "
                     "max(step temporaries, activations + vision + logits + mask)")
        lines.append("alternatives: " + ", ".join(f"{k} {v / scale:.2f} {unit}" for k, v in self.alternatives.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def format_count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


@dataclass(frozen=True)
class Step:
    """What the rows read: the model's shape, the set-up, and the quantities derived from them once."""

    shape: ModelShape
    setup: Setup
    """The set-up as the formulas see it (LoRA on MoE experts has no dropout, whatever ``--lora_dropout`` says)."""
    p: int
    """Bytes per weight of the loaded model."""
    a: int
    """Bytes per activation."""
    trainable: int
    """Non-LoRA parameters that train (the mode's plan)."""
    lora: int
    """LoRA parameters."""
    fp32_masters: bool
    """vlmtune's --bf16 without DeepSpeed keeps what trains in fp32 (``modes.fp32_master_weights``); DeepSpeed
    keeps fp32 masters in its optimizer instead, and --pure_bf16 keeps everything in bf16."""
    vision_tokens: int
    """Per sample."""
    seq: int
    """Tokens per sample, vision tokens included."""
    expert_lora: bool
    """LoRA reaches the fused MoE experts."""

    @classmethod
    def of(cls, shape: ModelShape, setup: Setup) -> Step:
        p, a = dtype_bytes(setup)
        expert_lora = shape.expert_lora.get(setup.mode, False)
        if expert_lora:  # PEFT's LoRA on parameters has no dropout, and one setting covers every LoRA layer
            setup = replace(setup, lora_dropout=0.0)
        v_tokens = vision_tokens(shape, setup)
        return cls(shape, setup, p, a, shape.trainable[setup.mode], shape.lora(setup.mode, setup.lora_rank),
                   setup.precision == "bf16" and setup.zero == 0 and not setup.quantized, v_tokens,
                   setup.seq_len + v_tokens, expert_lora)

    @property
    def gpus(self) -> int:
        return self.setup.gpus

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch in this GPU's decoder: under sequence parallelism its chunk of each sample."""
        return self.setup.batch_size * -(-self.seq // self.setup.sequence_parallel_size)

    @property
    def train_bytes(self) -> int:
        """Bytes per non-LoRA trainable parameter: fp32 (QLoRA, fp32 masters), or the weights' dtype."""
        return 4 if self.setup.quantized or self.fp32_masters else self.p

    @property
    def kv_expanded(self) -> bool:
        """sdpa / eager with a mask (padding or packing) repeat the KV heads to every head."""
        # under sequence parallelism only packing keeps a mask (Ulysses drops the padding mask: causal kernels)
        return self.setup.attn in ("sdpa", "eager") and (
            self.setup.packing or (self.setup.batch_size > 1 and self.setup.sequence_parallel_size == 1))


Notes = list[str]


def weights_row(s: Step, notes: Notes) -> Row:
    """The model's weights (QLoRA: quantized LLM linears, the rest upcast to fp32; ZeRO-3: a shard + one layer)."""
    shape, setup, p = s.shape, s.setup, s.p
    if setup.quantized:
        per_q = NF4_BYTES if setup.bits == 4 else 1.0
        other = shape.params - shape.quantizable
        weights = shape.quantizable * per_q + other * 4
        detail = (f"{format_count(shape.quantizable)} LLM linear weights at {per_q:.3f} B + {format_count(other)} "
                  "others (vision, embeddings, lm_head, norms) upcast to fp32 by prepare_model_for_kbit_training")
        notes.append("QLoRA: PEFT's prepare_model_for_kbit_training upcasts every non-quantized weight to fp32; "
                     f"here that is {other * 4 / GB:.1f} GB of the weights")
    elif s.fp32_masters:
        weights = (shape.params - s.trainable) * p + s.trainable * 4
        detail = (f"{format_count(shape.params - s.trainable)} params x {p} B + {format_count(s.trainable)} trained "
                  "x 4 B")
    else:
        weights = shape.params * p
        detail = f"{format_count(shape.params)} params x {p} B"
    if setup.zero == 3:
        gathered = shape.largest_layer * (4 if setup.quantized else p)
        resident = 0 if setup.offload == "all" else weights / s.gpus
        weights = resident + gathered
        offloaded = " (offloaded)" if setup.offload == "all" else ""
        detail += f", ZeRO-3: /{s.gpus} GPUs{offloaded} + 1 gathered layer"
    return Row("weights", weights, detail)


def lora_row(s: Step, notes: Notes) -> Row:
    """The LoRA adapters, fp32 (PEFT's default); sharded by ZeRO-3."""
    return Row("lora adapters", s.lora * 4 / (s.gpus if s.setup.zero == 3 else 1),
               f"{format_count(s.lora)} LoRA params x 4 B (fp32 adapters)" if s.lora else "no LoRA")


def gradients_row(s: Step, notes: Notes) -> Row:
    """One gradient per trainable parameter in its dtype; ZeRO-2/3 divide them over the GPUs."""
    grads = s.trainable * s.train_bytes + s.lora * 4
    detail = f"{format_count(s.trainable + s.lora)} trainable params"
    if s.setup.zero >= 2:
        grads /= s.gpus
        detail += f", ZeRO-{s.setup.zero}: /{s.gpus}"
    return Row("gradients", grads, detail)


def optimizer_row(s: Step, notes: Notes) -> Row:
    """AdamW's two states in each parameter's dtype; DeepSpeed: fp32 master + 2 fp32 states, sharded from ZeRO-1,
    or on the CPU with offload."""
    setup = s.setup
    if setup.zero == 0:
        return Row("optimizer states", 2 * (s.trainable * s.train_bytes + s.lora * 4),
                   "AdamW exp_avg + exp_avg_sq in each parameter's dtype")
    master = 12 if s.train_bytes < 4 else 8  # an fp32 master copy unless the parameters already are fp32
    states = (s.trainable * master + s.lora * 8) / s.gpus
    if setup.offload != "none":
        notes.append(f"offloaded optimizer states need {states * s.gpus / GB:.1f} GB of CPU RAM per node "
                     "(shared by its GPUs)")
        return Row("optimizer states", 0.0, "offloaded to CPU")
    return Row("optimizer states", states, f"DeepSpeed: fp32 master + 2 fp32 Adam states, ZeRO-{setup.zero}: /{s.gpus}")


def temporaries_row(s: Step, notes: Notes) -> Row:
    """What the optimizer step allocates beside the states."""
    name = "optimizer step temporaries"
    if s.setup.zero:
        return Row(name, 0.0, "DeepSpeed's Adam updates in place")
    if s.setup.optim == "adamw_torch":
        return Row(name, s.trainable * s.train_bytes + s.lora * 4,
                   "foreach AdamW: one state-sized temporary (sqrt of exp_avg_sq)")
    return Row(name, 0.0, "fused AdamW updates each tensor in place")


def _per_layer(s: Step) -> float:
    """Bytes per token one decoder layer keeps (averaged over the layers)."""
    return layer_bytes(s.shape, s.a, s.setup.mode == "full", s.kv_expanded, s.shape.lora_layer[s.setup.mode], s.setup,
                       s.expert_lora)


def activations(s: Step, checkpointing: bool) -> float:
    """What the decoder keeps for backward: every layer's tensors, or with gradient checkpointing each layer's input
    plus one layer recomputed; per layer but not per token, the Gated DeltaNet kernel's chunked tensors and the
    expert stacks PEFT folds (W + B A, in the weights' dtype) for every forward of LoRA'd experts; eager attention's
    probabilities."""
    shape, setup, a = s.shape, s.setup, s.a
    per_layer = _per_layer(s)
    head = (LAYER_NORM_UPCAST + a + (a if setup.mode == "full" else 0)) * shape.hidden  # final norm + lm_head input
    delta = delta_rule_bytes(shape, a, setup, s.seq)[0] if shape.linear_layers else 0.0
    per_layer_fixed = (setup.batch_size * delta * shape.linear_layers
                       + (shape.expert_params * s.p if s.expert_lora else 0)) / shape.layers
    eager = setup.batch_size * shape.heads * s.seq * s.seq * a * 2 if setup.attn == "eager" else 0  # probs + dropout
    if checkpointing:
        return s.tokens * (shape.layers * a * shape.hidden + per_layer + head) + per_layer_fixed + eager
    return s.tokens * (shape.layers * per_layer + head) + shape.layers * per_layer_fixed + shape.layers * eager


def activations_row(s: Step, notes: Notes) -> Row:
    """The decoder's activations (``activations``), under the set-up's gradient checkpointing."""
    shape, setup = s.shape, s.setup
    if setup.attn == "eager":
        notes.append("eager attention keeps heads x seq^2 probabilities per layer; use sdpa or flash_attention_2")
    detail = (f"{s.tokens:,} tokens x {shape.layers} layers x {_per_layer(s) / 1e3:.1f} kB"
              + (" (checkpointed: layer inputs + 1 layer)" if setup.gradient_checkpointing else "")
              + (", KV heads repeated for sdpa" if s.kv_expanded else ""))
    if setup.sequence_parallel_size > 1:
        detail += f"; this GPU's chunk: 1/{setup.sequence_parallel_size} of each sample's {s.seq:,} tokens"
    if shape.linear_layers:
        detail += (f"; {shape.linear_layers} Gated DeltaNet layers: "
                   + ("flash-linear-attention" if setup.uses_linear_kernels else "PyTorch path"))
    return Row("activations", activations(s, setup.gradient_checkpointing), detail)


def linear_state_row(s: Step, notes: Notes) -> Row | None:
    """Qwen3.5: the Gated DeltaNet recurrent states, one per chunk: of one layer with flash-linear-attention (which
    recomputes them in backward), of every layer on the PyTorch path (which keeps them)."""
    shape, setup = s.shape, s.setup
    if not shape.linear_layers:
        return None
    states = delta_rule_bytes(shape, s.a, setup, s.seq)[1]
    kept = not setup.uses_linear_kernels
    held = setup.batch_size * states * (shape.linear_layers if kept and not setup.gradient_checkpointing else 1)
    return Row(
        "linear-attention state", held,
        f"recurrent state {shape.linear_heads[1]}x{shape.linear_heads[2]}x{shape.linear_heads[3]} fp32 "
        f"({4 * shape.recurrent_state / 1e6:.2f} MB) + conv state {shape.conv_state:,} per sequence and layer; "
        + (f"flash-linear-attention holds one per {DELTA_CHUNK}-token chunk of one layer, recomputed in backward"
           if setup.uses_linear_kernels else f"the PyTorch path keeps one per {DELTA_CHUNK}-token chunk of every "
           "layer for backward"))


def expert_lora_note(s: Step, notes: Notes) -> None:
    """LoRA on MoE experts: no row of its own (the folded stacks are in the activations), a note."""
    if s.expert_lora:
        shape = s.shape
        notes.append(f"LoRA on the MoE experts: PEFT folds W + BA into a new expert stack on every forward, kept for "
                     f"backward: {shape.expert_params * s.p / GB:.1f} GB over all layers without gradient "
                     f"checkpointing ({shape.expert_params * s.p / shape.layers / GB:.2f} GB per layer with it); in "
                     "activations")


def vision_row(s: Step, notes: Notes) -> Row:
    """The vision tower's and merger's activations when they train (frozen: only their output)."""
    shape, setup, a = s.shape, s.setup, s.a
    v_tokens = s.vision_tokens
    patches = 4 * v_tokens * setup.batch_size
    merger_trains = setup.mode in ("full", "lora_vision")
    merger = v_tokens * setup.batch_size * 4 * shape.vision_hidden * (LAYER_NORM_UPCAST + 3 * a)
    merger *= 1 + shape.deepstack
    if setup.mode == "lora_vision":
        block = vision_block_bytes(shape, a, False, shape.lora_block[setup.mode], setup)
        tower = patches * (shape.vision_depth * block if not setup.gradient_checkpointing
                           else shape.vision_depth * a * shape.vision_hidden + block)
        detail = f"tower trains: {patches:,} patches x {shape.vision_depth} blocks + merger"
    else:
        tower = 0.0
        detail = "tower frozen: nothing kept" + (" but the merger's activations" if merger_trains else "")
    vision = tower + (merger if merger_trains else 0.0) + v_tokens * setup.batch_size * shape.hidden * a
    if setup.sequence_parallel_size > 1:
        detail += "; whole on every GPU of the sequence-parallel group (features placed before the split)"
    return Row("vision", vision, f"{v_tokens:,} vision tokens per sample; {detail}")


def _liger_chunk(s: Step) -> int:
    """Rows of one chunk of Liger's fused linear cross-entropy: ``ceil(T / ceil(V / H))``, up to a power of two."""
    inc = math.ceil(s.shape.vocab / s.shape.hidden)
    return 2 ** math.ceil(math.log2(max(math.ceil(s.tokens / inc), 1)))


def logits_bytes(s: Step, liger: bool) -> float:
    """Model-dtype logits + fp32 log-probabilities + their fp32 gradient; with Liger one chunk of logits, the
    input's gradient and lm_head's gradient when it trains."""
    shape = s.shape
    if not liger:
        return s.tokens * shape.vocab * (s.a + 4 + 4)
    fused = s.a * _liger_chunk(s) * shape.vocab + s.a * s.tokens * shape.hidden
    return fused + (s.p * shape.vocab * shape.hidden if s.setup.mode == "full" else 0)


def logits_row(s: Step, notes: Notes) -> Row:
    """The logits and the loss (``logits_bytes``)."""
    return Row("logits + loss", logits_bytes(s, s.setup.liger),
               f"Liger fused CE: chunks of {_liger_chunk(s):,} rows" if s.setup.liger
               else f"{s.tokens:,} x {s.shape.vocab:,} logits: model dtype + fp32 log-probs + fp32 gradient")


def mask_row(s: Step, notes: Notes) -> Row:
    """The 4-D bool mask sdpa / eager get with padding or packing."""
    mask = s.setup.batch_size * s.seq * s.seq if s.kv_expanded else 0
    return Row("attention mask", mask, "4-D bool mask built once per step" if mask
               else "none (flash-attn, or one unpadded row)")


ROWS: tuple[Callable[[Step, Notes], Row | None], ...] = (
    weights_row, lora_row, gradients_row, optimizer_row, temporaries_row, activations_row, linear_state_row,
    expert_lora_note, vision_row, logits_row, mask_row,
)
"""The rows of the table, in order (``expert_lora_note`` adds a note and no row)."""


def estimate(model: str | None, setup: Setup, shape: ModelShape | None = None) -> Estimate:
    """The itemised per-GPU estimate for ``model`` (see ``load_config``) under ``setup``."""
    setup.check()
    if shape is None:
        shape = model_shape(load_config(model))
    if setup.quantized and shape.experts:
        raise ConfigError(f"--bits {setup.bits}: vlmtune refuses QLoRA for MoE models (bitsandbytes leaves the fused "
                          "experts unquantized and PEFT upcasts them to fp32)")
    if setup.sequence_parallel_size > 1 and (shape.linear_layers or shape.heads % setup.sequence_parallel_size):
        raise ConfigError(f"--sequence_parallel_size {setup.sequence_parallel_size}: the model has linear-attention "
                          f"layers or {shape.heads} heads that it does not divide")
    step = Step.of(shape, setup)
    notes: Notes = []
    rows = {row.name: row for row in (row_of(step, notes) for row_of in ROWS) if row is not None}
    alternatives = {
        "activations without checkpointing": activations(step, False),
        "activations with checkpointing": activations(step, True),
        "logits without Liger": logits_bytes(step, False), "logits with Liger": logits_bytes(step, True),
    }
    return Estimate(model or "tiny", step.setup, shape, rows, alternatives, notes)


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
    parser.add_argument("--sequence_parallel_size", type=int, default=d.sequence_parallel_size,
                        help="GPUs sharing each sample's tokens (Ulysses): the decoder's activations and the logits "
                        "split N ways; the vision tower stays whole on every GPU")
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
