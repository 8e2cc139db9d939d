"""What autograd keeps for backward, per token, in each kind of layer: the formulas of the activation rows.

Written from what transformers 5.22 (Qwen2 / Qwen2.5 / Qwen3 / Qwen3.5 text layers and vision blocks), PEFT and
torch do in a step; ``a`` is the bytes of one activation element, ``base_trains`` whether the layer's own weights
train (a frozen linear keeps no input).
"""

from __future__ import annotations

import math

from vlmtune.memory.shapes import ModelShape, Setup

LAYER_NORM_UPCAST = 4
"""Qwen RMSNorm upcasts its input to fp32 and keeps that copy for backward."""


def dtype_bytes(setup: Setup) -> tuple[int, int]:
    """(bytes per weight of the loaded model, bytes per activation)."""
    return {"bf16": (2, 2), "pure_bf16": (2, 2), "amp": (4, 2), "fp32": (4, 4)}[setup.precision]


_QK_NORM = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
"""Families whose attention normalises q and k per head (RMSNorm)."""
_GATED_ATTENTION = ("qwen3_5", "qwen3_5_moe")
"""Qwen3.5: q_proj also gives a sigmoid output gate per head; q_norm sees a view of that double-width output."""
DELTA_CHUNK = 64
"""Chunk length of the Gated DeltaNet kernels (transformers' PyTorch path and flash-linear-attention alike)."""


def layer_bytes(shape: ModelShape, a: int, base_trains: bool, kv_expanded: bool, lora: tuple[int, int],
                 setup: Setup, experts_train: bool = False) -> float:
    """Bytes autograd keeps per token in one decoder layer (HF Qwen2 / Qwen3 / Qwen3.5 text layers, sdpa or flash),
    averaged over the layers: token mixer + MLP + the two RMSNorms.

    Always: both RMSNorms' fp32 upcast input, the token mixer's (``attention_bytes``, ``linear_attention_bytes``)
    and the MLP's (``mlp_bytes``). When the layer's own weights train (full): the norms' normalised copies and the
    linears' inputs (a frozen linear keeps no input). Each LoRA'd linear adds its own (see ``lora_bytes``).
    """
    h = shape.hidden
    norms = 2 * LAYER_NORM_UPCAST * h + (2 * a * h if base_trains else 0)
    mixer = (shape.full_layers * attention_bytes(shape, a, base_trains, kv_expanded)
             + shape.linear_layers * linear_attention_bytes(shape, a, base_trains)) / shape.layers
    return norms + mixer + mlp_bytes(shape, a, base_trains, experts_train) + lora_bytes(lora, a, setup)


def attention_bytes(shape: ModelShape, a: int, base_trains: bool, kv_expanded: bool) -> float:
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


def linear_attention_bytes(shape: ModelShape, a: int, base_trains: bool) -> float:
    """Per token, one Gated DeltaNet layer outside the delta-rule kernel: the causal convolution's input and
    output, beta, the decay's fp32 input, q and k L2-normalised in fp32 (at every value head), the gated RMSNorm's
    fp32 tensors. Trained: in_proj's and out_proj's inputs and the norm's copy. The kernel's own tensors depend on
    the sequence and its chunks: ``delta_rule_bytes``."""
    hk, hv, dk, dv = shape.linear_heads
    channels = 2 * hk * dk + hv * dv
    always = 2 * a * channels + a * hv + 4 * hv + 8 + 2 * 4 * hv * (dk + 1) + 4 * (4 * hv * dv + hv)
    trained = a * (shape.hidden + hv * dv) + 4 * hv * dv if base_trains else 0
    return always + trained


def delta_rule_bytes(shape: ModelShape, a: int, setup: Setup, seq: int) -> tuple[float, float]:
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


def mlp_bytes(shape: ModelShape, a: int, base_trains: bool, experts_train: bool) -> float:
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


def lora_bytes(lora: tuple[float, float, float], a: int, setup: Setup) -> float:
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


def vision_block_bytes(shape: ModelShape, a: int, base_trains: bool, lora: tuple[int, int], setup: Setup) -> float:
    """Bytes autograd keeps per patch in one vision block when the tower trains: the norms' inputs (fp32 upcast
    for Qwen2.5-VL's RMSNorm), q, k, v and the attention output, the MLP activation's inputs (QuickGELU: x and
    sigmoid; SwiGLU: gate, SiLU, up; GELU: x) and, when the block's own weights train, the linears' inputs."""
    d, m = shape.vision_hidden, shape.vision_intermediate
    norm_in = LAYER_NORM_UPCAST if shape.model_type == "qwen2_5_vl" else a
    mlp = {"qwen2_vl": 2, "qwen2_5_vl": 3}.get(shape.model_type, 1) * a * m
    trained = a * (4 * d + m) if base_trains else 0
    return 2 * norm_in * d + 4 * a * d + mlp + trained + lora_bytes(lora, a, setup)
