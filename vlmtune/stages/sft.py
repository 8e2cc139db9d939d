"""Supervised fine-tuning, ``train(config)``: config -> model -> data -> Trainer, top to bottom.

``--stage cpt`` (continued pre-training) is the same recipe on documents instead of conversations
(``vlmtune.data.document``): the data check, the store, packing, the modes and the run folder are SFT's; only what
a record's tokens and labels are differs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from transformers import AutoConfig

from vlmtune import checkpoints, run
from vlmtune.config import DataArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data.collator import Collator, vision_fillers
from vlmtune.data.conversation import Conversation
from vlmtune.data.dataset import VisionLanguageDataset
from vlmtune.data.document import Document
from vlmtune.errors import ConfigError
from vlmtune.flags import check_paths
from vlmtune.model import modes, packing
from vlmtune.model.load import torch_dtype
from vlmtune.stages import sequence_parallel as sp_stage
from vlmtune.stages.eval_generate import EvalGenerator, generation_metric_names
from vlmtune.stages.fit import fit, output_lock
from vlmtune.stages.setup import build_datasets, check_environment, is_distributed, load_policy, resolve_start
from vlmtune.stages.trainer import VisionLanguageTrainer

logger = logging.getLogger(__name__)


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


def check_cpt(data_args: DataArguments, train_args: TrainingArguments) -> None:
    """--stage cpt: the flags that only mean something for conversations are refused, not ignored."""
    if data_args.stage != "cpt":
        return
    chat = [flag for flag, value in (("--label_mode", data_args.label_mode != "assistant"),
                                     ("--enable_thinking", data_args.enable_thinking is not None),
                                     ("--keep_earlier_reasoning", data_args.keep_earlier_reasoning),
                                     ("--eval_generate", train_args.eval_generate)) if value]
    if chat:
        raise ConfigError(f"{', '.join(chat)}: chat options, but --stage cpt trains documents without a chat template "
                          "(every text token trains); drop them")


def sft_datasets(data_args: DataArguments, processor, family, budget, seed: int, drawn: dict | None = None):
    """(train, eval or None) datasets of SFT records (or, ``--stage cpt``, documents), every file checked up front
    with the run's label mode and template switches (``build_datasets``; ``drawn`` receives what a list of files
    gave)."""
    if data_args.stage == "cpt":
        conversation = Document(processor)
        logger.info("CPT: documents without a chat template: %s, the text with vision tokens, %s; every token "
                    "trains but the vision pads", f"BOS {conversation.bos}" if conversation.bos else
                    "no BOS (the tokenizer has none)", conversation.end)
    else:
        conversation = Conversation(processor, data_args.label_mode, **data_args.template_options())

    def make(records, lengths, source):
        return VisionLanguageDataset(records, processor, family, budget, conversation, data_args.max_seq_length,
                                     data_args.strict_length, lengths, source)

    return build_datasets(data_args, processor, family, budget, seed, make, conversation, data_args.stage,
                          drawn=drawn)


def train(model_args: ModelArguments, data_args: DataArguments, mode_args: ModeArguments,
          train_args: TrainingArguments) -> Path:
    """Run one training job; returns the output folder."""
    started = time.time()
    plan = modes.plan_from_args(mode_args)  # contradictions stop here, before anything loads
    check_environment(model_args, train_args, plan)
    metric_names = check_evaluation(data_args, train_args)
    check_cpt(data_args, train_args)
    if not data_args.data_path:
        raise ConfigError("--data_path is required (a LLaVA-style JSON or JSONL file" +
                          (" of documents: {\"text\", \"image\"}" if data_args.stage == "cpt" else "") + ")")
    check_paths(data_args)  # every file and folder named, before anything loads
    resume = checkpoints.resolve_resume(train_args.resume_from_checkpoint, train_args.output_dir)
    start = resolve_start(model_args, data_args, plan)
    processor, family = start.processor, start.family
    sp_stage.check(train_args.sequence_parallel_size, train_args, model_args, data_args,
                   AutoConfig.from_pretrained(start.base_model), family.model_type)
    if data_args.packing:
        packing.check_packable(AutoConfig.from_pretrained(start.base_model))
    drawn: dict = {}
    train_set, eval_set = sft_datasets(data_args, processor, family, start.budget, train_args.seed, drawn)
    if len(train_set) == 0:
        raise ConfigError("no training record is left after the length filter; raise --max_seq_length")
    with output_lock(train_args.output_dir):
        if int(os.environ.get("RANK", "0")) == 0:
            run.write_mixture(train_args.output_dir, drawn)
        return _fit(model_args, data_args, mode_args, train_args, plan, start, train_set, eval_set, resume,
                    metric_names, started)


def _fit(model_args: ModelArguments, data_args: DataArguments, mode_args: ModeArguments,
         train_args: TrainingArguments, plan: modes.TrainPlan, start, train_set, eval_set, resume: str | None,
         metric_names: list[str] | None, started: float) -> Path:
    processor, family = start.processor, start.family
    model = load_policy(start, model_args, mode_args, train_args, plan)
    group = None
    if train_args.sequence_parallel_size > 1 and train_args.device is not None:  # .device starts torch.distributed
        group = sp_stage.start(model, family, train_args.sequence_parallel_size)
    fillers = vision_fillers(processor, family.factor) if is_distributed() else None
    if data_args.packing:  # several records per row, attention kept inside each record
        train_set, eval_set, collator = packing.packed_data(
            train_set, eval_set, model, processor.tokenizer.pad_token_id, data_args.max_seq_length, fillers)
        logger.info("packing: %d records in %d rows (%.1f%% full), %s", len(train_set.dataset), len(train_set),
                    100 * train_set.fill_fraction(), "padding-free" if collator.padding_free else "block mask")
    else:
        collator = Collator(processor.tokenizer.pad_token_id, fillers=fillers)
    run_info = run.run_record(stage=data_args.stage, plan=plan, dtype=torch_dtype(train_args.bf16, train_args.fp16),
                              bits=model_args.bits, template_options=data_args.template_options(), **start.record())
    generator = None
    if train_args.eval_generate and eval_set is not None:
        eval_records = getattr(eval_set, "dataset", eval_set).records  # packed sets wrap the record dataset
        generator = EvalGenerator(eval_records, processor, family, start.budget, metric_names=metric_names,
                                  max_new_tokens=train_args.eval_max_new_tokens,
                                  batch_size=train_args.per_device_eval_batch_size,
                                  output_dir=train_args.output_dir, limit=train_args.eval_generate_limit,
                                  enable_thinking=data_args.template_options().get("enable_thinking"))
    trainer = VisionLanguageTrainer(
        model=model, args=train_args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator,
        processing_class=processor, family=family, run_info=run_info, on_nan_loss=train_args.on_nan_loss,
        eval_generator=generator, sequence_parallel=group,
    )
    if train_args.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(train_args.early_stopping_patience,
                                                   train_args.early_stopping_threshold))
    return fit(trainer, train_args, eval_set, resume, started,
               predictions=generator.predictions_path if generator is not None else None)
