"""Argument dataclasses (model, data, modes, training), YAML + CLI parsing and cross-checks.

Every field has help text; ``vlmtune train --help`` prints them. A YAML file gives defaults that command-line
flags override: ``vlmtune train config.yaml --learning_rate 1e-4``.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser
from transformers import TrainingArguments as HfTrainingArguments
from transformers.trainer_utils import IntervalStrategy

from vlmtune.data_arguments import DataArguments  # noqa: F401 (re-exported: one place, light to import)
from vlmtune.errors import ConfigError
from vlmtune.families import FAMILIES
from vlmtune.flags import boolean_flag, check_fields, dataclass_parser, suggest, within, yaml_to_argv  # noqa: F401 (re-exported)
from vlmtune.stage_config import STAGE_ARGUMENTS


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub name or folder of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL(-MoE) / Qwen3.5(-MoE) model. "
                  "Empty: the embedded "
                  "tiny model (built on first use, random weights), for trying the pipeline on CPU."},
    )
    tiny_family: Literal[tuple(FAMILIES)] = field(  # type: ignore[valid-type]
        default="qwen2_vl", metadata={"help": "Family of the embedded tiny model, when no model is given."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: flash_attention_2, sdpa or eager. Default: flash_attention_2 when "
                  "flash-attn imports and CUDA is present, else sdpa."},
    )
    use_liger: bool = field(
        default=True,
        metadata={"help": "Liger fused kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) on CUDA. "
                  "Switched off, with one log line, where they cannot run."},
    )
    bits: Literal[4, 8, 16] = field(default=16, metadata={"help": "4 or 8: QLoRA through bitsandbytes (CUDA)."})

    def __post_init__(self):
        check_fields(self)


@dataclass
class ModeArguments:
    mode: Literal["full", "lora", "lora_vision"] = field(
        default="lora",
        metadata={"help": "Preset of what trains. full: LLM + merger full, vision frozen. lora: LoRA on the LLM, the "
                  "rest frozen. lora_vision: LoRA on the LLM and the vision tower, merger full. Flags below adjust."},
    )
    freeze_vision_tower: bool | None = field(
        default=None, metadata={"help": "True: vision tower frozen. False: vision tower trained fully."}
    )
    freeze_merger: bool | None = field(default=None, metadata={"help": "True: merger frozen. False: merger trained."})
    freeze_llm: bool | None = field(default=None, metadata={"help": "True: language model frozen."})
    lora_enable: bool | None = field(default=None, metadata={"help": "LoRA on the language model (False: full)."})
    vision_lora: bool | None = field(default=None, metadata={"help": "LoRA on the vision tower."})
    unfreeze_topk_llm: int = field(default=0, metadata={"help": "Train the last N LLM layers fully (beside LoRA).",
                                                        **within(0)})
    unfreeze_topk_vision: int = field(
        default=0, metadata={"help": "Train the last N vision blocks fully (beside LoRA or a frozen tower).",
                           **within(0)}
    )
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank.", **within(1)})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha.", **within(0, low_open=True)})
    lora_dropout: float = field(
        default=0.05, metadata={"help": "LoRA dropout (0 when LoRA reaches MoE experts: PEFT has none there).",
                             **within(0, 1, high_open=True)}
    )
    lora_target: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module name suffixes to put LoRA on (e.g. q_proj,v_proj,qkv; MoE models: "
                  "experts, or gate_up_proj / down_proj, for the fused expert weights). Default: every linear layer "
                  "of the parts in LoRA mode and, in MoE models, the experts; never lm_head, embeddings or routers "
                  "unless named."},
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA (weight-decomposed LoRA)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling."})
    train_router: bool = field(
        default=False,
        metadata={"help": "Mixture-of-experts models: train the routers fully (frozen by default in every mode; their "
                  "load-balancing loss is added at the config's router_aux_loss_coef either way)."},
    )

    def __post_init__(self):
        check_fields(self)


HF_RANGES = {**dict.fromkeys(("learning_rate", "weight_decay", "max_grad_norm", "num_train_epochs"), within(0)),
             **dict.fromkeys(("adam_beta1", "adam_beta2"), within(0, 1, high_open=True)),
             **dict.fromkeys(("warmup_ratio", "label_smoothing_factor"), within(0, 1)),
             **dict.fromkeys(("per_device_train_batch_size", "per_device_eval_batch_size",
                              "gradient_accumulation_steps"), within(1)), "adam_epsilon": within(0, low_open=True)}
"""Ranges of transformers' own training flags (vlmtune's fields declare theirs with ``within``)."""


@dataclass
class TrainingArguments(HfTrainingArguments):
    """``transformers.TrainingArguments`` plus the learning rates per part and length grouping."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Where checkpoints and the result go."})
    vision_lr: float | None = field(default=None, metadata={"help": "Learning rate of the vision tower.", **within(0)})
    merger_lr: float | None = field(default=None, metadata={"help": "Learning rate of the merger.", **within(0)})
    group_by_length: bool = field(
        default=False, metadata={"help": "Batch records of similar length (text + vision tokens) to cut padding."}
    )
    pure_bf16: bool = field(
        default=False,
        metadata={"help": "With --bf16 and no DeepSpeed: keep trained weights, gradients and AdamW states in bf16 "
                  "too (half their memory; updates below bf16's resolution are lost). Default: fp32 masters."},
    )
    on_nan_loss: Literal["stop", "skip"] = field(
        default="stop",
        metadata={"help": "A loss that is NaN or inf: stop the run, naming the step and the batch's records, or skip "
                  "that optimizer step (no weight changes) and go on."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint-N folder to continue from, `last` (the newest complete checkpoint in "
                  "--output_dir; stops if there is none) or `auto` (the same, or a fresh start if there is none)."},
    )
    eval_generate: bool = field(
        default=False,
        metadata={"help": "At every evaluation, generate a reply for each eval record and report task metrics "
                  "(eval_exact_match, eval_anls, ...) beside the eval loss; --metric_for_best_model and early "
                  "stopping can use them."},
    )
    eval_metrics: str | None = field(
        default=None,
        metadata={"help": "Comma-separated metrics for --eval_generate: exact_match, relaxed, anls, rouge_l, bleu, "
                  "choice, iou, acc@0.5 (default: what fits the references)."},
    )
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Reply length limit for --eval_generate.",
                                                            **within(1)})
    eval_generate_limit: int | None = field(
        default=None, metadata={"help": "Generate on the first N eval records only (default: all).", **within(1)}
    )
    early_stopping_patience: int = field(
        default=0,
        metadata={"help": "Stop after this many evaluations without improvement of --metric_for_best_model "
                  "(0: never).", **within(0)},
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Smallest change of --metric_for_best_model that counts as improvement.",
                              **within(0)}
    )
    sequence_parallel_size: int = field(
        default=1,
        metadata={"help": "Split each record's tokens across groups of this many processes (DeepSpeed's Ulysses "
                  "attention; SFT and DPO, not with --precompute_ref_log_probs; under DDP or --deepspeed ZeRO-2/3, "
                  "not --fsdp): for records too long for one device's activations. Divides the number of "
                  "processes and of attention heads; 1: off.",
                  **within(1)},
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every column (vision tensors)."})
    dataloader_pin_memory: bool = field(
        default=True, metadata={"help": "Pinned host memory for faster copies to a CUDA device (off without one)."}
    )

    def __post_init__(self):
        check_fields(self, HF_RANGES)
        if self.load_best_model_at_end and self.eval_strategy in ("no", IntervalStrategy.NO):
            raise ConfigError("--load_best_model_at_end needs evaluations: give an eval split (--eval_data_path or "
                              "--val_ratio) and --eval_strategy steps or epoch, as --save_strategy")
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.gradient_checkpointing_kwargs is None:
            # Non-reentrant: LoRA inside a frozen vision tower still gets gradients.
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}
        if self.dataloader_pin_memory:  # pinning means nothing without a CUDA device; torch warns on every loader
            import torch

            self.dataloader_pin_memory = torch.cuda.is_available()
        if self.deepspeed or self.sequence_parallel_size > 1:
            # Before the parent starts torch.distributed (on CPU accelerate starts it without DeepSpeed): DeepSpeed's
            # TorchBackend.barrier takes the world group as a default argument when first imported, and a group
            # imported after would then outlive destroy_process_group, until interpreter exit. (Not installed:
            # what needs it says so later.)
            with contextlib.suppress(ImportError):
                import deepspeed.comm  # noqa: F401
        super().__post_init__()


DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class InferenceArguments:
    """The flags ``vlmtune predict`` and ``vlmtune eval`` share: the model and how replies are generated."""

    model: str | None = field(default=None, metadata={
        "help": "model folder (base, merged or full fine-tune), or a training output with adapters; with --adapter: "
                "the base model (default: the run's)"})
    adapter: str | None = field(default=None, metadata={"help": "training output or checkpoint with LoRA adapters"})
    limit: int | None = field(default=None, metadata={"help": "only the first N records of --data", **within(1)})
    batch_size: int = field(default=8, metadata={"help": "prompts generated together (--data)", **within(1)})
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "longest reply", **within(1)})
    dtype: str | None = field(default=None, metadata={"help": "bfloat16, float16 or float32 (default: the model's)"})
    device: str | None = field(default=None, metadata={"help": "default: cuda if present, else cpu"})

    def __post_init__(self):
        check_fields(self)


INFERENCE_DATA_FIELDS = ("image_folder", "video_folder", "box_format", "enable_thinking",  # shared with train
                         *DataArguments().budget_overrides())


ARGUMENT_CLASSES = (ModelArguments, DataArguments, ModeArguments, TrainingArguments)
"""The flags every training stage shares; each stage's own (``vlmtune.stage_config``) are parsed after them."""


def parse_train_args(argv: list[str] | None = None, prog: str = "vlmtune train", stage: str = "sft"):
    """(model, data, mode, training[, stage]) arguments from an optional YAML file (first argument) and flags;
    ``stage`` "dpo" / "grpo" adds that stage's arguments (``DPOArguments``, ``GRPOArguments``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    classes = ARGUMENT_CLASSES + ((STAGE_ARGUMENTS[stage],) if stage in STAGE_ARGUMENTS else ())
    parser = dataclass_parser(classes, prog=prog, allow_abbrev=False)  # a typo never means another flag
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        argv = yaml_to_argv(Path(argv.pop(0)), parser, prog) + argv
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as exc:  # transformers' own checks of the arguments (e.g. an unknown scheduler name)
        raise ConfigError(" ".join(str(exc).split())) from None
    if unknown:
        raise ConfigError(_unknown_flags_message(parser, unknown, prog))
    _check_eval_split(parsed[1], parsed[3])
    if stage != "sft" and parsed[1].stage != "sft":
        raise ConfigError(f"--stage {parsed[1].stage} is for `vlmtune train`; {prog} trains its own stage")
    return tuple(parsed)


def _check_eval_split(data: DataArguments, training: TrainingArguments) -> None:
    """Evaluation settings that need an eval split, checked before anything loads."""
    evaluates = training.eval_strategy not in ("no", IntervalStrategy.NO)
    for flag, on in (("--load_best_model_at_end", training.load_best_model_at_end), ("--eval_strategy", evaluates)):
        if on and not (data.eval_data_path or data.val_ratio):
            raise ConfigError(f"{flag} needs an eval split: give --eval_data_path or --val_ratio")


def _unknown_flags_message(parser: HfArgumentParser, unknown: list[str], prog: str = "vlmtune train") -> str:
    parts = [suggest(parser, flag) for flag in unknown if flag.startswith("-")]
    if not parts:
        return f"unexpected argument(s): {' '.join(unknown)}; every value follows its --flag"
    return f"unknown option(s): {', '.join(parts)}; `{prog} --help` lists them"
