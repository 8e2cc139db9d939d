"""Supervised fine-tuning, ``train(config)``: config -> model -> data -> Trainer, top to bottom."""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import torch
from transformers import set_seed

from vlmtune import run
from vlmtune.config import ConfigError, DataArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data import media, packing
from vlmtune.data.check import check_data
from vlmtune.data.collator import Collator, vision_fillers
from vlmtune.data.conversation import Conversation
from vlmtune.data.dataset import VisionLanguageDataset
from vlmtune.data.records import DataError, load_records
from vlmtune.families import Family
from vlmtune.model import modes
from vlmtune.model.load import (
    disable_kv_cache,
    dtype_name,
    load_family,
    load_model,
    load_processor,
    resolve_model_path,
    torch_dtype,
)
from vlmtune.stages import callbacks
from vlmtune.stages.common import VisionLanguageTrainer, check_environment
from vlmtune.stages.eval_generate import EvalGenerator, generation_metric_names

logger = logging.getLogger(__name__)


def build_datasets(data_args: DataArguments, processor, family: Family, budget: media.MediaBudget, seed: int):
    """(train, eval or None) datasets; the data check's summary is logged and errors raise ``DataError``."""
    conversation = Conversation(processor, data_args.label_mode, **data_args.template_options())
    result = check_data(
        data_args.data_path, processor, family, budget, image_folder=data_args.image_folder,
        video_folder=data_args.video_folder, allow_urls=data_args.allow_urls, deep=data_args.deep_check,
        max_seq_length=data_args.max_seq_length, conversation=conversation, box_format=data_args.box_format,
    )
    logger.info("data check\n%s", result.summary(with_problems=not result.errors))  # errors: listed once, below
    if result.errors:
        raise DataError(result.file, result.problems)
    records = result.records
    eval_records = []
    if data_args.eval_data_path:
        eval_records = load_records(
            data_args.eval_data_path, data_args.image_folder, data_args.video_folder,
            allow_urls=data_args.allow_urls, min_image_side=family.factor, budget=budget,
            box_target=family.box_format, box_format=data_args.box_format,
        )
        if label_problems := conversation.label_problems(eval_records):  # the training file's check did the same
            raise DataError(data_args.eval_data_path, label_problems)
    elif data_args.val_ratio:
        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        n_eval = max(1, int(len(records) * data_args.val_ratio))
        eval_records, records = shuffled[:n_eval], sorted(shuffled[n_eval:], key=lambda r: r.index)

    measured = {r.index: n for r, n in zip(result.records, result.lengths)}

    def make(recs, lengths=None, source=data_args.data_path):
        return VisionLanguageDataset(recs, processor, family, budget, conversation, data_args.max_seq_length,
                                     data_args.strict_length, lengths, source)

    train_set = make(records, [measured[r.index] for r in records])
    if not eval_records:
        return train_set, None
    # A held-out split was measured with the training file; a separate eval file is measured now.
    held_out = None if data_args.eval_data_path else [measured[r.index] for r in eval_records]
    return train_set, make(eval_records, held_out, data_args.eval_data_path or data_args.data_path)


def check_evaluation(data_args: DataArguments, train_args: TrainingArguments) -> list[str] | None:
    """Cross-checks of --eval_generate, --metric_for_best_model and early stopping; the metric names to report."""
    try:
        names = generation_metric_names(train_args.eval_metrics)
    except ValueError as exc:
        raise ConfigError(f"--eval_metrics: {exc}") from None
    has_eval = bool(data_args.eval_data_path or data_args.val_ratio)
    if train_args.eval_generate and not has_eval:
        raise ConfigError("--eval_generate True needs an eval split: give --eval_data_path or --val_ratio")
    best = train_args.metric_for_best_model
    if best:
        from vlmtune.metrics import METRICS

        bare = best[len("eval_"):] if best.startswith("eval_") else best
        if bare in METRICS and not train_args.eval_generate:
            raise ConfigError(f"--metric_for_best_model {best} is a generation metric: add --eval_generate True")
        if names is not None and bare in METRICS and bare not in names:
            raise ConfigError(f"--metric_for_best_model {best} is not among --eval_metrics {','.join(names)}")
    if train_args.early_stopping_patience:
        if not best:
            raise ConfigError("--early_stopping_patience needs --metric_for_best_model (e.g. eval_loss, or a "
                              "generation metric with --eval_generate True)")
        if train_args.eval_strategy == "no" or not has_eval:
            raise ConfigError("--early_stopping_patience needs evaluations during training: --eval_strategy steps "
                              "(or epoch) and an eval split")
    return names


def train(model_args: ModelArguments, data_args: DataArguments, mode_args: ModeArguments,
          train_args: TrainingArguments) -> Path:
    """Run one training job; returns the output folder."""
    started = time.time()
    plan = modes.plan_from_args(mode_args)  # contradictions stop here, before anything loads
    check_environment(model_args, train_args, plan)
    metric_names = check_evaluation(data_args, train_args)
    if not data_args.data_path:
        raise ConfigError("--data_path is required (a LLaVA-style JSON or JSONL file)")
    model_path = resolve_model_path(model_args.model_name_or_path, model_args.tiny_family)
    family = load_family(model_path)
    processor = load_processor(model_path)
    budget = media.budget_from_processor(processor, family.factor, **data_args.budget_overrides())
    media.set_processor_budget(processor, budget)  # saved with every checkpoint: serving uses the same budgets
    train_set, eval_set = build_datasets(data_args, processor, family, budget, train_args.seed)
    if len(train_set) == 0:
        raise ConfigError("no training record is left after the length filter; raise --max_seq_length")

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
    generator = None
    if train_args.eval_generate and eval_set is not None:
        eval_records = getattr(eval_set, "dataset", eval_set).records  # packed sets wrap the record dataset
        generator = EvalGenerator(eval_records, processor, family, budget, metric_names=metric_names,
                                  max_new_tokens=train_args.eval_max_new_tokens,
                                  batch_size=train_args.per_device_eval_batch_size,
                                  output_dir=train_args.output_dir, limit=train_args.eval_generate_limit,
                                  enable_thinking=data_args.template_options().get("enable_thinking"))
    trainer = VisionLanguageTrainer(
        model=model, args=train_args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator,
        processing_class=processor, family=family, run_info=run_info, eval_generator=generator,
    )
    if train_args.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(train_args.early_stopping_patience,
                                                   train_args.early_stopping_threshold))
    trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
    if eval_set is not None and train_args.eval_strategy == "no":  # an eval split always reports, at least at the end
        trainer.evaluate()
    trainer.save_model(train_args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        from vlmtune.plots import plot_run

        try:
            plot = plot_run(train_args.output_dir)
        except Exception as exc:  # a plot must never fail a finished run
            logger.warning("could not draw the plots: %s", exc)
            plot = None
        predictions = generator.predictions_path if generator is not None else None
        logger.info("%s", callbacks.summary(trainer, started, train_args.output_dir, lora=plan.uses_lora,
                                            plot=plot, predictions=predictions))
    if torch.distributed.is_initialized():
        # Leave together and take the process groups down: a rank that exits with them alive can abort in
        # their destructors ("terminate called without an active exception"), failing a finished run.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return Path(train_args.output_dir)
