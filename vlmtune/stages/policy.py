"""What every policy stage shares (DPO, GRPO, and those of their shape): a trainer base and one stage runner.

A policy stage trains the model on a loss of its own log-probabilities, often against a reference policy (what
the run started from, ``vlmtune.stages.reference``). Beyond that it is its loss and its data:

* ``PolicyTrainer``: ``VisionLanguageTrainer`` with the reference, per-mode metrics averaged into each log line,
  an evaluation step that only computes the loss, and the loss flags of a per-batch mean. A stage subclasses it
  and writes ``compute_loss`` (and, for eval batches that need work first, ``eval_inputs``).
* ``PolicyStage`` and ``run_policy_stage``: the recipe, top to bottom (TRL present, plan, checks, resume, start,
  datasets checked up front, the output lock, policy and reference, run record, trainer, fit). A stage gives its
  name, its trainer, how its datasets and batches are made, and its messages.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from vlmtune import checkpoints, run
from vlmtune.config import DataArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data.collator import vision_fillers
from vlmtune.data.conversation import Conversation
from vlmtune.errors import ConfigError
from vlmtune.flags import check_paths
from vlmtune.model import modes
from vlmtune.model.load import torch_dtype
from vlmtune.stages import reference as ref
from vlmtune.stages import sequence_parallel as sp_stage
from vlmtune.stages.fit import fit, output_lock
from vlmtune.stages.setup import build_datasets, check_environment, is_distributed, resolve_start
from vlmtune.stages.trainer import RECORD_IDS, VisionLanguageTrainer

logger = logging.getLogger(__name__)


class PolicyTrainer(VisionLanguageTrainer):
    """``VisionLanguageTrainer`` for a loss on the policy's log-probabilities: holds the ``Reference`` (or None),
    the metrics of each mode (``record_metric``) averaged into the next log line, and ``fillers`` (the vision
    fillers of a distributed run, for batches the stage builds itself)."""

    def __init__(self, *args, reference: ref.Reference | None = None, fillers=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference
        self.fillers = fillers
        self.model_accepts_loss_kwargs = False  # a per-batch mean: the Trainer divides it for accumulation
        self.loss_is_scaled_for_ga = False
        self._metrics: dict[str, defaultdict] = {"train": defaultdict(list), "eval": defaultdict(list)}

    @staticmethod
    def mode_of(model) -> str:
        """``train`` or ``eval``: the metrics a forward of ``model`` reports to."""
        return "train" if model.training else "eval"

    def record_metric(self, mode: str, key: str, value: float) -> None:
        """One value of a metric, averaged with the others of its mode into the next log line."""
        self._metrics[mode][key].append(value)

    def reference_log_probs(self, model, batch: dict) -> torch.Tensor:
        """Per-token log-probs of the batch under the reference policy (``model`` as the Trainer calls it)."""
        return self.reference.log_probs(model, batch, self.accelerator.unwrap_model)

    def log_prob_sums(self, model, batch: dict) -> torch.Tensor:
        """(rows,) each row's summed log-prob of its labelled tokens under the policy (whole sequences: under
        ``--sequence_parallel_size`` summed over the group, with autograd)."""
        return ref.log_prob_sums(model, batch, self.sp_group)

    def reference_log_prob_sums(self, model, batch: dict) -> torch.Tensor:
        """(rows,) the same under the reference policy, without gradients."""
        return self.reference.log_prob_sums(model, batch, self.accelerator.unwrap_model, self.sp_group)

    def sequence_parallel_step(self, model, inputs, records: list[str], num_items_in_batch=None) -> torch.Tensor:
        return sp_stage.policy_training_step(self, model, inputs)

    def eval_inputs(self, model, inputs: dict) -> dict:
        """The batch an evaluation step computes the loss on (the collated batch; GRPO samples first)."""
        return inputs

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop(RECORD_IDS, None)
        if self.sp_group is not None:
            return sp_stage.policy_eval_loss(self, model, inputs).detach(), None, None
        inputs = self._prepare_inputs(self.eval_inputs(model, inputs))
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


@dataclass
class PolicyStage:
    """What makes a policy stage itself; ``run_policy_stage`` does the rest."""

    name: str
    """The stage: the CLI command, the run record's ``stage``, and the key its flags are saved under."""
    args: object
    """Its flags (e.g. ``DPOArguments``), saved in the run record."""
    trainer: type[PolicyTrainer]
    """Its trainer: the loss, and what it logs."""
    dataset: Callable
    """``(records, lengths, source, start, conversation) -> Dataset`` of one split."""
    collator: Callable
    """``(processor, fillers) -> collator`` of the training batches."""
    data_path: str
    """What ``--data_path`` holds (named when it is missing)."""
    no_packing: str
    """Why ``--packing`` does not apply."""
    empty: str
    """The error when the length filter leaves no record (and what to do)."""
    records: str = ""
    """The record format its data files are checked as (``sft``, ``dpo``, ``grpo``; default: ``name``)."""
    label_mode: str = "assistant"
    """Which turns the ``Conversation`` labels."""
    reference: bool = True
    """Whether the loss compares with a reference policy."""
    reference_user: str = ""
    """The run, as the reference's errors name it (``vlmtune dpo``)."""
    temperature: float = 1.0
    """The temperature of the log-probabilities."""
    trainer_kwargs: dict = field(default_factory=dict)
    """What else its trainer takes (its flags, reward functions...)."""
    check: Callable | None = None
    """``(dataset) -> None`` for each split, after the data check: what the stage itself needs of the records."""
    prepare: Callable | None = None
    """``(trainer, start, plan, resume, train_set) -> None`` once the trainer exists (and logs what the run does)."""


def run_policy_stage(stage: PolicyStage, model_args: ModelArguments, data_args: DataArguments,
                     mode_args: ModeArguments, train_args: TrainingArguments) -> Path:
    """Run one job of a policy stage; returns the output folder."""
    ref.require_trl(stage.name)
    plan = modes.plan_from_args(mode_args)  # contradictions stop here, before anything loads
    check_environment(model_args, train_args, plan)
    if not data_args.data_path:
        raise ConfigError(f"--data_path is required ({stage.data_path})")
    check_paths(data_args)  # every file and folder named, before anything loads
    if data_args.packing:
        raise ConfigError(f"--packing is for SFT; {stage.no_packing}")
    size = train_args.sequence_parallel_size
    if size > 1 and stage.name not in sp_stage.STAGES:
        sp_stage.check(size, train_args, model_args, data_args, None, "", stage=stage.name)
    resume = checkpoints.resolve_resume(train_args.resume_from_checkpoint, train_args.output_dir)
    start = resolve_start(model_args, data_args, plan)
    processor, family = start.processor, start.family
    if size > 1:
        sp_stage.check(size, train_args, model_args, data_args, AutoConfig.from_pretrained(start.base_model),
                       family.model_type, stage=stage.name)
    conversation = Conversation(processor, stage.label_mode, **data_args.template_options())

    def make(records, lengths, source):
        return stage.dataset(records, lengths, source, start, conversation)

    drawn: dict = {}
    train_set, eval_set = build_datasets(data_args, processor, family, start.budget, train_args.seed, make,
                                         conversation, stage.records or stage.name, drawn)
    for dataset in (train_set, eval_set):
        if dataset is not None and stage.check is not None:
            stage.check(dataset)
    if len(train_set) == 0:
        raise ConfigError(stage.empty)

    with output_lock(train_args.output_dir):  # one run per output folder
        if int(os.environ.get("RANK", "0")) == 0:
            run.write_mixture(train_args.output_dir, drawn)
        model, reference, ref_model = ref.policy_and_reference(
            start, model_args, mode_args, train_args, plan, stage.name, stage.reference_user,
            reference=stage.reference, temperature=stage.temperature)
        group = None
        if size > 1 and train_args.device is not None:  # .device starts torch.distributed
            group = sp_stage.start(model, family, size, reference=ref_model)
        fillers = vision_fillers(processor, family.factor) if is_distributed() else None
        run_info = run.run_record(stage=stage.name, plan=plan, dtype=torch_dtype(train_args.bf16, train_args.fp16),
                                  bits=model_args.bits, template_options=data_args.template_options(),
                                  **{stage.name: dict(vars(stage.args))}, **start.record())
        trainer = stage.trainer(
            model=model, args=train_args, train_dataset=train_set, eval_dataset=eval_set,
            data_collator=stage.collator(processor, fillers), processing_class=processor, family=family,
            run_info=run_info, reference=reference, fillers=fillers, sequence_parallel=group, **stage.trainer_kwargs,
        )
        ref.use_reference_copy(trainer, ref_model)
        if stage.prepare is not None:
            stage.prepare(trainer, start, plan, resume, train_set)
        return fit(trainer, train_args, eval_set, resume)

