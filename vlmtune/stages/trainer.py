"""``VisionLanguageTrainer``: the Hugging Face ``Trainer`` every stage trains with.

The ``Trainer`` brings DeepSpeed, FSDP, resume, evaluation, logging and multi-node launch.
``VisionLanguageTrainer`` adds only what it lacks: our parameter groups, length grouping from lengths known
without decoding media, saving just what trains (through ``vlmtune.run``), per-group learning rates and
throughput in the logs, and what a run needs to survive faults:

* checkpoints written atomically (``tmp-checkpoint-N``, renamed once every rank has written its part), and
  rotated only among complete ones;
* SIGTERM (a scheduler's preemption) saves a checkpoint at the next step boundary and stops the run;
* a NaN or inf loss stops the run naming the step and the batch's records, or (``--on_nan_loss skip``) skips
  that optimizer step.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from vlmtune import checkpoints, run
from vlmtune.data import packing
from vlmtune.errors import NonFiniteLoss
from vlmtune.families import Family
from vlmtune.model import modes
from vlmtune.model.hub_layout import write_hub_layout
from vlmtune.stages import callbacks, engines
from vlmtune.stages import sequence_parallel as sp_stage
from vlmtune.stages.saving import save_failed

logger = logging.getLogger(__name__)


RECORD_IDS = "vlmtune_records"
"""Batch key of the records a batch holds (``record N (id 'x')``), removed before the forward."""


def _records_of(dataset, i: int) -> list[str]:
    """The records behind item ``i`` of a dataset (a pack holds several)."""
    if hasattr(dataset, "packs"):
        return [r for j in dataset.packs[i] for r in _records_of(dataset.dataset, j)]
    records = getattr(dataset, "records", None)
    return [f"record {records[i].index} (id {records[i].id!r})"] if records is not None else []


class WithRecords(Dataset):
    """A dataset whose items also say which records they come from (for error messages)."""

    def __init__(self, dataset):
        self.dataset = dataset
        if hasattr(dataset, "lengths"):
            self.lengths = dataset.lengths

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i], _records_of(self.dataset, i)


class CollateWithRecords:
    """Wraps a collator for ``WithRecords`` items: the batch carries the records under ``RECORD_IDS``."""

    def __init__(self, collator):
        self.collator = collator
        self.pad_token_id = getattr(collator, "pad_token_id", None)

    def __call__(self, pairs):
        batch = self.collator([item for item, _ in pairs])
        batch[RECORD_IDS] = [record for _, records in pairs for record in records]
        return batch


def _any_rank(flag: bool, device) -> bool:
    """Whether ``flag`` is set on any process (a collective: every rank must call it at the same point)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _sum_over_ranks(values: list[int], device) -> list[int]:
    """``values`` summed over the processes (a collective: every rank must call it at the same point)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    total = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return total.tolist()


class _StopOnSignal(TrainerCallback):
    """At the first step boundary after SIGTERM reached any rank: save a checkpoint and stop, on every rank."""

    def __init__(self):
        self.signum: int | None = None
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.signum is not None, args.device):
            self.signum = self.signum or signal.SIGTERM
            self.stopped_at = state.global_step
            control.should_save = control.should_training_stop = True
            logger.warning("%s: saving checkpoint-%d, then stopping", signal.Signals(self.signum).name,
                           state.global_step)
        return control


class VisionLanguageTrainer(Trainer):
    """``Trainer`` with part-wise parameter groups, length grouping, trainable-only saving, atomic checkpoints,
    a clean stop on SIGTERM and a check of every loss."""

    def __init__(self, *args, family: Family, run_info: dict, on_nan_loss: str = "stop", eval_generator=None,
                 sequence_parallel=None, **kwargs):
        for key in ("train_dataset", "eval_dataset"):
            if isinstance(kwargs.get(key), Dataset):
                kwargs[key] = WithRecords(kwargs[key])
        if kwargs.get("data_collator") is not None:
            kwargs["data_collator"] = CollateWithRecords(kwargs["data_collator"])
        super().__init__(*args, **kwargs)
        self.family = family
        self.run_info = run_info
        self.on_nan_loss = on_nan_loss
        self.eval_generator = eval_generator  # stages.eval_generate.EvalGenerator (--eval_generate)
        self.sp_group = sequence_parallel  # model.sequence_parallel.Group (--sequence_parallel_size > 1)
        callbacks.install(self)
        self._tokens_seen = self._samples_seen = 0  # this process's real (non-padding) tokens and records since
        self._last_log = time.perf_counter()  # the last training log line, when it was written
        self._staging: str | None = None  # where _save_checkpoint writes before publishing
        self._nonfinite: list[str] = []  # the micro-batches of this step whose loss was NaN or inf (skip mode)
        self._stop = _StopOnSignal()
        self.add_callback(self._stop)
        self._aux_losses: list[torch.Tensor] = []  # MoE: the routers' load-balancing loss of each step since the log
        if family.is_moe:
            logger.info("MoE: the routers' load-balancing loss is on, added to the loss at router_aux_loss_coef %g "
                        "(the model's text_config) and logged as aux_loss",
                        self.model.config.get_text_config().router_aux_loss_coef)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        engines.enable_fsdp_on_cpu(self)  # sp: FSDP2 hook (vlmtune/stages/engines.py)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            args = self.args
            groups = modes.parameter_groups(
                self.model, self.family, args.learning_rate, args.weight_decay, args.vision_lr, args.merger_lr
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, self.model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            if self.on_nan_loss == "skip":
                self.optimizer.register_step_pre_hook(self._skip_nonfinite_step)
        return self.optimizer

    # ---------------------------------------------------------------- a stop on SIGTERM

    @property
    def stopped(self) -> tuple[int, int] | None:
        """(signal, step) when a signal stopped the run, after its checkpoint was saved."""
        return (self._stop.signum, self._stop.stopped_at) if self._stop.stopped_at is not None else None

    def train(self, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            return super().train(*args, **kwargs)

        def on_sigterm(signum, frame):  # only a flag: a handler that writes can interrupt a write to the same stream
            self._stop.signum = signum

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            return super().train(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    # ---------------------------------------------------------------- losses that are not finite

    def _skip_nonfinite_step(self, optimizer, args, kwargs) -> None:
        """Before the optimizer steps: if any rank saw a NaN / inf loss in this step, drop every gradient, so the
        step changes no weight and no optimizer state (the learning-rate schedule moves on)."""
        if _any_rank(bool(self._nonfinite), self.args.device):
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
        self._nonfinite = []

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.group_by_length and hasattr(dataset, "lengths"):
            size = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(size, lengths=dataset.lengths)
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        # The Trainer would infer eval lengths by reading every item (decoding all media), and cannot for packs.
        if self.args.group_by_length and hasattr(eval_dataset, "lengths"):
            return LengthGroupedSampler(self.args.eval_batch_size, lengths=eval_dataset.lengths)
        return super()._get_eval_sampler(eval_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        records = inputs.pop(RECORD_IDS, [])
        pad_id = getattr(self.data_collator, "pad_token_id", None)  # packed batches carry no attention_mask
        self._samples_seen += packing.count_samples(inputs, pad_id)
        self._tokens_seen += packing.count_tokens(inputs, pad_id)
        if self.sp_group is not None:
            loss = self.sequence_parallel_step(model, inputs, records, num_items_in_batch)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self._nonfinite_loss(float(loss.float().sum()), records)
        return loss

    def sequence_parallel_step(self, model, inputs, records: list[str], num_items_in_batch=None) -> torch.Tensor:
        """One micro-step of the sequence-parallel group (SFT's token loss; a policy stage has its own)."""
        return sp_stage.training_step(self, model, inputs, records, num_items_in_batch)

    def _nonfinite_loss(self, value: float, records: list[str]) -> None:
        step = self.state.global_step + 1
        where = f" (rank {self.args.process_index})" if self.args.world_size > 1 else ""
        batch = f"{', '.join(records[:20])}{f' and {len(records) - 20} more' if len(records) > 20 else ''}"
        if self.on_nan_loss == "skip":
            logger.warning("step %d: the loss is %s on %s%s: this step is skipped (--on_nan_loss skip)", step, value,
                           batch, where)
            self._nonfinite += records
            return
        raise NonFiniteLoss(f"step {step}: the loss is {value} on the batch of {batch}{where}; lower --learning_rate "
                            "or check those records, or pass --on_nan_loss skip to skip such steps")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop(RECORD_IDS, None)
        if self.sp_group is not None:
            return sp_stage.eval_loss(self, model, inputs), None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self.family.is_moe and model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The forward kwarg, not text_config.output_router_logits: Liger's replacement forward reads only the kwarg.
        loss, outputs = super().compute_loss(model, {**inputs, "output_router_logits": True}, True, num_items_in_batch)
        if outputs.get("aux_loss") is not None:
            self._aux_losses.append(outputs["aux_loss"].detach().float())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._aux_losses:  # this process's steps since the last log (rank 0 writes the logs)
            logs["aux_loss"] = round(float(torch.stack(self._aux_losses).mean()), 6)
            self._aux_losses.clear()
        if "loss" in logs and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                logs[f"lr/{group.get('name', 'group')}"] = group["lr"]
            # The whole job's throughput: every rank's counts since the last log line, summed (every rank logs here)
            tokens, samples = _sum_over_ranks([self._tokens_seen, self._samples_seen], self.args.device)
            now = time.perf_counter()
            elapsed = max(now - self._last_log, 1e-9)
            logs["tokens_per_s"] = round(tokens / elapsed, 1)
            logs["samples_per_s"] = round(samples / elapsed, 3)
            self._tokens_seen = self._samples_seen = 0
            self._last_log = now
            if self.args.include_num_input_tokens_seen == "no":  # else the Trainer counts them its own way
                self.state.num_input_tokens_seen += tokens  # the job's real tokens, kept in trainer_state.json
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        if self.eval_generator is not None:  # task metrics join the eval loss before they are logged and compared
            # generate() reaches the inner model's forward, not the one accelerate wrapped in autocast: fp32 master
            # weights beside half-precision frozen ones need the autocast here
            with self.accelerator.autocast():
                output.metrics.update(self.eval_generator(self.model, metric_key_prefix, self.is_world_process_zero()))
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        final_full = not _internal_call and not self.run_info.get("lora") and not self.is_deepspeed_enabled
        if final_full and not self.is_fsdp_enabled:
            # The end of a full run: its folder is the model, so the fp32 masters go back to the training dtype.
            # (Checkpoints keep them in fp32, so a resumed run continues exactly.)
            modes.cast_trained(self.model, getattr(torch, self.run_info["dtype"]))
        self._save_dtype = getattr(torch, self.run_info["dtype"]) if final_full and self.is_fsdp_enabled else None
        super().save_model(output_dir, _internal_call)
        if not _internal_call and not self.run_info.get("lora") and self.args.should_save:
            write_hub_layout(output_dir or self.args.output_dir, self.family)  # a model folder, as the hub's

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is not None and getattr(self, "_save_dtype", None) is not None:
            state_dict = engines.cast_state_dict(state_dict, self._save_dtype)  # FSDP: the gathered masters
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            run.save_run_files(output_dir or self.args.output_dir, self.model, self.run_info, state_dict)

    # ---------------------------------------------------------------- atomic checkpoints

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written by every rank into ``tmp-checkpoint-N/checkpoint-N`` (its own
        rotation sees only that folder), then renamed to ``checkpoint-N`` once all ranks are done, then rotated."""
        run_dir = Path(self._get_output_dir(trial))
        final = checkpoints.checkpoint_dir(run_dir, self.state.global_step)
        staging = checkpoints.staging_dir(run_dir, self.state.global_step)
        staged = staging / final.name
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a killed save of this step left
        self.accelerator.wait_for_everyone()
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:
            error = save_failed(exc, final.name, run_dir)
            if error is None:
                raise
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise error from None
        finally:
            self._staging = None
        if self.state.best_model_checkpoint == str(staged):  # the Trainer named the folder it wrote
            self.state.best_model_checkpoint = str(final)
            if self.args.should_save:
                self.state.save_to_json(str(staged / run.TRAINER_STATE))
        self.accelerator.wait_for_everyone()  # every rank's files (DeepSpeed shards, RNG states) are written
        if self.args.should_save:
            checkpoints.publish_checkpoint(staged, final)
            checkpoints.rotate_checkpoints(run_dir, self.args.save_total_limit, final, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.run_info.get("lora") and not self.is_fsdp_enabled:  # FSDP's own checkpoint holds every weight
            run.restore_non_lora_trainables(resume_from_checkpoint, model or self.model)
