"""The training engines beside DeepSpeed: FSDP2 through the Trainer's own ``--fsdp`` / ``--fsdp_config`` flags.

accelerate 1.16 turns its FSDP plugin on only for GPU-like multi-device runs: on CPU (gloo) it would silently run
DDP instead. torch's ``fully_shard`` itself runs on a CPU device mesh over gloo, so on CPU the plugin is put back
into the accelerator's state here, and the run is the same FSDP2 run as on GPUs (what the CPU tests check).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def enable_fsdp_on_cpu(trainer) -> None:
    """After the Trainer built its accelerator: on a CPU multi-process run with ``--fsdp``, switch the accelerator
    from the DDP accelerate fell back to onto FSDP (the plugin the Trainer built from ``--fsdp_config``)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    args, state = trainer.args, trainer.accelerator.state
    if args.fsdp_plugin_args and state.distributed_type == DistributedType.NO:
        logger.warning("--fsdp: one process has nothing to shard; this run trains without FSDP")
    if not args.fsdp_plugin_args or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if state.mixed_precision != "no":  # what accelerate's GPU branch does: FSDP casts parameters for the forward
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    # Every AcceleratorState() copies PartialState's fields back in: set it there too, as accelerate does for GPUs.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    logger.info("FSDP%d on CPU over gloo (accelerate would fall back to DDP here)", plugin.fsdp_version)


def cast_state_dict(state_dict: dict, dtype) -> dict:
    """A gathered state dict with its floating tensors in ``dtype`` (the end of a full FSDP run: the folder is the
    model in its training dtype, while FSDP keeps fp32 masters of what trains)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
