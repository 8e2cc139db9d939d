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
* activations: what autograd saves per token in a decoder layer (see ``layers.layer_bytes``: softmax or Gated DeltaNet
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

The package: ``shapes`` (the model's exact shapes and the training ``Setup``), ``layers`` (what autograd keeps per
token in each kind of layer), ``estimate`` (one function per row, the table, ``vlmtune estimate-memory``).
"""

from vlmtune.memory.estimate import GB, NF4_BYTES, ROWS, Estimate, Row, Step, estimate, format_count, main
from vlmtune.memory.shapes import KNOWN_MODELS, PRECISIONS, ModelShape, Setup, load_config, model_shape, vision_tokens

__all__ = ["GB", "KNOWN_MODELS", "NF4_BYTES", "PRECISIONS", "ROWS", "Estimate", "ModelShape", "Row", "Setup", "Step",
           "estimate", "format_count", "load_config", "main", "model_shape", "vision_tokens"]
