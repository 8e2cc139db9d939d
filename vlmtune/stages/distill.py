"""Knowledge distillation, ``distill(config)``: config -> student and teacher -> SFT records -> Trainer.

The student learns the teacher's next-token distributions on the reply tokens of SFT records (the run's
``--label_mode`` labels): the generalized Jensen-Shannon divergence of GKD (TRL's ``generalized_jsd_loss``) at
``--temperature``, whose ``--beta`` 0 is the forward KL(teacher || student) and 1 the reverse KL(student || teacher),
plus ``--ce_weight`` times the plain cross-entropy on the labels.

On-policy (GKD, ``--lmbda`` > 0): in that share of the steps the student samples its own reply to each record's
prompt (the conversation up to its last labelled reply), and the divergence is taken on the sampled tokens; the
cross-entropy term is then left out (the samples are no labels).

The teacher must read the student's batches as they are: the same tokenizer and vision token scheme (checked). It
runs in eval mode without gradients, in the run's dtype, on the student's devices (a DeepSpeed inference engine,
partitioned under ZeRO-3, as DPO's reference copy).
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmtune import run
from vlmtune.config import DataArguments, DistillArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data.collator import Collator, vision_fillers
from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.errors import ConfigError
from vlmtune.model import modes
from vlmtune.model.compat import check_compatible
from vlmtune.model.load import dtype_name, torch_dtype
from vlmtune.stages import reference as ref
from vlmtune.stages.common import (
    RECORD_IDS,
    VisionLanguageTrainer,
    check_environment,
    fit,
    is_distributed,
    load_policy,
    output_lock,
    resolve_start,
)
from vlmtune.stages.grpo import VISION_TOKENS, _eos_ids, cut_at_eos
from vlmtune.stages.sft import sft_datasets

logger = logging.getLogger(__name__)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, beta: float,
                 temperature: float) -> torch.Tensor:
    """Mean over labelled tokens of the generalized JSD between the teacher's and the student's next-token
    distributions (logits at position t predict token t + 1; ``labels`` unshifted, -100 where nothing trains),
    through TRL's GKD loss. The vocabularies are cut to the shorter of the two (padding rows of an embedding)."""
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return GKDTrainer.generalized_jsd_loss(student_logits[:, :-1, :vocab], teacher_logits[:, :-1, :vocab],
                                           labels=labels[:, 1:], beta=beta, temperature=temperature)


def prompt_end(labels: torch.Tensor) -> int:
    """Where a row's last labelled span (its last reply) starts: the prompt of an on-policy sample ends there."""
    labelled = (labels != IGNORE_INDEX).int()
    starts = ((labelled[1:] - labelled[:-1]) == 1).nonzero()
    return int(starts[-1]) + 1 if len(starts) else int(labelled.argmax())


class DistillTrainer(VisionLanguageTrainer):
    """``VisionLanguageTrainer`` whose loss is the student's divergence from a frozen teacher (plus CE)."""

    def __init__(self, *args, distill: DistillArguments, teacher, fillers=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill = distill
        self.teacher = teacher
        self.model_accepts_loss_kwargs = False  # a per-batch mean: the Trainer divides it for accumulation
        self.loss_is_scaled_for_ga = False
        tokenizer = self.processing_class.tokenizer
        self.rows = Collator(tokenizer.pad_token_id, fillers=fillers)
        self.sampler_rows = Collator(tokenizer.pad_token_id)
        self.eos_ids = _eos_ids(self.model, tokenizer)
        self.suppressed = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
        self._coin = random.Random(self.args.seed)
        self._metrics: dict[str, defaultdict] = {"train": defaultdict(list), "eval": defaultdict(list)}

    # ------------------------------------------------------------ batches: the records', or the student's samples

    def training_step(self, model, inputs, num_items_in_batch=None):
        on_policy = self._coin.random() < self.distill.lmbda
        batch = self._on_policy(model, inputs["items"]) if on_policy else self.rows(inputs["items"])
        batch[RECORD_IDS] = inputs.get(RECORD_IDS, [])
        self._metrics["train"]["distill/on_policy"].append(float(on_policy))
        return super().training_step(model, batch, num_items_in_batch)

    @torch.no_grad()
    def _on_policy(self, model, items: list[dict]) -> dict:
        """Each item's prompt with a reply the student samples (``--max_new_tokens``), labelled on the sample."""
        from trl.models.utils import unwrap_model_for_generation

        rows = []
        was_training = model.training
        model.eval()
        try:
            with unwrap_model_for_generation(model, self.accelerator) as student:
                for item in items:
                    end = prompt_end(item["labels"])
                    prompt = {k: v[:end] if k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels")
                              else v for k, v in item.items()}
                    batch = self._prepare_inputs(self.sampler_rows([prompt]))
                    batch.pop("labels")
                    out = student.generate(**batch, do_sample=True, temperature=self.distill.temperature,
                                           max_new_tokens=self.distill.max_new_tokens, eos_token_id=self.eos_ids,
                                           pad_token_id=self.processing_class.tokenizer.pad_token_id,
                                           suppress_tokens=self.suppressed, use_cache=True)
                    sample = cut_at_eos(out[0, end:], self.eos_ids).cpu()
                    row = {k: v for k, v in prompt.items()}
                    row["input_ids"] = torch.cat([prompt["input_ids"], sample])
                    row["attention_mask"] = torch.ones_like(row["input_ids"])
                    if "mm_token_type_ids" in prompt:
                        row["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(sample)])
                    row["labels"] = torch.cat([torch.full_like(prompt["input_ids"], IGNORE_INDEX), sample])
                    rows.append(row)
        finally:
            model.train(was_training)
        batch = self.rows(rows)
        batch["on_policy"] = True
        return batch

    # ------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        on_policy = inputs.pop("on_policy", False)
        labels = inputs.pop("labels")
        model_inputs = {k: v for k, v in inputs.items() if k in ref.MODEL_KEYS}
        logits = model(**model_inputs, use_cache=False).logits
        with torch.no_grad():
            teacher_logits = self.teacher(**model_inputs, use_cache=False).logits
        divergence = distill_loss(logits, teacher_logits.to(logits.dtype), labels, self.distill.beta,
                                  self.distill.temperature)
        loss = divergence
        self._metrics[mode]["distill/kl"].append(self.accelerator.gather(divergence.detach()[None]).mean().item())
        if self.distill.ce_weight and not on_policy:
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                 ignore_index=IGNORE_INDEX)
            loss = loss + self.distill.ce_weight * ce
            self._metrics[mode]["distill/ce"].append(self.accelerator.gather(ce.detach()[None]).mean().item())
        return (loss, {"logits": logits.detach()}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop(RECORD_IDS, None)
        batch = self._prepare_inputs(self.rows(inputs["items"]))
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch)
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


def collate_items(items: list[dict]) -> dict:
    """Batches stay a list of items until the trainer knows whether the step samples (``--lmbda``)."""
    return {"items": items}


def load_teacher(path: str, start, train_args: TrainingArguments):
    """The teacher in ``path`` (a model folder, a training output or a merged folder), in the run's dtype, eval mode,
    no gradients; checked to read the student's ids and pixels."""
    if not Path(path).exists():
        raise ConfigError(f"--teacher {path} does not exist; give a model folder or a training output")
    loaded = run.load_for_inference(path, dtype=dtype_name(torch_dtype(train_args.bf16, train_args.fp16)),
                                    device="cpu")
    check_compatible(start.processor, start.family, loaded.processor, loaded.family, f"--teacher {path}")
    logger.info("teacher: %s (%s parameters), eval mode, no gradients", loaded.source,
                f"{sum(p.numel() for p in loaded.model.parameters()):,}")
    return ref.frozen_copy(loaded.model)


def distill(model_args: ModelArguments, data_args: DataArguments, mode_args: ModeArguments,
            train_args: TrainingArguments, distill_args: DistillArguments) -> Path:
    """Run one distillation job; returns the output folder."""
    ref.require_trl("distill")
    plan = modes.plan_from_args(mode_args)
    check_environment(model_args, train_args, plan)
    if not distill_args.teacher:
        raise ConfigError("--teacher is required: the model folder (or training output) to distil from")
    if not data_args.data_path:
        raise ConfigError("--data_path is required (SFT records: the replies whose tokens the student learns)")
    if data_args.packing:
        raise ConfigError("--packing is for SFT; distillation runs teacher and student on unpacked rows")
    resume = run.resolve_resume(train_args.resume_from_checkpoint, train_args.output_dir)
    start = resolve_start(model_args, data_args, plan)
    teacher = load_teacher(distill_args.teacher, start, train_args)
    train_set, eval_set = sft_datasets(data_args, start.processor, start.family, start.budget, train_args.seed)
    if len(train_set) == 0:
        raise ConfigError("no training record is left after the length filter; raise --max_seq_length")
    with output_lock(train_args.output_dir):
        model = load_policy(start, model_args, mode_args, train_args, plan)
        ref.disable_dropout(model)
        fillers = vision_fillers(start.processor, start.family.factor) if is_distributed() else None
        run_info = run.run_record(stage="distill", plan=plan, dtype=torch_dtype(train_args.bf16, train_args.fp16),
                                  bits=model_args.bits, template_options=data_args.template_options(),
                                  distill=dict(vars(distill_args)), **start.record())
        trainer = DistillTrainer(
            model=model, args=train_args, train_dataset=train_set, eval_dataset=eval_set,
            data_collator=collate_items, processing_class=start.processor, family=start.family, run_info=run_info,
            distill=distill_args, teacher=teacher, fillers=fillers,
        )
        trainer.teacher = ref.prepare_reference_copy(trainer, teacher)
        logger.info("distillation: %s at temperature %g%s%s", "forward KL" if distill_args.beta == 0 else
                    "reverse KL" if distill_args.beta == 1 else f"generalized JSD (beta {distill_args.beta:g})",
                    distill_args.temperature, f", plus {distill_args.ce_weight:g} x CE" if distill_args.ce_weight
                    else "", f", on-policy in {distill_args.lmbda:.0%} of the steps" if distill_args.lmbda else "")
        return fit(trainer, train_args, eval_set, resume)
