"""ZeRO-3 and model construction: transformers partitions every model it builds inside a ZeRO-3 run; and whether a
weight is whole or a shard."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def whole_weights():
    """Build or load models with whole weights even inside a ZeRO-3 run: transformers would otherwise partition
    them through the run's DeepSpeed config (save_pretrained would then write empty shards, and weights could not
    be merged)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def is_shard(param) -> bool:
    """Whether ``param`` holds a piece of its weight (a DeepSpeed ZeRO-3 partition, or an FSDP2 ``DTensor``), not
    the whole: the levers that call parts of a model directly or copy its weights need whole ones."""
    return hasattr(param, "ds_id") or type(param).__name__ == "DTensor"
