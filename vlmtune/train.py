"""``train(config)``: config -> model -> data -> Trainer, top to bottom.

The Hugging Face ``Trainer`` brings DeepSpeed, FSDP, resume, evaluation, logging and multi-node launch.
``VisionLanguageTrainer`` adds only what it lacks: our parameter groups, length grouping from lengths known
without decoding media, saving just what trains, and per-group learning rates and throughput in the logs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler

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
    disable_kv_cache,
    dtype_name,
    load_family,
    load_model,
    load_processor,
    resolve_model_path,
    torch_dtype,
)

logger = logging.getLogger(__name__)

NON_LORA_FILE = "non_lora_trainables.safetensors"
RUN_FILE = "vlmtune_run.json"
"""Written beside every saved model: base model, family and plan, so merge needs no guessing."""


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
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        if self.run_info.get("lora"):
            trainable = {n for n, p in self.model.named_parameters() if p.requires_grad and not modes.is_lora_name(n)}
            if trainable:
                state = state_dict if state_dict is not None else self.model.state_dict()
                tensors = {modes.clean_name(n): state[n].detach().cpu().contiguous() for n in sorted(trainable)}
                save_file(tensors, os.path.join(output_dir, NON_LORA_FILE), metadata={"format": "pt"})
        Path(output_dir, RUN_FILE).write_text(json.dumps(self.run_info, indent=2) + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint, NON_LORA_FILE)
        if path.is_file():
            load_non_lora_trainables((model or self.model).get_base_model(), load_file(str(path)))


def load_non_lora_trainables(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved non-LoRA trainables into a model strictly: an unknown key or a shape change raises."""
    params = {modes.clean_name(n): p for n, p in model.named_parameters()}
    params.update({modes.clean_name(n): b for n, b in model.named_buffers()})
    unknown = sorted(k for k in tensors if k not in params)
    if unknown:
        raise KeyError(f"{len(unknown)} saved weight(s) match no parameter of the model: {unknown[:10]}")
    bad = sorted(k for k, v in tensors.items() if params[k].shape != v.shape)
    if bad:
        raise ValueError(f"shape mismatch for saved weight(s) {bad[:10]}")
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value.to(params[key].dtype))


def _check_environment(model_args: ModelArguments, train_args: TrainingArguments, plan: modes.TrainPlan) -> None:
    if model_args.bits in (4, 8) and (plan.llm == "full" or plan.topk_llm):
        raise ConfigError(f"--bits {model_args.bits} quantizes the language model, whose weights then cannot train "
                          "fully (--mode full, --lora_enable False or --unfreeze_topk_llm); QLoRA trains LoRA on it: "
                          "use --mode lora or lora_vision")
    if model_args.bits in (4, 8) and not torch.cuda.is_available():
        raise ConfigError(f"--bits {model_args.bits} (QLoRA through bitsandbytes) needs a CUDA device; none is here")
    if train_args.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 needs a CUDA device; use --bf16 or fp32 on CPU")


def build_datasets(data_args: DataArguments, processor, family: Family, budget: media.MediaBudget, seed: int):
    """(train, eval or None) datasets; the data check's summary is logged and errors raise ``DataError``."""
    result = check_data(
        data_args.data_path, processor, family, budget, image_folder=data_args.image_folder,
        video_folder=data_args.video_folder, allow_urls=data_args.allow_urls, deep=data_args.deep_check,
        max_seq_length=data_args.max_seq_length,
    )
    logger.info("data check\n%s", result.summary(with_problems=not result.errors))  # errors: listed once, below
    if result.errors:
        raise DataError(result.file, result.problems)
    conversation = Conversation(processor, data_args.label_mode)
    records, lengths = result.records, result.lengths  # lazy records from the data store, and their lengths
    eval_records, eval_lengths = [], None
    if data_args.eval_data_path:  # a separate eval file is measured now
        eval_records = load_records(
            data_args.eval_data_path, data_args.image_folder, data_args.video_folder,
            allow_urls=data_args.allow_urls, min_image_side=family.factor, budget=budget,
        )
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
    _check_environment(model_args, train_args, plan)
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
    run_info = {
        "base_model": model_path, "model_type": family.model_type, "plan": dataclasses.asdict(plan),
        "budget": {k: v for k, v in data_args.budget_overrides().items() if v is not None},
        "lora": plan.uses_lora, "dtype": dtype_name(dtype),
    }
    trainer = VisionLanguageTrainer(
        model=model, args=train_args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator,
        processing_class=processor, family=family, run_info=run_info,
    )
    trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
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
