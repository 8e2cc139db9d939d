"""What every stage shares: the Trainer subclass, the checks of the environment, and the model set-up.

The Hugging Face ``Trainer`` brings DeepSpeed, FSDP, resume, evaluation, logging and multi-node launch.
``VisionLanguageTrainer`` adds only what it lacks: our parameter groups, length grouping from lengths known
without decoding media, saving just what trains (through ``vlmtune.run``), and per-group learning rates and
throughput in the logs.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from vlmtune import run
from vlmtune.config import ConfigError, ModelArguments, TrainingArguments
from vlmtune.data import packing
from vlmtune.families import Family
from vlmtune.model import modes
from vlmtune.stages import callbacks

logger = logging.getLogger(__name__)


class VisionLanguageTrainer(Trainer):
    """``Trainer`` with part-wise parameter groups, length grouping and trainable-only saving."""

    def __init__(self, *args, family: Family, run_info: dict, eval_generator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = family
        self.run_info = run_info
        self.eval_generator = eval_generator  # stages.eval_generate.EvalGenerator (--eval_generate)
        callbacks.install(self)
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


