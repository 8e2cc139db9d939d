"""The model half of packing: ready a loaded model for packed rows, and refuse what cannot keep records apart.

The data half (packs, the collator, M-RoPE positions per record) and how attention stays inside a record are in
``vlmtune.data.packing``.
"""

from __future__ import annotations

import torch

from vlmtune.data.packing import PackedCollator, PackedDataset, RopeIndex
from vlmtune.errors import ConfigError
from vlmtune.model.load import disable_kv_cache, has_linear_attention

BLOCK_MASK_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations that get an exact block-diagonal mask built from the restarting positions."""
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
"""Attention implementations that run packed rows padding-free through varlen kernels."""


def packing_layout(attn_implementation: str | None) -> str:
    """'padding_free' (flash-attn varlen) or 'block_mask' (sdpa / eager / flex); anything else is refused."""
    if attn_implementation in VARLEN_ATTENTION:
        return "padding_free"
    if attn_implementation in BLOCK_MASK_ATTENTION:
        return "block_mask"
    raise ConfigError(
        f"--packing cannot keep records apart with attention implementation {attn_implementation!r}: use "
        f"flash_attention_2 (padding-free, CUDA) or sdpa / eager (block-diagonal mask), or drop --packing"
    )


def check_packable(config) -> None:
    """Refuse packing for models whose layers would carry state from one packed record into the next."""
    if has_linear_attention(config):
        raise ConfigError(f"--packing is not supported for {config.model_type}: its linear-attention (Gated DeltaNet) "
                          "layers carry a convolution and a recurrent state from one packed record into the next "
                          "(transformers restarts them only with CUDA kernels and sequence boundaries this packer "
                          "does not give), so packed records would not train as they do alone; drop --packing "
                          "(--group_by_length cuts padding instead)")


def prepare_model(model) -> str:
    """Make a loaded model ready for packed batches; returns its layout ('padding_free' or 'block_mask').

    Refuses models and attention implementations that cannot keep records apart, and turns the KV cache off: a cache,
    even an empty one, stops the mask builder from seeing the packed boundaries, so records would silently
    attend to each other.
    """
    check_packable(model.config)
    layout = packing_layout(getattr(model.config, "_attn_implementation", None))
    disable_kv_cache(model)
    return layout


def packed_data(train_set, eval_set, model, pad_token_id: int, max_seq_length: int,
                fillers: dict[str, dict[str, torch.Tensor]] | None = None):
    """(packed train set, packed eval set or None, collator) for a loaded model; refuses what cannot be exact."""
    config = model.config
    layout = prepare_model(model)
    collator = PackedCollator(pad_token_id, RopeIndex(config), padding_free=layout == "padding_free",
                              fillers=fillers)
    train = PackedDataset(train_set, max_seq_length)
    evaluation = PackedDataset(eval_set, max_seq_length) if eval_set is not None else None
    return train, evaluation, collator
