"""Supervised fine-tuning, ``train(config)``: config -> model -> data -> Trainer, top to bottom."""

from __future__ import annotations

import logging
import os
import random
import signal
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoConfig, set_seed

from vlmtune import run
from vlmtune.config import ConfigError, DataArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data import media, packing
from vlmtune.data.check import check_data
from vlmtune.data.collator import Collator, vision_fillers
from vlmtune.data.conversation import Conversation
from vlmtune.data.dataset import VisionLanguageDataset, take
from vlmtune.data.records import DataError, load_records
from vlmtune.families import Family
from vlmtune.model import modes
from vlmtune.model.load import (
    check_quantization,
    disable_kv_cache,
    dtype_name,
    load_family,
    load_model,
    load_processor,
    resolve_model_path,
    torch_dtype,
)
from vlmtune.stages.common import Stopped, VisionLanguageTrainer, check_environment, save_failed

logger = logging.getLogger(__name__)


def build_datasets(data_args: DataArguments, processor, family: Family, budget: media.MediaBudget, seed: int):
    """(train, eval or None) datasets; the data check's summary is logged and errors raise ``DataError``."""
    conversation = Conversation(processor, data_args.label_mode, **data_args.template_options())
    result = check_data(
        data_args.data_path, processor, family, budget, image_folder=data_args.image_folder,
        video_folder=data_args.video_folder, allow_urls=data_args.allow_urls, deep=data_args.deep_check,
        max_seq_length=data_args.max_seq_length, conversation=conversation,
    )
    logger.info("data check\n%s", result.summary(with_problems=not result.errors))  # errors: listed once, below
    if result.errors:
        raise DataError(result.file, result.problems)
    records, lengths = result.records, result.lengths  # lazy records from the data store, and their lengths
    eval_records, eval_lengths = [], None
    if data_args.eval_data_path:  # a separate eval file is measured now
        eval_records = load_records(
            data_args.eval_data_path, data_args.image_folder, data_args.video_folder,
            allow_urls=data_args.allow_urls, min_image_side=family.factor, budget=budget,
        )
        if label_problems := conversation.label_problems(eval_records):  # the training file's check did the same
            raise DataError(data_args.eval_data_path, label_problems)
    elif data_args.val_ratio:  # a held-out split was measured with the training file
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(records) * data_args.val_ratio))
        eval_at, train_at = order[:n_eval], sorted(order[n_eval:])
        eval_records, eval_lengths = take(records, eval_at), [lengths[i] for i in eval_at]
        records, lengths = take(records, train_at), [lengths[i] for i in train_at]

    def make(recs, lengths=None, source=data_args.data_path):
        return VisionLanguageDataset(recs, processor, family, budget, conversation, data_args.max_seq_length,
                                     data_args.strict_length, lengths, source)

    train_set = make(records, lengths)
    if not len(eval_records):
        return train_set, None
    return train_set, make(eval_records, eval_lengths, data_args.eval_data_path or data_args.data_path)


def train(model_args: ModelArguments, data_args: DataArguments, mode_args: ModeArguments,
          train_args: TrainingArguments) -> Path:
    """Run one training job; returns the output folder."""
    plan = modes.plan_from_args(mode_args)  # contradictions stop here, before anything loads
    check_environment(model_args, train_args, plan)
    if not data_args.data_path:
        raise ConfigError("--data_path is required (a LLaVA-style JSON or JSONL file)")
    resume = run.resolve_resume(train_args.resume_from_checkpoint, train_args.output_dir)
    model_path = resolve_model_path(model_args.model_name_or_path, model_args.tiny_family)
    family = load_family(model_path)
    modes.check_family(plan, family)
    check_quantization(family, model_args.bits)
    if data_args.packing:
        packing.check_packable(AutoConfig.from_pretrained(model_path))
    processor = load_processor(model_path)
    budget = media.budget_from_processor(processor, family.factor, **data_args.budget_overrides())
    media.set_processor_budget(processor, budget)  # saved with every checkpoint: serving uses the same budgets
    train_set, eval_set = build_datasets(data_args, processor, family, budget, train_args.seed)
    if len(train_set) == 0:
        raise ConfigError("no training record is left after the length filter; raise --max_seq_length")
    # One run per output folder: the first process holds the lock until it ends, however it ends.
    with run.RunLock(train_args.output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
        return _fit(model_args, data_args, mode_args, train_args, plan, model_path, processor, train_set, eval_set,
                    resume)


def _fit(model_args: ModelArguments, data_args: DataArguments, mode_args: ModeArguments,
         train_args: TrainingArguments, plan: modes.TrainPlan, model_path: str, processor, train_set, eval_set,
         resume: str | None) -> Path:
    logger.info("device: %s", f"CUDA x{torch.cuda.device_count()}" if torch.cuda.is_available() else "CPU")
    if train_args.deepspeed:
        # ZeRO-3 partitions weights while from_pretrained builds the model; DeepSpeed's communication layer must
        # know the world size by then (on CPU, accelerate's set-up does not initialise it for us).
        import deepspeed

        _ = train_args.device  # torch.distributed first
        deepspeed.init_distributed()
    dtype = torch_dtype(train_args.bf16, train_args.fp16)
    model, family = load_model(
        model_path, dtype=dtype,
        attn_implementation=model_args.attn_implementation, bits=model_args.bits, use_liger=model_args.use_liger,
    )
    disable_kv_cache(model)
    set_seed(train_args.seed)  # LoRA's initial weights are drawn here, before the Trainer seeds anything
    model = modes.apply_plan(model, family, plan, mode_args)
    logger.info("training plan: %s\n%s", plan.describe(), modes.trainable_report(model, family))
    if not (train_args.deepspeed or train_args.pure_bf16) and (upcast := modes.fp32_master_weights(model)):
        logger.info("fp32 master weights for %s trained parameters (the forward runs in %s through autocast)",
                    f"{upcast:,}", dtype_name(dtype))

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    fillers = vision_fillers(processor, family.factor) if distributed else None
    if data_args.packing:  # several records per row, attention kept inside each record (vlmtune/data/packing.py)
        train_set, eval_set, collator = packing.packed_data(
            train_set, eval_set, model, processor.tokenizer.pad_token_id, data_args.max_seq_length, fillers)
        logger.info("packing: %d records in %d rows (%.1f%% full), %s", len(train_set.dataset), len(train_set),
                    100 * train_set.fill_fraction(), "padding-free" if collator.padding_free else "block mask")
    else:
        collator = Collator(processor.tokenizer.pad_token_id, fillers=fillers)
    run_info = run.run_record(stage="sft", base_model=model_path, family=family, plan=plan, dtype=dtype,
                              bits=model_args.bits, budget_overrides=data_args.budget_overrides(),
                              template_options=data_args.template_options())
    trainer = VisionLanguageTrainer(
        model=model, args=train_args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator,
        processing_class=processor, family=family, run_info=run_info, on_nan_loss=train_args.on_nan_loss,
    )
    trainer.train(resume_from_checkpoint=resume)
    if trainer.stopped:
        _leave_together()
        signum, step = trainer.stopped
        raise Stopped(f"stopped by {signal.Signals(signum).name} after step {step}, saved in "
                      f"{Path(train_args.output_dir, f'{run.CHECKPOINT_PREFIX}-{step}')}; run the same command with "
                      "--resume_from_checkpoint last to continue", signum)
    if eval_set is not None and train_args.eval_strategy == "no":  # an eval split always reports, at least at the end
        trainer.log_metrics("eval", trainer.evaluate())
    try:
        trainer.save_model(train_args.output_dir)
        trainer.save_state()
    except Exception as exc:
        error = save_failed(exc, "the trained model", Path(train_args.output_dir))
        if error is None:
            raise
        raise error from None
    logger.info("saved to %s", train_args.output_dir)
    _leave_together()
    return Path(train_args.output_dir)


def _leave_together() -> None:
    if torch.distributed.is_initialized():
        # Leave together and take the process groups down: a rank that exits with them alive can abort in
        # their destructors ("terminate called without an active exception"), failing a finished run.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
