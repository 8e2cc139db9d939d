"""The end every stage shares: one run per output folder (``output_lock``), and ``fit``: train, evaluate, save,
plot, summarise, and leave together; ``close_process_groups``: the process groups' end, after the command."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from vlmtune import checkpoints
from vlmtune.config import TrainingArguments
from vlmtune.errors import Stopped
from vlmtune.stages import callbacks
from vlmtune.stages import sequence_parallel as sp_stage
from vlmtune.stages.saving import save_failed
from vlmtune.stages.trainer import VisionLanguageTrainer

logger = logging.getLogger(__name__)


def output_lock(output_dir: str):
    """One run per output folder: the first process holds the lock until it ends, however it ends."""
    return checkpoints.RunLock(output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()


def fit(trainer: VisionLanguageTrainer, train_args: TrainingArguments, eval_set, resume: str | None,
        started: float | None = None, predictions: Path | None = None) -> Path:
    """Train (from the checkpoint ``resume``, resolved by ``checkpoints.resolve_resume``), then evaluate a held-out
    split that has not reported yet, save the result and the state, draw the plots, log the end-of-run summary (time
    from ``started``) and leave together (``_leave_together``). A run stopped by SIGTERM raises ``Stopped`` saying
    how to resume."""
    started = started or time.time()
    trainer.train(resume_from_checkpoint=resume)
    if trainer.stopped:
        _leave_together(trainer)
        signum, step = trainer.stopped
        raise Stopped(f"stopped by {signal.Signals(signum).name} after step {step}, saved in "
                      f"{checkpoints.checkpoint_dir(train_args.output_dir, step)}; run the same command with "
                      "--resume_from_checkpoint last to continue", signum)
    if eval_set is not None and train_args.eval_strategy == "no":  # an eval split always reports, at least at the end
        trainer.evaluate()
    try:
        trainer.save_model(train_args.output_dir)
        trainer.save_state()
    except Exception as exc:
        error = save_failed(exc, "the trained model", Path(train_args.output_dir))
        if error is None:
            raise
        raise error from None
    logger.info("saved to %s", train_args.output_dir)
    if trainer.is_world_process_zero():
        from vlmtune.plots import plot_run

        try:
            plot = plot_run(train_args.output_dir)
        except Exception as exc:  # a plot must never fail a finished run
            logger.warning("could not draw the plots: %s", exc)
            plot = None
        logger.info("%s", callbacks.summary(trainer, started, train_args.output_dir, lora=trainer.run_info.get("lora"),
                                            plot=plot, predictions=predictions))
    _leave_together(trainer)
    return Path(train_args.output_dir)


def _leave_together(trainer: VisionLanguageTrainer) -> None:
    """Leave together: a barrier, then every reference this run keeps to its process groups is dropped, so that
    ``close_process_groups`` (once the stage has returned and the model is unreachable) frees them all: the
    sequence-parallel group and Ulysses' attention kernel (``sp_stage.stop``), the trainer's DeepSpeed engine and
    optimizer, and what DeepSpeed keeps of a ZeRO-3 model after its engine is gone (``_forget_zero3_models``)."""
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    sp_stage.stop(trainer)
    if trainer.is_deepspeed_enabled:  # the engine (its groups, ZeRO-3's hooks) and what refers to it
        trainer.accelerator.free_memory()
        trainer.model_wrapped = trainer.deepspeed = trainer.optimizer = trainer.lr_scheduler = None
        _forget_zero3_models()


def _forget_zero3_models() -> None:
    """DeepSpeed (0.19.8) keeps every model it wrapped for ZeRO-3, with its parameters' partitioning groups, for
    the life of the process, beyond ``engine.destroy()``: the top module in ``FWD_MODULE_STACK`` (its list of
    modules in forward: appended at wrap, never removed) and each parameter coordinator with its modules, in the
    class-wide cache of its ``__params_to_release`` (an ``lru_cache`` on a method, under an NVTX wrapper). Both
    are emptied: nothing runs a forward any more."""
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is None:
        return
    offload.FWD_MODULE_STACK.clear()
    cached = offload.PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
    for cell in cached.__closure__ or ():
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def close_process_groups() -> None:
    """Take the process groups down, deterministically, after a command has returned (``vlmtune.cli``): a gloo
    group still held when the interpreter exits is freed during finalization, in a different order on each rank,
    and a rank can then abort ("terminate called without an active exception"), failing a finished run. The
    stage's objects are unreachable by then (``_leave_together`` dropped what outlives them), so after a
    ``gc.collect`` (ZeRO-3's hooks hold the model in cycles) destroying the groups frees the last of them:
    DeepSpeed's ``destroy_process_group`` (torch's, and the references DeepSpeed keeps: its world group, its
    sequence-parallel groups) where DeepSpeed's comm started, else torch's."""
    if not torch.distributed.is_initialized():
        return
    gc.collect()
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()
