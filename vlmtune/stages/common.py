"""What every stage shares: the Trainer subclass, the checks of the environment, and the model set-up.

The Hugging Face ``Trainer`` brings DeepSpeed, FSDP, resume, evaluation, logging and multi-node launch.
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

import errno
import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler

from vlmtune import run
from vlmtune.config import DataArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data import media, packing
from vlmtune.data.check import check_data
from vlmtune.data.dataset import take
from vlmtune.errors import ConfigError, DataError, NonFiniteLoss, SaveError, Stopped
from vlmtune.families import Family
from vlmtune.model import modes
from vlmtune.model.load import (
    check_quantization,
    disable_kv_cache,
    dtype_name,
    load_family,
    load_model,
    resolve_model_path,
    torch_dtype,
)
from vlmtune.model.zero3 import whole_weights
from vlmtune.stages import callbacks

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


def _write_failure(exc: BaseException) -> str | None:
    """What went wrong, when ``exc`` is a failed write (a full disk, a quota, an I/O error), else None.

    torch.save reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos``,
    safetensors as ``SafetensorError: ... No space left on device (os error 28)`` (measured on a full tmpfs)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" or "inline_container" in text or "PytorchStreamWriter" in text:
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def _free_space(folder: Path) -> str:
    for path in (folder, *folder.parents):
        if path.exists():
            free = shutil.disk_usage(path).free
            for unit in ("B", "KiB", "MiB", "GiB"):
                if free < 1024 or unit == "GiB":
                    return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
                free /= 1024
    return "unknown"


def save_failed(exc: BaseException, what: str, folder: Path) -> SaveError | None:
    """The one-line error for a failed write of ``what`` into ``folder``, or None when ``exc`` is no write failure."""
    reason = _write_failure(exc)
    if reason is None:
        return None
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(exc)
    found = run.scan_checkpoints(folder).complete
    last = f"the last complete checkpoint is {found[-1][1]}" if found else "no checkpoint is complete yet"
    return SaveError(f"writing {what} failed: {reason} ({_free_space(folder)} free on the disk of {folder}); "
                         f"{last}. {'Free space' if full else 'Fix the disk'} or give another --output_dir, then "
                         "run the same command with --resume_from_checkpoint last")


class VisionLanguageTrainer(Trainer):
    """``Trainer`` with part-wise parameter groups, length grouping, trainable-only saving, atomic checkpoints,
    a clean stop on SIGTERM and a check of every loss."""

    def __init__(self, *args, family: Family, run_info: dict, on_nan_loss: str = "stop", eval_generator=None,
                 **kwargs):
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
        callbacks.install(self)
        self._tokens_seen = self._samples_seen = 0  # real (non-padding) tokens and records, for the rates
        self._last_log = (time.perf_counter(), 0, 0)  # time, tokens seen, samples seen
        self._staging: str | None = None  # where _save_checkpoint writes before publishing
        self._nonfinite: list[str] = []  # the micro-batches of this step whose loss was NaN or inf (skip mode)
        self._stop = _StopOnSignal()
        self.add_callback(self._stop)
        self._aux_losses: list[torch.Tensor] = []  # MoE: the routers' load-balancing loss of each step since the log
        if family.is_moe:
            logger.info("MoE: the routers' load-balancing loss is on, added to the loss at router_aux_loss_coef %g "
                        "(the model's text_config) and logged as aux_loss",
                        self.model.config.get_text_config().router_aux_loss_coef)

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
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self._nonfinite_loss(float(loss.float().sum()), records)
        return loss

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
            now, tokens, samples = time.perf_counter(), self._tokens_seen, self._samples_seen
            elapsed = max(now - self._last_log[0], 1e-9)
            logs["tokens_per_s"] = round((tokens - self._last_log[1]) / elapsed, 1)
            logs["samples_per_s"] = round((samples - self._last_log[2]) / elapsed, 3)
            self._last_log = (now, tokens, samples)
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
        if not _internal_call and not self.run_info.get("lora") and not self.is_deepspeed_enabled:
            # The end of a full run: its folder is the model, so the fp32 masters go back to the training dtype.
            # (Checkpoints keep them in fp32, so a resumed run continues exactly.)
            modes.cast_trained(self.model, getattr(torch, self.run_info["dtype"]))
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
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
        final = run_dir / f"{run.CHECKPOINT_PREFIX}-{self.state.global_step}"
        staging = run.staging_dir(run_dir, self.state.global_step)
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
            run.publish_checkpoint(staged, final)
            run.rotate_checkpoints(run_dir, self.args.save_total_limit, final, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.run_info.get("lora"):
            run.restore_non_lora_trainables(resume_from_checkpoint, model or self.model)


def deepspeed_config(value) -> dict:
    """The DeepSpeed config ``--deepspeed`` names: a JSON file, a JSON string or (from Python) a dict."""
    if isinstance(value, dict):
        return value
    path = Path(value)
    if not path.is_file() and not str(value).lstrip().startswith("{"):
        raise ConfigError(f"--deepspeed {value}: no such file")
    try:
        return json.loads(path.read_text() if path.is_file() else value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--deepspeed {value}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def check_environment(model_args: ModelArguments, train_args: TrainingArguments, plan: modes.TrainPlan) -> None:
    if model_args.bits in (4, 8) and (plan.llm == "full" or plan.topk_llm):
        raise ConfigError(f"--bits {model_args.bits} quantizes the language model, whose weights then cannot train "
                          "fully (--mode full, --lora_enable False or --unfreeze_topk_llm); QLoRA trains LoRA on it: "
                          "use --mode lora or lora_vision")
    if model_args.bits in (4, 8) and not torch.cuda.is_available():
        raise ConfigError(f"--bits {model_args.bits} (QLoRA through bitsandbytes) needs a CUDA device; none is here")
    if train_args.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 needs a CUDA device; use --bf16 or fp32 on CPU")
    if train_args.deepspeed and "optimizer" in deepspeed_config(train_args.deepspeed):
        raise ConfigError(f"the DeepSpeed config {train_args.deepspeed} has an \"optimizer\" block: DeepSpeed would "
                          "build its own optimizer over every trainable weight at one learning rate, dropping "
                          "vlmtune's rates per part (--vision_lr, --merger_lr) and the groups without weight decay "
                          "(biases, norms). Remove the block; --learning_rate, --weight_decay, --adam_beta1, "
                          "--adam_beta2 and --adam_epsilon set what it held")
    if train_args.on_nan_loss == "skip" and train_args.deepspeed:
        raise ConfigError("--on_nan_loss skip does not work with DeepSpeed (its engine steps the optimizer inside "
                          "the backward pass, where vlmtune cannot drop the step); use --on_nan_loss stop")




# ---------------------------------------------------------------- the set-up every stage shares


@dataclass
class Start:
    """What a run starts from: the base model, the LoRA run merged into it first (if any), and the processor,
    family and media budgets of the run."""

    base_model: str
    init_run: run.RunInfo | None
    family: Family
    processor: object
    budget: media.MediaBudget
    budget_overrides: dict

    def record(self, **extra) -> dict:
        """The ``run_record`` keyword arguments that say where the run started."""
        if self.init_run is not None:
            extra["init_run"] = str(self.init_run.folder.resolve())
        return {"base_model": self.base_model, "family": self.family,
                "budget_overrides": self.budget_overrides, **extra}


def resolve_start(model_args: ModelArguments, data_args: DataArguments, plan: modes.TrainPlan) -> Start:
    """The model, processor and budgets a run starts from. ``--model_name_or_path`` may be a model, or the output
    folder of a LoRA run (an SFT run before DPO or GRPO): its processor and budget options carry over (flags given
    now win), and its adapters are merged into its base model when the model loads."""
    model_path = resolve_model_path(model_args.model_name_or_path, model_args.tiny_family)
    base_model, init_run = run.start_of(model_path)
    if init_run is not None:
        if model_args.bits in (4, 8):
            raise ConfigError(f"--bits {model_args.bits} cannot start from LoRA adapters ({model_path}): their "
                              "merge into quantized weights is lossy; `vlmtune merge` the run first and start from "
                              "the merged folder")
        logger.info("starting from the run in %s: %s with its adapters merged in", model_path, base_model)
    family = load_family(base_model, f"--model_name_or_path {model_path}" if init_run is None else None)
    modes.check_family(plan, family)  # what cannot train on this family stops here, before anything loads
    check_quantization(family, model_args.bits)
    processor = run.load_run_processor(init_run, base_model)
    overrides = {**(init_run.budget_overrides if init_run else {}),
                 **{k: v for k, v in data_args.budget_overrides().items() if v is not None}}
    budget = media.budget_from_processor(processor, family.factor, **overrides)
    media.set_processor_budget(processor, budget)  # saved with every checkpoint: serving uses the same budgets
    return Start(base_model, init_run, family, processor, budget, overrides)


def build_datasets(data_args: DataArguments, processor, family: Family, budget: media.MediaBudget, seed: int,
                   make: Callable, conversation, stage: str = "sft"):
    """(train, eval or None) datasets of a stage: every file checked up front, labels included, with
    ``conversation`` (the summary logged, errors raised as ``DataError``), a held-out split drawn with ``seed``,
    and ``make(records, lengths, source)`` building each dataset from its records and measured lengths."""

    def checked(path: str):
        result = check_data(
            path, processor, family, budget, image_folder=data_args.image_folder,
            video_folder=data_args.video_folder, allow_urls=data_args.allow_urls, deep=data_args.deep_check,
            max_seq_length=data_args.max_seq_length, conversation=conversation, stage=stage,
            box_format=data_args.box_format,
        )
        logger.info("data check\n%s", result.summary(with_problems=not result.errors))  # errors: listed once, below
        if result.errors:
            raise DataError(result.file, result.problems)
        return result.records, result.lengths

    records, lengths = checked(data_args.data_path)  # SFT: lazy records from the data store, and their lengths
    eval_records, eval_lengths = [], []
    if data_args.eval_data_path:
        eval_records, eval_lengths = checked(data_args.eval_data_path)
    elif data_args.val_ratio:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(records) * data_args.val_ratio))
        eval_at, train_at = order[:n_eval], sorted(order[n_eval:])
        eval_records, eval_lengths = take(records, eval_at), [lengths[i] for i in eval_at]
        records, lengths = take(records, train_at), [lengths[i] for i in train_at]
    train_set = make(records, lengths, data_args.data_path)
    if not len(eval_records):
        return train_set, None
    return train_set, make(eval_records, eval_lengths, data_args.eval_data_path or data_args.data_path)


def init_distributed(train_args: TrainingArguments) -> None:
    """DeepSpeed's communication layer, before any model loads: ZeRO-3 partitions weights while from_pretrained
    builds the model, and must know the world size by then (on CPU, accelerate's set-up does not do it)."""
    logger.info("device: %s", f"CUDA x{torch.cuda.device_count()}" if torch.cuda.is_available() else "CPU")
    if train_args.deepspeed:
        import deepspeed

        _ = train_args.device  # torch.distributed first
        deepspeed.init_distributed()


def load_start_model(start: Start, model_args: ModelArguments, dtype: torch.dtype):
    """The model a run starts from, in ``dtype``: the base model, or the base with the start run's adapters (and
    fully trained parts) merged in. Merged models are built whole, also under ZeRO-3 (DeepSpeed partitions them
    when the engine starts)."""
    if start.init_run is None:
        model, _ = load_model(start.base_model, dtype=dtype, attn_implementation=model_args.attn_implementation,
                              bits=model_args.bits, use_liger=model_args.use_liger)
        return model
    with whole_weights():
        peft_model, _ = run.load_model_with_adapters(start.init_run, start.base_model, dtype,
                                                     attn_implementation=model_args.attn_implementation,
                                                     use_liger=model_args.use_liger)
        return peft_model.merge_and_unload()


def load_policy(start: Start, model_args: ModelArguments, mode_args: ModeArguments,
                train_args: TrainingArguments, plan: modes.TrainPlan):
    """The model to train: loaded, KV cache off, the plan applied (LoRA, what trains), fp32 masters of what
    trains unless DeepSpeed or --pure_bf16 keeps its own."""
    init_distributed(train_args)
    dtype = torch_dtype(train_args.bf16, train_args.fp16)
    model = load_start_model(start, model_args, dtype)
    disable_kv_cache(model)
    set_seed(train_args.seed)  # LoRA's initial weights are drawn here, before the Trainer seeds anything
    model = modes.apply_plan(model, start.family, plan, mode_args)
    logger.info("training plan: %s\n%s", plan.describe(), modes.trainable_report(model, start.family))
    if not (train_args.deepspeed or train_args.pure_bf16) and (upcast := modes.fp32_master_weights(model)):
        logger.info("fp32 master weights for %s trained parameters (the forward runs in %s through autocast)",
                    f"{upcast:,}", dtype_name(dtype))
    return model


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def output_lock(output_dir: str):
    """One run per output folder: the first process holds the lock until it ends, however it ends."""
    return run.RunLock(output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()


def fit(trainer: VisionLanguageTrainer, train_args: TrainingArguments, eval_set, resume: str | None,
        started: float | None = None, predictions: Path | None = None) -> Path:
    """Train (from the checkpoint ``resume``, resolved by ``run.resolve_resume``), then evaluate a held-out split
    that has not reported yet, save the result and the state, draw the plots, log the end-of-run summary (time
    from ``started``) and take the process groups down. A run stopped by SIGTERM raises ``Stopped`` saying how to
    resume."""
    started = started or time.time()
    trainer.train(resume_from_checkpoint=resume)
    if trainer.stopped:
        _leave_together()
        signum, step = trainer.stopped
        raise Stopped(f"stopped by {signal.Signals(signum).name} after step {step}, saved in "
                      f"{Path(train_args.output_dir, f'{run.CHECKPOINT_PREFIX}-{step}')}; run the same command with "
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
    _leave_together()
    return Path(train_args.output_dir)


def _leave_together() -> None:
    if torch.distributed.is_initialized():
        # Leave together and take the process groups down: a rank that exits with them alive can abort in
        # their destructors ("terminate called without an active exception"), failing a finished run.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
