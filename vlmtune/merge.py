"""``vlmtune merge``: LoRA adapters + saved non-LoRA trainables -> a standalone, verified model folder.

A training output (or checkpoint) holds PEFT adapter files, ``non_lora_trainables.safetensors`` (parameters that
trained fully beside LoRA, e.g. the merger, under the base model's in-memory names) and ``vlmtune_run.json``
(base model, family, plan, dtype). Merging:

1. loads the base model in the training dtype and puts the adapters on it, strictly: adapter weights that match
   no LoRA layer, LoRA layers without weights, and non-LoRA trainables that are unknown, reshaped or missing
   (per the run's plan) all stop the merge with their names;
2. computes logits of base + adapters on a batch of records: the user's data (``--data_path``), else a few
   conversations over images drawn in memory (``vlmtune.data.synthetic``), through the same processor path;
3. merges with PEFT's ``merge_and_unload``, casts to the output dtype and compares logits again;
4. writes the model, the processor (with the training budgets) and ``vlmtune_run.json`` into a temporary folder
   beside the output, copies the base folder's other files (license, tokenizer vocabularies, ...) but none of
   the configs the save wrote anew (a legacy ``preprocessor_config.json`` or ``chat_template.json`` of the base
   would contradict them), reloads the folder with ``AutoModelForImageTextToText`` and compares logits a third
   time, then renames the folder into place once its files reached the disk (``checkpoints.publish_folder``, as
   checkpoints are published).

A QLoRA run (``bits`` 4 or 8 in ``vlmtune_run.json``) trained its adapters on a quantized language model; merge
folds them into the full-precision base, says what that means, and compares the merged model with the quantized
base + adapters (what training ran) when bitsandbytes can run here.

A difference above tolerance, or any error, leaves no output behind. A full fine-tune's output already is a
standalone model: merge says so and only checks that it loads and gives finite logits.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmtune.checkpoints import publish_folder
from vlmtune.data import media
from vlmtune.data.synthetic import synthetic_batch
from vlmtune.errors import ConfigError, MergeError
from vlmtune.families import Family, family_for
from vlmtune.flags import check_value, need_file, need_folder
from vlmtune.generation import Progress
from vlmtune.model import reward
from vlmtune.model.hub_layout import write_hub_layout
from vlmtune.model.load import dtype_name, parse_dtype, saved_dtype
from vlmtune.run import (
    RUN_FILE,
    RunInfo,
    base_model_of,
    load_model_with_adapters,
    load_run_processor,
    read_run,
    run_budget,
)

logger = logging.getLogger(__name__)

DEFAULT_ATOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
"""Absolute tolerance on logits, scaled by max(1, largest |logit|) for half precision (see ``tolerance``)."""
DEFAULT_VERIFY_SAMPLES = 4
MERGE_STEPS = 6
"""Steps a merge counts on its progress bar / log lines: base + adapters loaded, their logits, adapters merged,
merged logits checked, folder written, folder reloaded and checked."""
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.msgpack|\.h5|\.ckpt|\.gguf)$|\.index\.json$")


@dataclass
class MergeResult:
    """What ``merge`` did: the folder written (None when the input already was standalone) and the checks."""

    output_dir: Path | None
    standalone: bool
    dtype: str
    diffs: dict[str, float] = field(default_factory=dict)
    """max |logits difference| per check: ``merged`` (in memory) and ``reloaded`` (from the written folder)."""
    tolerance: float = 0.0
    samples: int = 0
    seconds: float = 0.0
    same_files_as_base: bool | None = None


# ---------------------------------------------------------------- inputs


def check_output_dir(output_dir: str | Path, force: bool, protected: list[str | Path]) -> Path:
    """The output folder, refused when it holds files (unless ``force``) or when it is one of the inputs."""
    out = Path(output_dir)
    resolved = out.resolve()
    for other in protected:
        other_path = Path(other).resolve()
        if resolved == other_path or other_path.is_relative_to(resolved):
            raise ConfigError(f"output folder {out} is (or contains) the input {other}; choose another folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"output folder {out} already exists and is not empty; pass --force to replace it")
    return out


# ---------------------------------------------------------------- verification batch


def documents_path() -> Path:
    """data_examples/documents.json of the source tree (in a clone / editable install)."""
    return Path(__file__).resolve().parents[1] / "data_examples" / "documents.json"


def verification_batch(processor, family: Family, budget: media.MediaBudget, data_path: str | Path | None = None,
                       image_folder: str | None = None, video_folder: str | None = None,
                       samples: int = DEFAULT_VERIFY_SAMPLES) -> tuple[dict[str, torch.Tensor], int]:
    """(batch, number of records): up to ``samples`` records of the data file, one of each shape first
    (image, video, multi-image, ...), encoded by the project's dataset and collator; without a data file, the
    synthetic records of ``vlmtune.data.synthetic`` (drawn images, short conversations), encoded the same way. A
    processor without a chat template (a base model's) reads the data as CPT documents (``--stage cpt``; default:
    data_examples/documents.json)."""
    from vlmtune.data.collator import Collator
    from vlmtune.data.conversation import Conversation
    from vlmtune.data.dataset import VisionLanguageDataset
    from vlmtune.data.document import Document
    from vlmtune.data.records import load_records

    documents = not getattr(processor, "chat_template", None)
    if data_path is None:
        if not documents:
            batch = synthetic_batch(processor, budget, samples)
            batch.pop("labels", None)
            return batch, len(batch["input_ids"])
        data_path = documents_path()
        if not data_path.is_file():
            raise ConfigError("the model's processor has no chat template: pass --data_path with a few CPT documents "
                              "({\"text\", \"image\"}) to verify the merge on")
    records = load_records(data_path, image_folder, video_folder, budget=budget, min_image_side=family.factor,
                           stage="cpt" if documents else "sft")
    preferred = ("image+video", "video", "multi_image", "image", "text")
    chosen, shapes = [], set()
    for shape in preferred:
        for record in records:
            if record.shape == shape and shape not in shapes:
                chosen.append(record)
                shapes.add(shape)
    chosen += [r for r in records if r not in chosen]
    chosen = sorted(chosen[: max(1, samples)], key=lambda r: r.index)
    encoder = Document(processor) if documents else Conversation(processor)
    dataset = VisionLanguageDataset(chosen, processor, family, budget, encoder)
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    batch.pop("labels", None)
    return batch, len(dataset)


@torch.no_grad()
def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 logits of the real (unpadded) tokens, on the CPU."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    logits = model(**inputs, use_cache=False).logits
    return logits[batch["attention_mask"].bool().to(device)].float().cpu()


def tolerance(dtype: torch.dtype, reference: torch.Tensor, atol: float | None) -> float:
    """``atol`` if given; else the dtype's default, scaled by the logits' magnitude in half precision
    (one rounding of a logit of size L costs about L * 2**-8 in bfloat16)."""
    if atol is not None:
        return atol
    base = DEFAULT_ATOL[dtype]
    if dtype == torch.float32:
        return base
    return base * max(1.0, float(reference.abs().max()))


# ---------------------------------------------------------------- writing


def _default_shard_size(base_model: str, base_dtype: torch.dtype, dtype: torch.dtype) -> str | int:
    """The base folder's largest shard (scaled to the output dtype), so the output is sharded like the base."""
    base = Path(base_model)
    shards = sorted(base.glob("model-*-of-*.safetensors")) if base.is_dir() else []
    if not shards:
        return "50GB"
    largest = max(s.stat().st_size for s in shards)
    scale = torch.empty(0, dtype=dtype).element_size() / torch.empty(0, dtype=base_dtype).element_size()
    return int(largest * scale)


SAVED_CONFIGS = frozenset({
    "config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", RUN_FILE,
})
"""What the model, processor and tokenizer save writes, in today's or a legacy layout: a base folder's copy
would say what the base said (its pixel budgets, its template) beside the merged model's own files."""


def _copy_other_files(base_model: str, out: Path) -> list[str]:
    """Copy the base folder's files the save did not write and that no saved config replaces (a license,
    tokenizer vocabularies, ...)."""
    base = Path(base_model)
    copied = []
    if not base.is_dir():
        return copied
    for src in sorted(base.iterdir()):
        if (src.name.startswith(".") or not src.is_file() or _WEIGHT_FILE.search(src.name)
                or src.name in SAVED_CONFIGS):
            continue
        if not (out / src.name).exists():
            shutil.copy2(src, out / src.name)
            copied.append(src.name)
    return copied


def _against_quantized(run: RunInfo, base: str, dtype: torch.dtype, device: str, batch, merged_logits,
                       out_dtype: torch.dtype) -> dict[str, float]:
    """QLoRA: say what merging into full-precision weights means, and how far the merged model is from the
    quantized base + adapters that training ran (where bitsandbytes runs)."""
    bits = run.info["bits"]
    kind = "4-bit (nf4)" if bits == 4 else "8-bit"
    logger.warning(
        "%s trained its adapters on a %s quantization of the base model's language model (QLoRA). The merge adds "
        "them to the full-precision base weights (%s), which the adapters never saw: the merged model is not the "
        "model that trained, it differs from it by the quantization error of the base weights (usually a small "
        "gain, since the rounding is gone, but not what was measured in training).", run.folder, kind,
        dtype_name(out_dtype))
    try:
        import bitsandbytes  # noqa: F401

        model, _ = load_model_with_adapters(run, base, dtype, device, bits=bits)
        quantized = logits_of(model, batch)
        del model
    except ImportError:
        reason = "bitsandbytes is not installed here (pip install 'vlmtune[quant]')"
    except Exception as exc:  # bitsandbytes without a backend for this device, ...
        reason = f"the quantized base does not run here ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    else:
        diff = float((merged_logits - quantized).abs().max())
        agree = float((merged_logits.argmax(-1) == quantized.argmax(-1)).float().mean())
        logger.warning("against the quantized base + adapters (what training ran): max |logits diff| %.3g, same top "
                       "token at %.1f%% of positions", diff, 100 * agree)
        return {"vs_quantized": diff}
    logger.warning("not compared with the quantized base + adapters: %s", reason)
    return {}


def _reloaded_diff(folder: Path, family: Family, out_dtype: torch.dtype, device: str, batch, reference) -> float:
    """Reload a written folder with ``AutoModelForImageTextToText``: max |logits - reference|, ``MergeError`` unless
    it loads cleanly as the family's class in ``out_dtype``."""
    from transformers import AutoModelForImageTextToText

    reloaded, info = AutoModelForImageTextToText.from_pretrained(str(folder), dtype="auto", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise MergeError(f"the written folder does not load cleanly: {problems}")
    if type(reloaded).__name__ != family.model_class:
        raise MergeError(f"the written folder loads as {type(reloaded).__name__}, not {family.model_class}")
    reloaded_dtype = next(p.dtype for p in reloaded.parameters() if p.is_floating_point())
    if reloaded_dtype != out_dtype:
        raise MergeError(f"the written folder loads as {dtype_name(reloaded_dtype)}, not {dtype_name(out_dtype)}")
    return float((logits_of(reloaded.to(device).eval(), batch) - reference).abs().max())


def file_set(folder: str | Path) -> set[str]:
    """Names of the visible files of a folder (a merged folder's ``vlmtune_run.json`` aside)."""
    return {p.name for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")} - {RUN_FILE}


# ---------------------------------------------------------------- entry points


def verify_standalone(run: RunInfo, data_path=None, image_folder=None, video_folder=None,
                      samples: int = DEFAULT_VERIFY_SAMPLES, device: str | None = None) -> MergeResult:
    """A full fine-tune's output: check that it loads as it is and gives finite logits."""
    from transformers import AutoModelForImageTextToText

    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(str(run.folder), dtype="auto").to(device).eval()
    family = family_for(model.config)
    processor = load_run_processor(run, str(run.folder))
    budget = run_budget(run, processor, family)
    batch, n = verification_batch(processor, family, budget, data_path, image_folder, video_folder, samples)
    logits = logits_of(model, batch)
    if not torch.isfinite(logits).all():
        raise MergeError(f"{run.folder} loads but gives non-finite logits on {n} records: the weights are broken")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    logger.info("%s is a full fine-tune's output, already a standalone %s model (%s): nothing to merge; it "
                "loads with AutoModelForImageTextToText and gives finite logits on %d records", run.folder,
                family.model_class, dtype_name(dtype), n)
    return MergeResult(None, True, dtype_name(dtype), samples=n, seconds=time.perf_counter() - start)


def merge(
    run_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    base_model: str | None = None,
    dtype: str | None = None,
    atol: float | None = None,
    data_path: str | Path | None = None,
    image_folder: str | None = None,
    video_folder: str | None = None,
    samples: int = DEFAULT_VERIFY_SAMPLES,
    force: bool = False,
    device: str | None = None,
    max_shard_size: str | int | None = None,
) -> MergeResult:
    """Merge a training output's adapters and trainables into a standalone folder at ``output_dir``."""
    from transformers import AutoConfig, AutoProcessor

    start = time.perf_counter()
    run = read_run(run_dir)
    need_file(data_path, "--data_path", "data file (JSON or JSONL) to verify on")
    need_folder(image_folder, "--image_folder")
    need_folder(video_folder, "--video_folder")
    if not run.has_adapter:
        return verify_standalone(run, data_path, image_folder, video_folder, samples, device)
    if output_dir is None:
        raise ConfigError("give the output folder for the merged model (--output_dir)")
    base = base_model_of(run, base_model)
    out = check_output_dir(output_dir, force, [run.folder, base] if Path(base).exists() else [run.folder])
    base_dtype = saved_dtype(AutoConfig.from_pretrained(base)) or torch.float32
    work_dtype = run.run_dtype or base_dtype
    out_dtype = parse_dtype(dtype) or work_dtype
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    bar = Progress(MERGE_STEPS, "merge", unit="steps")  # a bar on a terminal, else a line per step
    model, family = load_model_with_adapters(run, base, work_dtype, device)
    bar.update(1)
    processor = load_run_processor(run, base)
    budget = run_budget(run, processor, family)
    batch, n = verification_batch(processor, family, budget, data_path, image_folder, video_folder, samples)
    reference = logits_of(model, batch)
    bar.update(1)
    worst = out_dtype if DEFAULT_ATOL[out_dtype] > DEFAULT_ATOL[work_dtype] else work_dtype
    tol = tolerance(worst, reference, atol)

    merged = model.merge_and_unload(safe_merge=True)
    del model
    if out_dtype != work_dtype:
        merged.to(out_dtype)
    bar.update(1)
    merged_logits = logits_of(merged, batch)
    diffs = {"merged": float((merged_logits - reference).abs().max())}
    agree = float((merged_logits.argmax(-1) == reference.argmax(-1)).float().mean())
    logger.info("verify: max |logits diff| merged vs base+adapters = %.3g on %d records, %d tokens (tolerance "
                "%.3g, %s; largest |logit| %.3g; same top token at %.1f%% of positions)", diffs["merged"], n,
                reference.shape[0], tol, dtype_name(out_dtype), float(reference.abs().max()), 100 * agree)
    if not diffs["merged"] <= tol:
        raise MergeError(f"the merged model's logits differ from base+adapters by {diffs['merged']:.3g} (tolerance "
                         f"{tol:.3g}); nothing written. Check the adapters, or raise --atol if the dtype explains it")
    if run.info.get("bits") in (4, 8):
        diffs.update(_against_quantized(run, base, work_dtype, device, batch, merged_logits, out_dtype))
    bar.update(1)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shard_size = max_shard_size or _default_shard_size(base, base_dtype, out_dtype)
        seq_cls_diff = reward.save_merged(merged, run.folder, tmp, batch, processor.tokenizer.pad_token_id,
                                          max_shard_size=shard_size)  # a reward model's layout: vlmtune/model/reward.py
        write_hub_layout(tmp, family)  # the layout vLLM and a ZeRO-3 load read (vlmtune/model/hub_layout.py)
        processor.save_pretrained(tmp)
        info = {**run.info, "merged_from": str(run.folder), "merged_dtype": dtype_name(out_dtype)}
        (tmp / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")  # budgets no processor field holds
        copied = _copy_other_files(base, tmp)
        if copied:
            logger.info("copied from the base folder: %s", ", ".join(copied))
        del merged
        gc.collect()
        bar.update(1)

        diffs["reloaded"] = (_reloaded_diff(tmp, family, out_dtype, device, batch, reference) if seq_cls_diff is None
                             else seq_cls_diff)
        AutoProcessor.from_pretrained(str(tmp))
        logger.info("verify: max |%s diff| reloaded folder vs %s = %.3g", "logits" if seq_cls_diff is None else
                    "reward", "base+adapters" if seq_cls_diff is None else "merged + head", diffs["reloaded"])
        if not diffs["reloaded"] <= tol:
            raise MergeError(f"the written model's logits differ from base+adapters by {diffs['reloaded']:.3g} "
                             f"(tolerance {tol:.3g}); nothing written")
        bar.update(1)
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bar.close()
    same = file_set(out) == file_set(base) if Path(base).is_dir() else None
    if same is False:
        logger.warning("the merged folder's files differ from the base folder's: only in merged %s, only in base %s",
                       sorted(file_set(out) - file_set(base)), sorted(file_set(base) - file_set(out)))
    seconds = time.perf_counter() - start
    logger.info("merged %s into %s (%s, %s) in %.1fs", run.folder, out, family.model_class, dtype_name(out_dtype),
                seconds)
    return MergeResult(out, False, dtype_name(out_dtype), diffs, tol, n, seconds, same)


def main(argv: list[str] | None = None) -> int:
    """``vlmtune merge RUN_DIR OUTPUT_DIR [options]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="vlmtune merge",
        description="Merge LoRA adapters and the trained non-LoRA parts of a training run into a standalone model "
                    "folder (loadable by transformers and vLLM), verified on sample inputs before it is written.",
    )
    parser.add_argument("run_dir", help="training output or checkpoint-N folder")
    parser.add_argument("output_dir", nargs="?", help="folder to write the merged model to (default: RUN_DIR-merged)")
    parser.add_argument("--output_dir", dest="output_flag", metavar="OUTPUT_DIR", help="the same, as a flag")
    parser.add_argument("--base_model", help="base model folder (default: the one vlmtune_run.json names)")
    parser.add_argument("--dtype", help="dtype of the merged weights: bfloat16, float16 or float32 "
                        "(default: the training dtype)")
    parser.add_argument("--atol", type=float, help="largest max |logits difference| accepted (default: 1e-3 in "
                        "float32; in bf16 / fp16 5e-2 / 1e-2 times max(1, largest |logit|))")
    parser.add_argument("--data_path", help="records to verify on (default: four short conversations over images "
                        "drawn in memory)")
    parser.add_argument("--image_folder", help="folder of relative image paths (default: the data file's)")
    parser.add_argument("--video_folder", help="folder of relative video paths (default: image_folder)")
    parser.add_argument("--samples", type=int, default=DEFAULT_VERIFY_SAMPLES,
                        help="records in the verification batch (one of each shape first)")
    parser.add_argument("--device", help="device for merging and verification (default: cuda if present, else cpu)")
    parser.add_argument("--max_shard_size", help="largest safetensors shard, e.g. 4GB (default: the base "
                        "folder's largest shard, so the files match)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    check_value("--samples", args.samples, (1, None, False, False))
    check_value("--atol", args.atol, (0, None, True, False))
    if args.output_dir and args.output_flag and args.output_dir != args.output_flag:
        parser.error("the output folder is given twice, differently")
    output_dir = args.output_dir or args.output_flag or args.run_dir.rstrip("/") + "-merged"
    result = merge(args.run_dir, output_dir, base_model=args.base_model, dtype=args.dtype, atol=args.atol,
                   data_path=args.data_path, image_folder=args.image_folder, video_folder=args.video_folder,
                   samples=args.samples, force=args.force, device=args.device, max_shard_size=args.max_shard_size)
    if result.standalone:
        print(f"{args.run_dir} is a full fine-tune: already a standalone model ({result.dtype}); nothing merged. "
              f"Load it directly with AutoModelForImageTextToText / vLLM.")
    else:
        diffs = ", ".join(f"{k} {v:.3g}" for k, v in result.diffs.items())
        print(f"merged model: {result.output_dir} ({result.dtype}; max |logits diff| {diffs}, tolerance "
              f"{result.tolerance:.3g}; {result.seconds:.1f}s)")
    return 0
