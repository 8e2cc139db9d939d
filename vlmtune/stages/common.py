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

logger = logging.getLogger(__name__)


class VisionLanguageTrainer(Trainer):
    """``Trainer`` with part-wise parameter groups, length grouping and trainable-only saving."""

    def __init__(self, *args, family: Family, run_info: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = family
        self.run_info = run_info
        self._tokens_seen = self._samples_seen = 0  # real (non-padding) tokens and records, for the rates
        self._last_log = (time.perf_counter(), 0, 0)  # time, tokens seen, samples seen
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


