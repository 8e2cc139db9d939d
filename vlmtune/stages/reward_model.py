"""Reward models, ``reward_model(config)``: config -> model with a scalar head -> preference pairs -> Trainer.

The model is the vision-language model with a ``score`` head (``vlmtune.model.reward``), trained on the DPO data
format with the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``, where ``r`` is the head on the final
hidden state at the reply's end-of-turn token. LoRA, full and the other plans train the body as in SFT; the head
always trains fully. A batch of B pairs is one forward of 2B rows (``PreferenceCollator``), as in DPO.

Logged beside the loss (training batches at each logging step, and the eval split): ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins`` and the pair accuracy ``rewards/accuracies`` (share of pairs with
``r_chosen > r_rejected``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmtune import run
from vlmtune.config import DataArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data.collator import vision_fillers
from vlmtune.data.conversation import Conversation
from vlmtune.data.prompts import PreferenceCollator, PreferenceDataset
from vlmtune.errors import ConfigError
from vlmtune.model import modes, reward
from vlmtune.model.load import torch_dtype
from vlmtune.stages.common import (
    VisionLanguageTrainer,
    build_datasets,
    check_environment,
    fit,
    is_distributed,
    load_policy,
    output_lock,
    resolve_start,
)
from vlmtune.stages.reference import disable_dropout

logger = logging.getLogger(__name__)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``."""
    return -F.logsigmoid(chosen - rejected)


class RewardTrainer(VisionLanguageTrainer):
    """``VisionLanguageTrainer`` whose loss is Bradley-Terry's on the head's rewards of each pair."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # a per-batch mean: the Trainer divides it for accumulation
        self.loss_is_scaled_for_ga = False
        self._metrics: dict[str, defaultdict] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        inputs.pop("pair_index", None)
        rewards = reward.sequence_rewards(model, inputs, reward.last_label_positions(inputs["labels"]))
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected).mean()
        values = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                  "rewards/accuracies": (chosen > rejected).float()}
        for key, value in values.items():
            self._metrics[mode][key].append(self.accelerator.gather(value.detach()).mean().item())
        return (loss, {"rewards": rewards.detach()}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval" if any(k.startswith("eval_") for k in logs) else None
        if mode is not None:
            prefix = "eval_" if mode == "eval" else ""
            for key, values in self._metrics[mode].items():
                if values:
                    logs[prefix + key] = sum(values) / len(values)
            self._metrics[mode].clear()
        super().log(logs, start_time)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        reward.load_head(model or self.model, resume_from_checkpoint)  # the body's files leave the head out


def reward_model(model_args: ModelArguments, data_args: DataArguments, mode_args: ModeArguments,
                 train_args: TrainingArguments) -> Path:
    """Train one reward model; returns the output folder."""
    plan = modes.plan_from_args(mode_args)
    check_environment(model_args, train_args, plan)
    if not data_args.data_path:
        raise ConfigError("--data_path is required (preference records: prompt turns plus 'chosen' and 'rejected')")
    if data_args.packing:
        raise ConfigError("--packing is for SFT; a reward model scores each chosen sequence beside its rejected one")
    resume = run.resolve_resume(train_args.resume_from_checkpoint, train_args.output_dir)
    start = resolve_start(model_args, data_args, plan)
    processor, family = start.processor, start.family
    conversation = Conversation(processor, "last_assistant", **data_args.template_options())

    def make(records, lengths, source):
        return PreferenceDataset(records, processor, family, start.budget, conversation, data_args.max_seq_length,
                                 data_args.strict_length, lengths, source)

    train_set, eval_set = build_datasets(data_args, processor, family, start.budget, train_args.seed, make,
                                         conversation, "dpo")
    if len(train_set) == 0:
        raise ConfigError("no preference record is left after the length filter; raise --max_seq_length")

    with output_lock(train_args.output_dir):  # one run per output folder
        model = load_policy(start, model_args, mode_args, train_args, plan)
        reward.attach_head(model, seed=train_args.seed)
        disable_dropout(model)  # the two rows of a pair are scored under the same network
        logger.info("reward model: a scalar head (%s) on the final hidden state at the reply's end-of-turn token, "
                    "Bradley-Terry loss", reward.HEAD)
        fillers = vision_fillers(processor, family.factor) if is_distributed() else None
        run_info = run.run_record(stage="reward_model", plan=plan, dtype=torch_dtype(train_args.bf16, train_args.fp16),
                                  bits=model_args.bits, template_options=data_args.template_options(),
                                  **start.record())
        trainer = RewardTrainer(
            model=model, args=train_args, train_dataset=train_set, eval_dataset=eval_set,
            data_collator=PreferenceCollator(processor.tokenizer.pad_token_id, fillers=fillers),
            processing_class=processor, family=family, run_info=run_info,
        )
        return fit(trainer, train_args, eval_set, resume)
