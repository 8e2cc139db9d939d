"""The training half of sequence parallelism (``--sequence_parallel_size N``, SFT and DPO): how a group of N
processes trains on the batches the Trainer hands them (the model half, the split and Ulysses, is
``vlmtune.model.sequence_parallel``).

The Trainer's data loader gives each process its own batch, as in any data-parallel run. A group of N processes
then trains on its N batches one after the other, each batch split across the whole group (as DeepSpeed's
``UlyssesSPDataLoaderAdapter`` does for text models, here with the vision tensors too): every rank receives the
whole batch (media included), so each optimizer step sees the same batches, in the same number of steps, as
the plain data-parallel run.

The loss weights tokens as the Trainer does without sequence parallelism: by default
(``average_tokens_across_devices``) every target of the optimizer step, over all processes and accumulation
steps, counts once (the Trainer's ``num_items_in_batch``): each rank's chunk contributes its summed token loss
over that count, times the number of processes, which DDP's mean over processes takes back. Without that
setting, each micro-step is the token-weighted mean over the group's N batches. Either way the contributions of a
group's ranks add up to the loss of its batches and their gradients, summed by DDP, to its gradients.

DPO (``policy_training_step``): a pair's loss needs each sequence's whole log-probability, so the chunks'
per-row sums (policy and reference) are added up over the group before the loss (``sp.group_log_prob_sums``),
and every rank of the group computes the loss of each of the group's batches.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from vlmtune.errors import ConfigError
from vlmtune.model import sequence_parallel as sp

logger = logging.getLogger(__name__)

RECORDS = "_records"
STAGES = ("sft", "dpo")
REASONS = {
    "grpo": "its sampling generates one token at a time, which cannot be split across the group",
    "distill": "its teacher's forward and its on-policy sampling are not split across the group",
    "reward_model": "its score head reads the hidden state at each reply's end-of-turn token, held by one rank of "
                    "the group",
}
"""Why the other policy stages refuse ``--sequence_parallel_size`` (one sentence each)."""


def check(size: int, train_args, model_args, data_args, config, model_type: str, stage: str = "sft") -> None:
    """Everything ``--sequence_parallel_size`` cannot run with stops here, as one line, before the model loads."""
    if size <= 1:
        return
    if stage not in STAGES:
        raise ConfigError(f"--sequence_parallel_size {size} with {stage}: sequence parallelism is wired for SFT "
                          f"and DPO only ({REASONS[stage] if stage in REASONS else 'not built for this stage'}); "
                          "train this stage without it")
    if train_args.eval_generate:
        raise ConfigError(f"--sequence_parallel_size {size} with --eval_generate: generation runs one token at a "
                          "time, which cannot be split across the group; evaluate with the eval loss only")
    engine = "--deepspeed" if train_args.deepspeed else "--fsdp" if train_args.fsdp else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sp.check(size, world, config, model_type, packing=data_args.packing, engine=engine,
             attn_implementation=model_args.attn_implementation)


def start(model, family, size: int, reference=None) -> sp.Group:
    """Build the groups and route the model's language model through Ulysses, and a frozen ``reference`` copy's
    too (DPO's full runs), so that its forwards split as the policy's (``torch.distributed`` must be started:
    reading ``TrainingArguments.device`` starts it)."""
    group = sp.init_group(size)
    for each in (model, reference) if reference is not None else (model,):
        base = each.get_base_model() if hasattr(each, "get_base_model") else each
        sp.install(base, base.get_submodule(family.language_model), group, base.config._attn_implementation)
    if family.is_moe:
        logger.warning("--sequence_parallel_size: the MoE routers' load-balancing loss is off (it is not additive "
                       "over chunks of a sequence); only the token loss trains")
    logger.info("sequence parallel: groups of %d processes, each record's tokens split across its group", size)
    return group


def stop(trainer) -> None:
    """Release the sequence-parallel group (before the process groups are destroyed): Ulysses' kernel out of
    transformers' attention table, the group's process group out of the trainer's ``Group``."""
    if trainer.sp_group is not None:
        sp.uninstall(trainer.sp_group)
        trainer.sp_group = None


def exchange(inputs: dict, group: sp.Group) -> list[dict]:
    """The N batches of the group, in group-rank order: each rank's whole batch, sent to every other rank."""
    dist = torch.distributed
    batches = []
    for k in range(group.size):
        box = [inputs if group.rank == k else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group.process_group, k), group=group.process_group)
        batches.append(box[0])
    return batches


def training_step(trainer, model, inputs: dict, records: list[str], num_items_in_batch=None) -> torch.Tensor:
    """One micro-step of the group: its N batches forward and backward in turn, each split across the group;
    returns this rank's share of the loss (the Trainer's mean over processes logs the loss)."""
    group = trainer.sp_group
    model.train()
    batches = exchange({**inputs, RECORDS: records}, group)
    if num_items_in_batch is not None and trainer.args.average_tokens_across_devices:
        total, scale = int(num_items_in_batch), trainer.accelerator.num_processes
    else:
        total = sum(sp.count_targets(b["labels"]) for b in batches)
        scale = group.size / trainer.current_gradient_accumulation_steps
    reported = torch.zeros((), device=trainer.args.device)
    for k, batch in enumerate(batches):
        names = batch.pop(RECORDS)
        targets = sp.local_targets(batch.pop("labels"), group, names)
        batch = trainer._prepare_inputs(batch)
        with trainer.compute_loss_context_manager():
            logits = model(**batch, use_cache=False).logits
        loss = sp.chunk_loss(logits, targets, total) * scale
        backward(trainer, model, loss, last=k == group.size - 1)
        reported += loss.detach()
    return reported


def backward(trainer, model, loss: torch.Tensor, last: bool) -> None:
    """The backward of one of the group's batches; ``last``: the group's last batch of this micro-step. The
    gradients are averaged over every process of the run, the engine's data-parallel group (the loss scales
    above count on that mean): DDP reduces once, after the last batch (``no_sync`` before it). DeepSpeed's ZeRO
    reduces at every backward and steps at the accumulation boundary, which the Trainer set for the micro-step:
    only the group's last batch may reach it; the loss is already scaled for accumulation, as the Trainer's own
    DeepSpeed step does (``scale_wrt_gas=False``)."""
    accelerator = trainer.accelerator
    if not trainer.is_deepspeed_enabled:
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            accelerator.backward(loss)
        return
    boundary = accelerator.sync_gradients
    accelerator.sync_gradients = boundary and last
    try:
        accelerator.backward(loss, scale_wrt_gas=False)
    finally:
        accelerator.sync_gradients = boundary


def eval_loss(trainer, model, inputs: dict) -> torch.Tensor:
    """The eval loss of this rank's own batch, computed by the whole group (every rank takes part for every
    batch of the group)."""
    group = trainer.sp_group
    own = None
    with torch.no_grad():
        for k, batch in enumerate(exchange(inputs, group)):
            labels = batch.pop("labels")
            targets = sp.local_targets(labels, group)
            logits = model(**trainer._prepare_inputs(batch), use_cache=False).logits
            loss = sp.chunk_loss(logits, targets, sp.count_targets(labels))
            torch.distributed.all_reduce(loss, group=group.process_group)
            if k == group.rank:
                own = loss
    return own


def policy_training_step(trainer, model, inputs: dict) -> torch.Tensor:
    """One micro-step of a policy stage's group (DPO): its N batches forward and backward in turn, each split
    across the group. Every rank of the group computes the same loss of a batch (from log-probability sums
    added up over the group, ``sp.group_log_prob_sums``), whose backward hands each chunk the group's N equal
    gradients summed: each loss is scaled by 1 / N, and by the accumulation steps as the Trainer scales a
    per-batch mean, so that DDP's mean over processes gives the plain data-parallel step. Returns this rank's
    share of the logged loss (the group's mean batch loss)."""
    group = trainer.sp_group
    model.train()
    scale = 1 / (group.size * trainer.current_gradient_accumulation_steps)
    reported = torch.zeros((), device=trainer.args.device)
    for k, batch in enumerate(exchange(inputs, group)):
        batch = trainer._prepare_inputs(batch)
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, batch) * scale
        backward(trainer, model, loss, last=k == group.size - 1)
        reported += loss.detach()
    return reported


def policy_eval_loss(trainer, model, inputs: dict) -> torch.Tensor:
    """A policy stage's eval loss of this rank's own batch, computed by the whole group (every rank takes part
    in every batch of the group)."""
    group = trainer.sp_group
    own = None
    with torch.no_grad(), trainer.compute_loss_context_manager():
        for k, batch in enumerate(exchange(inputs, group)):
            loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
            if k == group.rank:
                own = loss
    return own
