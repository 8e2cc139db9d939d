"""The set-up every stage shares, before its Trainer exists: the checks of the environment, where a run starts
(model, processor, budgets), the datasets checked up front, and the model to train."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import set_seed

from vlmtune import run
from vlmtune.config import DataArguments, ModeArguments, ModelArguments, TrainingArguments
from vlmtune.data import media, mixture
from vlmtune.data.check import check_data
from vlmtune.data.dataset import take
from vlmtune.errors import ConfigError, DataError, MixtureError
from vlmtune.families import Family
from vlmtune.model import modes
from vlmtune.model.load import (
    check_quantization,
    disable_kv_cache,
    dtype_name,
    load_family,
    load_model,
    resolve_model_path,
    torch_dtype,
)
from vlmtune.model.zero3 import whole_weights

logger = logging.getLogger(__name__)


def deepspeed_config(value) -> dict:
    """The DeepSpeed config ``--deepspeed`` names: a JSON file, a JSON string or (from Python) a dict."""
    if isinstance(value, dict):
        return value
    path = Path(value)
    if not path.is_file() and not str(value).lstrip().startswith("{"):
        raise ConfigError(f"--deepspeed {value}: no such file")
    try:
        return json.loads(path.read_text() if path.is_file() else value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--deepspeed {value}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def check_environment(model_args: ModelArguments, train_args: TrainingArguments, plan: modes.TrainPlan) -> None:
    """What this machine and the flags cannot run together stops here, as one ``ConfigError``, before anything
    loads."""
    if model_args.bits in (4, 8) and (plan.llm == "full" or plan.topk_llm):
        raise ConfigError(f"--bits {model_args.bits} quantizes the language model, whose weights then cannot train "
                          "fully (--mode full, --lora_enable False or --unfreeze_topk_llm); QLoRA trains LoRA on it: "
                          "use --mode lora or lora_vision")
    if model_args.bits in (4, 8) and not torch.cuda.is_available():
        raise ConfigError(f"--bits {model_args.bits} (QLoRA through bitsandbytes) needs a CUDA device; none is here")
    if train_args.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 needs a CUDA device; use --bf16 or fp32 on CPU")
    config = deepspeed_config(train_args.deepspeed) if train_args.deepspeed else {}
    if "optimizer" in config:
        raise ConfigError(f"the DeepSpeed config {train_args.deepspeed} has an \"optimizer\" block: DeepSpeed would "
                          "build its own optimizer over every trainable weight at one learning rate, dropping "
                          "vlmtune's rates per part (--vision_lr, --merger_lr) and the groups without weight decay "
                          "(biases, norms). Remove the block; --learning_rate, --weight_decay, --adam_beta1, "
                          "--adam_beta2 and --adam_epsilon set what it held")
    _check_offloaded_optimizer(train_args, config)
    if train_args.on_nan_loss == "skip" and train_args.deepspeed:
        raise ConfigError("--on_nan_loss skip does not work with DeepSpeed (its engine steps the optimizer inside "
                          "the backward pass, where vlmtune cannot drop the step); use --on_nan_loss stop")
    if train_args.fsdp and train_args.deepspeed:  # sp: the two engines (stages/engines.py)
        raise ConfigError("--fsdp and --deepspeed are two engines for the same job: give one of them (ENGINE=fsdp2 "
                          "in the scripts drops DEEPSPEED)")


OFFLOAD_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
"""The ``--optim`` values that survive DeepSpeed's optimizer offload as they are: accelerate swaps the optimizer for
a DeepSpeed CPU optimizer (``map_pytorch_optim_to_deepspeed``), torch's AdamW for CPU Adam in AdamW mode; any other
optimizer silently becomes CPU Adam, and Adagrad's twin fails on an argument it does not take
(tests/test_upstream.py)."""


def _check_offloaded_optimizer(train_args: TrainingArguments, config: dict) -> None:
    """``--optim`` against the DeepSpeed ``config``'s optimizer offload (see ``OFFLOAD_OPTIMIZERS``)."""
    device = ((config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    optim = getattr(train_args.optim, "value", train_args.optim)
    if device not in (None, "none") and config.get("zero_force_ds_cpu_optimizer", True) \
            and optim not in OFFLOAD_OPTIMIZERS:
        raise ConfigError(f"--optim {optim} cannot run with the DeepSpeed config {train_args.deepspeed}, which "
                          f"offloads the optimizer to {device}: accelerate would swap it for one of DeepSpeed's "
                          f"CPU optimizers, which is not {optim}. Use --optim {', '.join(OFFLOAD_OPTIMIZERS)}, or "
                          "a config without offload_optimizer")


@dataclass
class Start:
    """What a run starts from: the base model, the LoRA run merged into it first (if any), and the processor,
    family and media budgets of the run."""

    base_model: str
    init_run: run.RunInfo | None
    family: Family
    processor: object
    budget: media.MediaBudget
    budget_overrides: dict

    def record(self, **extra) -> dict:
        """The ``run_record`` keyword arguments that say where the run started."""
        if self.init_run is not None:
            extra["init_run"] = str(self.init_run.folder.resolve())
        return {"base_model": self.base_model, "family": self.family,
                "budget_overrides": self.budget_overrides, **extra}


def resolve_start(model_args: ModelArguments, data_args: DataArguments, plan: modes.TrainPlan) -> Start:
    """The model, processor and budgets a run starts from. ``--model_name_or_path`` may be a model, or the output
    folder of a LoRA run (an SFT run before DPO or GRPO): its processor and budget options carry over (flags given
    now win), and its adapters are merged into its base model when the model loads."""
    model_path = resolve_model_path(model_args.model_name_or_path, model_args.tiny_family)
    base_model, init_run = run.start_of(model_path)
    if init_run is not None:
        if model_args.bits in (4, 8):
            raise ConfigError(f"--bits {model_args.bits} cannot start from LoRA adapters ({model_path}): their "
                              "merge into quantized weights is lossy; `vlmtune merge` the run first and start from "
                              "the merged folder")
        logger.info("starting from the run in %s: %s with its adapters merged in", model_path, base_model)
    family = load_family(base_model, f"--model_name_or_path {model_path}" if init_run is None else None)
    modes.check_family(plan, family)  # what cannot train on this family stops here, before anything loads
    check_quantization(family, model_args.bits)
    processor = run.load_run_processor(init_run, base_model)
    overrides = {**(init_run.budget_overrides if init_run else {}),
                 **{k: v for k, v in data_args.budget_overrides().items() if v is not None}}
    budget = media.budget_from_processor(processor, family.factor, **overrides)
    media.set_processor_budget(processor, budget)  # saved with every checkpoint: serving uses the same budgets
    return Start(base_model, init_run, family, processor, budget, overrides)


def build_datasets(data_args: DataArguments, processor, family: Family, budget: media.MediaBudget, seed: int,
                   make: Callable, conversation, stage: str = "sft", drawn: dict | None = None):
    """(train, eval or None) datasets of a stage: every file checked up front, labels included, with
    ``conversation`` (the summary logged, errors raised as ``DataError``), a held-out split drawn with ``seed``,
    and ``make(records, lengths, source)`` building each dataset from its records and measured lengths.

    ``--data_path`` / ``--eval_data_path`` may list several files with weights or counts (``data/mixture.py``):
    each file is checked alone, ``--val_ratio`` holds out that share of each file, and what was drawn from each
    file goes into ``drawn`` (for the run folder's ``mixture.json``)."""

    def checked(path: str):
        result = check_data(
            path, processor, family, budget, image_folder=data_args.image_folder,
            video_folder=data_args.video_folder, allow_urls=data_args.allow_urls, deep=data_args.deep_check,
            max_seq_length=data_args.max_seq_length, conversation=conversation, stage=stage,
            box_format=data_args.box_format, data_format=data_args.data_format,
        )
        logger.info("data check\n%s", result.summary(with_problems=not result.errors))  # errors: listed once, below
        if result.errors:
            raise DataError(result.file, result.problems)
        return result.records, result.lengths

    train_mix = mixture.parse_mixture(data_args.data_path, "--data_path")
    eval_mix = mixture.parse_mixture(data_args.eval_data_path, "--eval_data_path")
    ratio = 0.0 if data_args.eval_data_path else data_args.val_ratio
    eval_records, eval_lengths, held = [], [], None
    if train_mix is None:  # SFT: lazy records from the data store, and their lengths
        records, lengths = checked(data_args.data_path)
        source = data_args.data_path
    else:
        records, lengths, held, rows = _mixed(train_mix, "--data_path", checked, seed, 0, ratio)
        source = ", ".join(e.path for e in train_mix)
        if drawn is not None:
            drawn.update(seed=seed, train=rows)
    if eval_mix is not None:
        eval_records, eval_lengths, _, rows = _mixed(eval_mix, "--eval_data_path", checked, seed, 1, 0.0)
        if drawn is not None:
            drawn.update(seed=seed, eval=rows)
    elif data_args.eval_data_path:
        eval_records, eval_lengths = checked(data_args.eval_data_path)
    elif held is not None:  # --val_ratio of each file of the mixture
        eval_records, eval_lengths, rows = held
        if drawn is not None:
            drawn["eval"] = rows
    elif data_args.val_ratio:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(records) * data_args.val_ratio))
        eval_at, train_at = order[:n_eval], sorted(order[n_eval:])
        eval_records, eval_lengths = take(records, eval_at), [lengths[i] for i in eval_at]
        records, lengths = take(records, train_at), [lengths[i] for i in train_at]
    train_set = make(records, lengths, source)
    if not len(eval_records):
        return train_set, None
    eval_source = (", ".join(e.path for e in eval_mix) if eval_mix else data_args.eval_data_path) or source
    return train_set, make(eval_records, eval_lengths, eval_source)


def _checked_entry(checked: Callable, entry: mixture.Entry, flag: str):
    """A file of a list, checked: a file that cannot be read at all (empty, not JSON) is one line naming the flag
    and the entry; errors in its records are listed as for one file (``DataError``)."""
    try:
        return checked(entry.path)
    except DataError as exc:
        errors = [p for p in exc.problems if p.level == "error"]
        if len(errors) == 1 and errors[0].index is None:
            raise MixtureError(f"{flag}: entry {entry.path}: {errors[0].message}") from None
        raise


def _mixed(entries: list[mixture.Entry], flag: str, checked: Callable, seed: int, purpose: int, ratio: float):
    """(records, lengths, held-out (records, lengths, rows) or None, rows) of a list of files: each checked, then
    ``ratio`` of each held out and the rest drawn as its weight or count asks (rows: what was drawn, per file)."""
    files = [_checked_entry(checked, e, flag) for e in entries]  # every file checked before anything is drawn
    for e, (records, _) in zip(entries, files):
        if not len(records):
            raise MixtureError(f"{flag}: entry {e.path}: no valid records in the file")
    splits = [mixture.split_off(len(r), ratio, mixture.rng_for(seed, i, 2)) if ratio
              else (np.arange(len(r)), np.zeros(0, np.int64)) for i, (r, _) in enumerate(files)]
    wanted = mixture.targets(entries, [len(train_at) for train_at, _ in splits])
    parts, lengths, rows, held_parts, held_lengths, held_rows = [], [], [], [], [], []
    for i, (e, (records, lens), (train_at, held_at), n) in enumerate(zip(entries, files, splits, wanted)):
        lens = np.asarray(lens)
        at = train_at[mixture.draw(len(train_at), n, mixture.rng_for(seed, i, purpose))]
        parts.append(take(records, at))
        lengths.append(lens[at])
        rows.append(mixture.drawn_record(e, len(records), len(held_at), mixture.file_indices(records, at)))
        if len(held_at):
            held_parts.append(take(records, held_at))
            held_lengths.append(lens[held_at])
            held_rows.append(mixture.drawn_record(e, len(records), len(held_at),
                                                  mixture.file_indices(records, held_at)))
        logger.info("%s: %s gives %s of its %s valid records%s", flag, e.path, f"{n:,}", f"{len(records):,}",
                    f" ({len(held_at):,} held out for eval)" if len(held_at) else "")
    held = (mixture.Concat(held_parts), np.concatenate(held_lengths), held_rows) if held_parts else None
    return mixture.Concat(parts), np.concatenate(lengths), held, rows


def init_distributed(train_args: TrainingArguments) -> None:
    """DeepSpeed's communication layer, before any model loads: ZeRO-3 partitions weights while from_pretrained
    builds the model, and must know the world size by then (on CPU, accelerate's set-up does not do it)."""
    logger.info("device: %s", f"CUDA x{torch.cuda.device_count()}" if torch.cuda.is_available() else "CPU")
    if train_args.deepspeed:
        import deepspeed

        _ = train_args.device  # torch.distributed first
        deepspeed.init_distributed()


def load_start_model(start: Start, model_args: ModelArguments, dtype: torch.dtype):
    """The model a run starts from, in ``dtype``: the base model, or the base with the start run's adapters (and
    fully trained parts) merged in. Merged models are built whole, also under ZeRO-3 (DeepSpeed partitions them
    when the engine starts)."""
    if start.init_run is None:
        model, _ = load_model(start.base_model, dtype=dtype, attn_implementation=model_args.attn_implementation,
                              bits=model_args.bits, use_liger=model_args.use_liger)
        return model
    with whole_weights():
        peft_model, _ = run.load_model_with_adapters(start.init_run, start.base_model, dtype,
                                                     attn_implementation=model_args.attn_implementation,
                                                     use_liger=model_args.use_liger)
        return peft_model.merge_and_unload()


def load_policy(start: Start, model_args: ModelArguments, mode_args: ModeArguments,
                train_args: TrainingArguments, plan: modes.TrainPlan):
    """The model to train: loaded, KV cache off, the plan applied (LoRA, what trains), fp32 masters of what
    trains unless DeepSpeed or --pure_bf16 keeps its own."""
    init_distributed(train_args)
    dtype = torch_dtype(train_args.bf16, train_args.fp16)
    model = load_start_model(start, model_args, dtype)
    disable_kv_cache(model)
    set_seed(train_args.seed)  # LoRA's initial weights are drawn here, before the Trainer seeds anything
    model = modes.apply_plan(model, start.family, plan, mode_args)
    logger.info("training plan: %s\n%s", plan.describe(), modes.trainable_report(model, start.family))
    if not (train_args.deepspeed or train_args.pure_bf16) and (upcast := modes.fp32_master_weights(model)):
        logger.info("fp32 master weights for %s trained parameters (the forward runs in %s through autocast)",
                    f"{upcast:,}", dtype_name(dtype))
    return model


def is_distributed() -> bool:
    """Whether this process is one of several (a launcher set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
