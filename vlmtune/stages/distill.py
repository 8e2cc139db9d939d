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
partitioned under ZeRO-3, as DPO's reference copy); ``--teacher_bits 8`` loads its language-model Linear layers in
bitsandbytes' LLM.int8 (QLoRA's skip modules: vision tower and LM head unquantized) straight onto the device.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmtune import run
from vlmtune.config import DataArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data.collator import Collator
from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.data.dataset import VisionLanguageDataset
from vlmtune.data.prompts import completion_row
from vlmtune.errors import ConfigError
from vlmtune.generation import VISION_TOKENS, eos_ids, sample_group
from vlmtune.model.compat import check_compatible
from vlmtune.model.load import MOE_UNQUANTIZED, dtype_name, load_family, load_model, torch_dtype
from vlmtune.stage_config import DistillArguments
from vlmtune.stages import reference as ref
from vlmtune.stages.policy import PolicyStage, PolicyTrainer, run_policy_stage
from vlmtune.stages.trainer import RECORD_IDS

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


class DistillTrainer(PolicyTrainer):
    """``PolicyTrainer`` whose loss is the student's divergence from a frozen teacher (plus CE); no reference."""

    def __init__(self, *args, distill: DistillArguments, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill = distill
        self.teacher = teacher
        tokenizer = self.processing_class.tokenizer
        self.rows = Collator(tokenizer.pad_token_id, fillers=self.fillers)
        self.sampler_rows = Collator(tokenizer.pad_token_id)
        self.eos_ids = eos_ids(self.model, tokenizer)
        self.suppressed = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
        self._coin = random.Random(self.args.seed)

    # ------------------------------------------------------------ batches: the records', or the student's samples

    def training_step(self, model, inputs, num_items_in_batch=None):
        on_policy = self._coin.random() < self.distill.lmbda
        batch = self._on_policy(model, inputs["items"]) if on_policy else self.rows(inputs["items"])
        batch[RECORD_IDS] = inputs.get(RECORD_IDS, [])
        self.record_metric("train", "distill/on_policy", float(on_policy))
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
                    sample, = sample_group(student, batch, self.eos_ids, self.processing_class.tokenizer.pad_token_id,
                                           self.suppressed, self.distill.temperature,
                                           max_new_tokens=self.distill.max_new_tokens)
                    rows.append(completion_row(prompt, sample.cpu()))
        finally:
            model.train(was_training)
        batch = self.rows(rows)
        batch["on_policy"] = True
        return batch

    # ------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = self.mode_of(model)
        on_policy = inputs.pop("on_policy", False)
        labels = inputs.pop("labels")
        model_inputs = {k: v for k, v in inputs.items() if k in ref.MODEL_KEYS}
        logits = model(**model_inputs, use_cache=False).logits
        with torch.no_grad():
            teacher_logits = self.teacher(**model_inputs, use_cache=False).logits
        divergence = distill_loss(logits, teacher_logits.to(logits.dtype), labels, self.distill.beta,
                                  self.distill.temperature)
        loss = divergence
        self.record_metric(mode, "distill/kl", self.accelerator.gather(divergence.detach()[None]).mean().item())
        if self.distill.ce_weight and not on_policy:
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                 ignore_index=IGNORE_INDEX)
            loss = loss + self.distill.ce_weight * ce
            self.record_metric(mode, "distill/ce", self.accelerator.gather(ce.detach()[None]).mean().item())
        return (loss, {"logits": logits.detach()}) if return_outputs else loss

    def eval_inputs(self, model, inputs: dict) -> dict:
        return self.rows(inputs["items"])  # evaluation is off-policy: the records' own replies


def collate_items(items: list[dict]) -> dict:
    """Batches stay a list of items until the trainer knows whether the step samples (``--lmbda``)."""
    return {"items": items}


def check_teacher(path: str, start) -> None:
    """The teacher's folder exists and its processor reads the student's batches as they are (one line if not)."""
    if not Path(path).exists():
        raise ConfigError(f"--teacher {path} does not exist; give a model folder or a training output")
    base, init_run = run.start_of(path)
    check_compatible(start.processor, start.family, run.load_run_processor(init_run, base), load_family(base),
                     f"--teacher {path}")


def check_teacher_bits(distill_args: DistillArguments, train_args: TrainingArguments) -> None:
    """Where ``--teacher_bits 8`` cannot apply, one line before anything loads."""
    if distill_args.teacher_bits == 16 or not Path(distill_args.teacher).exists():
        return  # a missing teacher is check_teacher's to report
    what = f"--teacher_bits 8 with --teacher {distill_args.teacher}"
    if run.start_of(distill_args.teacher)[1] is not None:
        raise ConfigError(f"{what}: the teacher is a LoRA training output, whose adapters would have to be merged "
                          "into its base before quantizing; merge it first with vlmtune merge and give the merged "
                          "folder as --teacher")
    family = load_family(distill_args.teacher, f"--teacher {distill_args.teacher}")
    if family.is_moe:
        raise ConfigError(f"{what}: a {family.model_type} teacher: {MOE_UNQUANTIZED}; use --teacher_bits 16")
    if train_args.deepspeed:
        raise ConfigError(f"{what} and --deepspeed: DeepSpeed partitions (ZeRO-3) or wraps the teacher's weights, "
                          "which bitsandbytes' int8 layers do not survive; use --teacher_bits 16 (ZeRO-3 shards the "
                          "teacher) or leave out --deepspeed")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{what}: bitsandbytes is not importable ({exc}); pip install 'vlmtune[quant]', or use "
                          "--teacher_bits 16") from None


def load_teacher(path: str, train_args: TrainingArguments, bits: int = 16, device: torch.device | str = "cpu"):
    """The teacher in ``path`` (a model folder, a training output or a merged folder), in the run's dtype, eval mode,
    no gradients; ``bits`` 8: a model folder with its Linear layers in LLM.int8, loaded on ``device`` (a quantized
    model is placed at load, not moved)."""
    dtype = torch_dtype(train_args.bf16, train_args.fp16)
    if bits == 8:
        model, _ = load_model(path, dtype=dtype, bits=8, device_map={"": str(device)}, kbit_training=False)
        source = f"{path} in 8 bits (LLM.int8)"
    else:
        loaded = run.load_for_inference(path, dtype=dtype_name(dtype), device="cpu")
        model, source = loaded.model, loaded.source
    logger.info("teacher: %s (%s parameters, %.1f MB), eval mode, no gradients", source,
                f"{sum(p.numel() for p in model.parameters()):,}", parameter_bytes(model) / 1e6)
    return ref.frozen_copy(model)


def parameter_bytes(model) -> int:
    """The bytes a model's parameters and buffers hold (int8 weights at one byte, plus their row scales, which
    bitsandbytes keeps on the weight as ``SCB``)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t.SCB for t in tensors if isinstance(getattr(t, "SCB", None), torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def distill(model_args: ModelArguments, data_args: DataArguments, mode_args: ModeArguments,
            train_args: TrainingArguments, distill_args: DistillArguments) -> Path:
    """Run one distillation job; returns the output folder."""
    if not distill_args.teacher:
        raise ConfigError("--teacher is required: the model folder (or training output) to distil from")
    check_teacher_bits(distill_args, train_args)

    def dataset(records, lengths, source, start, conversation):
        check_teacher(distill_args.teacher, start)  # before the student loads
        return VisionLanguageDataset(records, start.processor, start.family, start.budget, conversation,
                                     data_args.max_seq_length, data_args.strict_length, lengths, source)

    def prepare(trainer: DistillTrainer, start, plan, resume: str | None, train_set) -> None:
        teacher = load_teacher(distill_args.teacher, train_args, distill_args.teacher_bits, trainer.accelerator.device)
        trainer.teacher = ref.prepare_reference_copy(trainer, teacher)  # an 8-bit teacher (no DeepSpeed) stays put
        logger.info("distillation: %s at temperature %g%s%s", "forward KL" if distill_args.beta == 0 else
                    "reverse KL" if distill_args.beta == 1 else f"generalized JSD (beta {distill_args.beta:g})",
                    distill_args.temperature, f", plus {distill_args.ce_weight:g} x CE" if distill_args.ce_weight
                    else "", f", on-policy in {distill_args.lmbda:.0%} of the steps" if distill_args.lmbda else "")

    return run_policy_stage(PolicyStage(
        name="distill", args=distill_args, trainer=DistillTrainer, trainer_kwargs={"distill": distill_args},
        dataset=dataset, records="sft", label_mode=data_args.label_mode,
        collator=lambda processor, fillers: collate_items,  # items: the trainer decides whether the step samples
        data_path="SFT records: the replies whose token distributions the student learns",
        no_packing="distillation runs teacher and student on unpacked rows",
        empty="no training record is left after the length filter; raise --max_seq_length",
        reference=False, prepare=prepare,
    ), model_args, data_args, mode_args, train_args)
