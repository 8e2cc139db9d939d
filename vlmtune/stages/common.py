"""What every stage shares: the Trainer subclass, the checks of the environment, and the model set-up.

The Hugging Face ``Trainer`` brings DeepSpeed, FSDP, resume, evaluation, logging and multi-node launch.
``VisionLanguageTrainer`` adds only what it lacks: our parameter groups, length grouping from lengths known
without decoding media, saving just what trains (through ``vlmtune.run``), and per-group learning rates and
throughput in the logs.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler

from vlmtune import run
from vlmtune.config import ConfigError, DataArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data import media, packing
from vlmtune.data.check import check_data
from vlmtune.data.records import DataError
from vlmtune.families import Family
from vlmtune.model import modes
from vlmtune.model.load import (
    disable_kv_cache,
    dtype_name,
    load_family,
    load_model,
    resolve_model_path,
    torch_dtype,
    whole_weights,
)

logger = logging.getLogger(__name__)


class VisionLanguageTrainer(Trainer):
    """``Trainer`` with part-wise parameter groups, length grouping and trainable-only saving."""

    def __init__(self, *args, family: Family, run_info: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = family
        self.run_info = run_info
        self._tokens_seen = self._samples_seen = 0  # real (non-padding) tokens and records, for the rates
        self._last_log = (time.perf_counter(), 0, 0)  # time, tokens seen, samples seen

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            args = self.args
            groups = modes.parameter_groups(
                self.model, self.family, args.learning_rate, args.weight_decay, args.vision_lr, args.merger_lr
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, self.model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

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
        pad_id = getattr(self.data_collator, "pad_token_id", None)  # packed batches carry no attention_mask
        self._samples_seen += packing.count_samples(inputs, pad_id)
        self._tokens_seen += packing.count_tokens(inputs, pad_id)
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                logs[f"lr/{group.get('name', 'group')}"] = group["lr"]
            now, tokens, samples = time.perf_counter(), self._tokens_seen, self._samples_seen
            elapsed = max(now - self._last_log[0], 1e-9)
            logs["tokens_per_s"] = round((tokens - self._last_log[1]) / elapsed, 1)
            logs["samples_per_s"] = round((samples - self._last_log[2]) / elapsed, 3)
            self._last_log = (now, tokens, samples)
        super().log(logs, start_time)

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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.run_info.get("lora"):
            run.restore_non_lora_trainables(resume_from_checkpoint, model or self.model)


def check_environment(model_args: ModelArguments, train_args: TrainingArguments, plan: modes.TrainPlan) -> None:
    if model_args.bits in (4, 8) and (plan.llm == "full" or plan.topk_llm):
        raise ConfigError(f"--bits {model_args.bits} quantizes the language model, whose weights then cannot train "
                          "fully (--mode full, --lora_enable False or --unfreeze_topk_llm); QLoRA trains LoRA on it: "
                          "use --mode lora or lora_vision")
    if model_args.bits in (4, 8) and not torch.cuda.is_available():
        raise ConfigError(f"--bits {model_args.bits} (QLoRA through bitsandbytes) needs a CUDA device; none is here")
    if train_args.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 needs a CUDA device; use --bf16 or fp32 on CPU")




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


def resolve_start(model_args: ModelArguments, data_args: DataArguments) -> Start:
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
    family = load_family(base_model)
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
        )
        logger.info("data check\n%s", result.summary(with_problems=not result.errors))  # errors: listed once, below
        if result.errors:
            raise DataError(result.file, result.problems)
        return result.records, result.lengths

    records, lengths = checked(data_args.data_path)
    eval_records, eval_lengths = [], []
    if data_args.eval_data_path:
        eval_records, eval_lengths = checked(data_args.eval_data_path)
    elif data_args.val_ratio:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(records) * data_args.val_ratio))
        eval_at, train_at = order[:n_eval], sorted(order[n_eval:])
        eval_records, eval_lengths = [records[i] for i in eval_at], [lengths[i] for i in eval_at]
        records, lengths = [records[i] for i in train_at], [lengths[i] for i in train_at]
    train_set = make(records, lengths, data_args.data_path)
    if not eval_records:
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


def finish(trainer: Trainer, train_args: TrainingArguments, eval_set) -> Path:
    """After ``trainer.train()``: evaluate a held-out split that has not reported yet, save the result and the
    state, and take the process groups down."""
    if eval_set is not None and train_args.eval_strategy == "no":  # an eval split always reports, at least at the end
        trainer.log_metrics("eval", trainer.evaluate())
    trainer.save_model(train_args.output_dir)
    trainer.save_state()
    logger.info("saved to %s", train_args.output_dir)
    if torch.distributed.is_initialized():
        # Leave together and take the process groups down: a rank that exits with them alive can abort in
        # their destructors ("terminate called without an active exception"), failing a finished run.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return Path(train_args.output_dir)
