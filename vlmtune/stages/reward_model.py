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
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmtune.config import DataArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data.prompts import PreferenceCollator, PreferenceDataset
from vlmtune.model import reward
from vlmtune.stages.policy import PolicyStage, PolicyTrainer, run_policy_stage

logger = logging.getLogger(__name__)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``."""
    return -F.logsigmoid(chosen - rejected)


class RewardTrainer(PolicyTrainer):
    """``PolicyTrainer`` whose loss is Bradley-Terry's on the head's rewards of each pair (no reference)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = self.mode_of(model)
        inputs.pop("pair_index", None)
        rewards = reward.sequence_rewards(model, inputs, reward.last_label_positions(inputs["labels"]))
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected).mean()
        values = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                  "rewards/accuracies": (chosen > rejected).float()}
        for key, value in values.items():
            self.record_metric(mode, key, self.accelerator.gather(value.detach()).mean().item())
        return (loss, {"rewards": rewards.detach()}) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        reward.load_head(model or self.model, resume_from_checkpoint)  # the body's files leave the head out


def reward_model(model_args: ModelArguments, data_args: DataArguments, mode_args: ModeArguments,
                 train_args: TrainingArguments) -> Path:
    """Train one reward model; returns the output folder."""

    def dataset(records, lengths, source, start, conversation):
        return PreferenceDataset(records, start.processor, start.family, start.budget, conversation,
                                 data_args.max_seq_length, data_args.strict_length, lengths, source)

    def prepare(trainer: RewardTrainer, start, plan, resume: str | None, train_set) -> None:
        # before the optimizer and the device wrappers exist (Trainer.train): the head trains like any weight
        reward.attach_head(trainer.model, seed=train_args.seed)
        logger.info("reward model: a scalar head (%s) on the final hidden state at the reply's end-of-turn token, "
                    "Bradley-Terry loss", reward.HEAD)

    return run_policy_stage(PolicyStage(
        name="reward_model", args=_NoArguments(), trainer=RewardTrainer, dataset=dataset, records="dpo",
        label_mode="last_assistant",  # the reply's tokens: its end-of-turn token is where the head reads
        collator=lambda processor, fillers: PreferenceCollator(processor.tokenizer.pad_token_id, fillers=fillers),
        data_path="preference records: prompt turns plus 'chosen' and 'rejected'",
        no_packing="a reward model scores each chosen sequence beside its rejected one",
        empty="no preference record is left after the length filter; raise --max_seq_length",
        reference=False, prepare=prepare,
    ), model_args, data_args, mode_args, train_args)


class _NoArguments:
    """The reward model has no flags of its own (the run record's ``reward_model`` entry is empty)."""
