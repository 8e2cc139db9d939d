"""Training-step benchmark: throughput, padding and peak memory of each configuration, against a baseline
measured in the same process run.

    .venv/bin/python bench/train_step.py [--models tiny] [--steps 20] [--batch-size 4] [--repeat 8]

Models: ``tiny`` (the embedded tiny model of ``--family``, fp32; the default on CPU) and, on CUDA, random weights
at the published shapes of ``Qwen2.5-VL-3B`` / ``Qwen2.5-VL-7B`` (config built in code from
``vlmtune.memory.KNOWN_MODELS``, bf16 weights with bf16 autocast, tiny tokenizer ids inside the real vocabulary;
the default on CUDA is ``Qwen2.5-VL-3B``).

Data: data_examples/ repeated ``--repeat`` times, each record decoded once. Batches for every configuration are
collated before its timed steps (a DataLoader's workers would do that in parallel with the model), so the timings
are forward + backward + AdamW step. Baseline: LoRA, padded batches of ``--batch-size`` records in random order,
sdpa, no Liger, no gradient checkpointing. Grouping: ``LengthGroupedSampler`` over ``dataset.lengths``, as
``--group_by_length`` does. Packing: ``vlmtune.data.packing`` with a capacity of batch size x mean record length
and one pack per step, so a step holds about as many tokens as the baseline's. Liger and flash-attn rows run only
on CUDA and are skipped with the reason elsewhere; Liger patches classes for the whole process, so its rows run
last.

Columns: real (non-padding) tokens/s and records/s over the timed steps (each timed batch runs ``--rounds``
times and its fastest run counts), padding = padding slots / all slots,
peak memory (CUDA: ``torch.cuda.max_memory_allocated`` of the configuration; CPU: peak resident set size of the
process during the configuration, reset through /proc/self/clear_refs, so it includes the Python process itself),
and the ratio of each to the baseline. On CUDA also model FLOPs utilisation (6 x LLM parameters without the
embedding per token, plus causal attention 6 x layers x hidden x length^2 per record, plus the vision tower's
2 (frozen) or 6 (trained) x parameters per patch) against the device's dense bf16 peak, and the estimate of
``vlmtune estimate-memory`` for the same setup with its error against the measured peak.

Results go to bench/results/<device>-<date>.json. About a minute on 2 CPU cores for the tiny model.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers.trainer_pt_utils import LengthGroupedSampler  # noqa: E402

from vlmtune import memory  # noqa: E402
from vlmtune.config import ModeArguments  # noqa: E402
from vlmtune.data import media, packing  # noqa: E402
from vlmtune.data.collator import Collator  # noqa: E402
from vlmtune.data.conversation import Conversation  # noqa: E402
from vlmtune.data.dataset import VisionLanguageDataset  # noqa: E402
from vlmtune.data.records import load_records  # noqa: E402
from vlmtune.families import family_for  # noqa: E402
from vlmtune.model import modes  # noqa: E402
from vlmtune.model import packing as model_packing  # noqa: E402
from vlmtune.model.load import apply_liger, liger_unavailable_reason, load_family, load_model, load_processor  # noqa: E402
from vlmtune.testing.tiny import tiny_model_path  # noqa: E402

EXAMPLES = ROOT / "data_examples"
RESULTS = ROOT / "bench" / "results"
BF16_PEAK_FLOPS = [  # dense bf16 tensor-core peaks from the vendors' data sheets, matched on the device name
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
    ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12), ("B200", 2250e12),
]
REAL_SIZE_IMAGE_SIDE = 448
"""Real-size runs resize every image to 448 x 448 (256 vision tokens), as a realistic fine-tuning budget."""


@dataclass(frozen=True)
class Config:
    name: str
    mode: str = "lora"
    data: str = "padded"  # padded | grouped | packed
    attn: str = "sdpa"
    liger: bool = False
    checkpointing: bool = False


BASELINE = Config("baseline")
CONFIGS = [
    BASELINE,
    Config("grouping", data="grouped"),
    Config("packing", data="packed"),
    Config("gradient checkpointing", checkpointing=True),
    Config("lora_vision", mode="lora_vision"),
    Config("full", mode="full"),
    Config("flash-attn", attn="flash_attention_2"),
    Config("flash-attn + packing", data="packed", attn="flash_attention_2"),
    # Liger patches the model classes for the whole process: these run last.
    Config("liger", liger=True),
    Config("lora_vision + packing + liger + flash-attn", mode="lora_vision", data="packed",
           attn="flash_attention_2", liger=True),
    # Where flash-attn is not installed (it builds from source only), the best that SDPA gives:
    Config("lora_vision + grouping + liger", mode="lora_vision", data="grouped", liger=True),
    Config("lora_vision + packing + liger", mode="lora_vision", data="packed", liger=True),
]


# ------------------------------------------------------------------ data


class Repeated(torch.utils.data.Dataset):
    """A dataset's records repeated ``times``; each record is decoded once and its item reused."""

    def __init__(self, dataset: VisionLanguageDataset, times: int):
        self.base = dataset
        self.items = [dataset[i] for i in range(len(dataset))]
        self.lengths = list(dataset.lengths) * times

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int):
        return self.items[i % len(self.items)]


def build_data(model_path: str, repeat: int, real_size: bool):
    family = load_family(model_path)
    processor = load_processor(model_path)
    overrides = {}
    if real_size:
        side = REAL_SIZE_IMAGE_SIDE
        overrides = dict(image_resized_height=side, image_resized_width=side, video_max_pixels=side * side)
    budget = media.budget_from_processor(processor, family.factor, **overrides)
    records = load_records(EXAMPLES / "data.json", EXAMPLES, budget=budget, min_image_side=family.factor)
    dataset = VisionLanguageDataset(records, processor, family, budget, Conversation(processor))
    return processor, Repeated(dataset, repeat)


def batches_for(config: Config, data: Repeated, pad_id: int, batch_size: int, n: int, rope, padding_free: bool,
                seed: int = 0) -> list[dict]:
    """``n`` collated batches in the order the Trainer would draw them (epochs repeat when needed)."""
    generator = torch.Generator().manual_seed(seed)
    if config.data == "packed":
        capacity = max(batch_size * math.ceil(statistics.mean(data.lengths)), max(data.lengths))
        packs = packing.PackedDataset(data, capacity)
        collate = packing.PackedCollator(pad_id, rope, padding_free=padding_free)
        out = []
        while len(out) < n:
            out += [collate([packs[i]]) for i in torch.randperm(len(packs), generator=generator).tolist()]
        return out[:n]
    collate = Collator(pad_id)
    out = []
    while len(out) < n:
        if config.data == "grouped":
            order = list(LengthGroupedSampler(batch_size, lengths=data.lengths, generator=generator))
        else:
            order = torch.randperm(len(data), generator=generator).tolist()
        out += [collate([data[i] for i in order[k : k + batch_size]])
                for k in range(0, len(order) - batch_size + 1, batch_size)]
    return out[:n]


def record_lengths_in(batch: dict, pad_id: int) -> list[int]:
    """Lengths of the records in a batch (padded: rows; packed: segments other than the padding one)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(-1).tolist()
    real = packing._real_tokens(batch, pad_id)
    lengths = []
    for row in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][0, row] == 0).nonzero().view(-1).tolist() + [batch["input_ids"].shape[1]]
        lengths += [b - a for a, b in zip(starts, starts[1:]) if real[row, a]]
    return lengths


# ------------------------------------------------------------------ models


def real_size_model(name: str, tokenizer, attn: str):
    """Random bf16 weights at a published shape, on the GPU; token ids from the tiny tokenizer."""
    config = memory.load_config(name)
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(config, key, tokenizer.convert_tokens_to_ids(token))
    config.text_config.pad_token_id = tokenizer.pad_token_id
    family = family_for(config)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = family.model_cls()._from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    return model, family


def build_model(model_name: str, model_path: str, tokenizer, config: Config, device: str):
    if model_name == "tiny":
        model, family = load_model(model_path, dtype=torch.float32, attn_implementation=config.attn,
                                   use_liger=config.liger)
    else:
        model, family = real_size_model(model_name, tokenizer, config.attn)
        if config.liger:
            apply_liger(family, model)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    args = ModeArguments(mode=config.mode)
    model = modes.apply_plan(model, family, modes.plan_from_args(args), args).to(device)
    if config.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, family


def skip_reason(config: Config, family) -> str | None:
    if config.attn == "flash_attention_2":
        if not torch.cuda.is_available():
            return "flash-attn needs a CUDA device"
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed (pip install 'vlmtune[gpu]'; source build only)"
    if config.liger:
        return liger_unavailable_reason(family)
    return None


# ------------------------------------------------------------------ measuring


def peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_flops() -> float | None:
    name = torch.cuda.get_device_name(0)
    return next((flops for key, flops in BF16_PEAK_FLOPS if key in name), None)


def model_flops(model, family, batch: dict, pad_id: int, vision_trains: bool) -> float:
    """Model FLOPs of one step: 6 N per token for the LLM (embedding lookup excluded), causal attention per record,
    and the vision tower per patch / merger per vision token (2 N when frozen: forward only, 6 N when trained)."""
    text = model.config.text_config
    counts = dict.fromkeys(modes.PARTS, 0)
    for name, p in model.named_parameters():
        if not modes.is_lora_name(name) and "embed_tokens" not in name:
            counts[modes.part_of(name, family)] += p.numel()
    tokens = packing.count_tokens(batch, pad_id)
    lengths = record_lengths_in(batch, pad_id)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    attention = 6 * text.num_hidden_layers * text.num_attention_heads * head_dim * sum(n * n for n in lengths)
    patches = sum(int(g.prod()) for key in ("image_grid_thw", "video_grid_thw") for g in batch.get(key, []))
    vision = (6 if vision_trains else 2) * (counts["vision"] * patches + counts["merger"] * patches / 4)
    return 6 * counts["llm"] * tokens + attention + vision


def run_config(model_name, model_path, processor, data, config, args, device) -> dict:
    row = {**asdict(config), "status": "ok"}
    family = load_family(model_path)
    reason = skip_reason(config, family)
    if reason:
        return {**row, "status": f"skipped: {reason}"}
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        row["rss_reset"] = peak_rss_reset()
    pad_id = processor.tokenizer.pad_token_id
    model, family = build_model(model_name, model_path, processor.tokenizer, config, device)
    padding_free = False
    rope = None
    if config.data == "packed":
        padding_free = model_packing.prepare_model(model) == "padding_free"
        rope = packing.RopeIndex(model.config)
    batches = batches_for(config, data, pad_id, args.batch_size, args.warmup + args.steps, rope, padding_free)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    optimizer = torch.optim.AdamW(modes.parameter_groups(model, family, 1e-5, 0.0), fused=True)
    dtype = torch.bfloat16 if device == "cuda" else None
    model.train()

    def step(batch) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        step.loss = loss.item()
        return time.perf_counter() - start

    for batch in batches[: args.warmup]:
        step(batch)
    timed = batches[args.warmup :]
    best = [min(step(b) for _ in range(args.rounds)) if args.rounds > 1 else step(b) for b in timed]
    elapsed = sum(best)
    tokens = sum(packing.count_tokens(b, pad_id) for b in timed)
    samples = sum(packing.count_samples(b, pad_id) for b in timed)
    slots = sum(b["input_ids"].numel() for b in timed)
    flops = sum(model_flops(model, family, b, pad_id, config.mode == "lora_vision") for b in timed) if (
        device == "cuda") else 0.0
    loss = torch.tensor(step.loss)
    if not math.isfinite(loss.item()):
        row["status"] = f"error: loss {loss.item()}"
    row.update(steps=args.steps, rounds=args.rounds, seconds=round(elapsed, 3), tokens_per_s=tokens / elapsed,
               samples_per_s=samples / elapsed, padding=1 - tokens / slots, final_loss=round(loss.item(), 4))
    if device == "cuda":
        row["peak_memory"] = torch.cuda.max_memory_allocated()
        row["memory_kind"] = "torch.cuda.max_memory_allocated"
        peak = device_peak_flops()
        row["mfu"] = flops / elapsed / peak if peak else None
        row["estimate"] = estimate_for(model_name if model_name != "tiny" else f"tiny:{family.model_type}", config,
                                       batches, family)
    else:
        row["peak_memory"] = peak_rss()
        row["memory_kind"] = "peak RSS of the process" if row["rss_reset"] else "peak RSS since start (no reset)"
    return row


def estimate_for(model_name: str, config: Config, batches: list[dict], family) -> float:
    """``vlmtune estimate-memory`` for the largest batch of the run (bf16, sdpa or flash, this mode)."""
    largest = max(batches, key=lambda b: b["input_ids"].numel())
    rows, length = largest["input_ids"].shape
    vision = sum(int(g.prod()) // 4 for key in ("image_grid_thw", "video_grid_thw") for g in largest.get(key, []))
    per_row = vision // rows
    setup = memory.Setup(mode=config.mode, precision="bf16", batch_size=rows, seq_len=length - per_row,
                         images=1 if per_row else 0, image_pixels=per_row * family.factor**2,
                         gradient_checkpointing=config.checkpointing, liger=config.liger, attn=config.attn,
                         packing=config.data == "packed", lora_dropout=ModeArguments().lora_dropout)
    return memory.estimate(model_name, setup).peak


# ------------------------------------------------------------------ report


def table(results: list[dict], device: str) -> str:
    base = next(r for r in results if r["name"] == BASELINE.name)
    gpu = device == "cuda"
    head = (f"{'configuration':<44}{'tokens/s':>10}{'samples/s':>11}{'padding':>9}{'peak MB':>10}{'x tok/s':>9}"
            f"{'x mem':>7}")
    if gpu:
        head += f"{'MFU':>7}{'est. MB':>9}{'err':>7}"
    lines = [head]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"{r['name']:<44}{r['status']}")
            continue
        line = (f"{r['name']:<44}{r['tokens_per_s']:>10.0f}{r['samples_per_s']:>11.1f}{r['padding']:>8.1%}"
                f"{r['peak_memory'] / 1e6:>10.0f}{r['tokens_per_s'] / base['tokens_per_s']:>9.2f}"
                f"{r['peak_memory'] / base['peak_memory']:>7.2f}")
        if gpu:
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
            err = r["estimate"] / r["peak_memory"] - 1
            line += f"{mfu:>7}{r['estimate'] / 1e6:>9.0f}{err:>+7.0%}"
        lines.append(line)
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
        return f"{name} ({text.count('processor')} cores)"
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def device_label(device: str) -> str:
    if device == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return f"cpu-{torch.get_num_threads()}t"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--models", default="Qwen2.5-VL-3B" if cuda else "tiny",
                        help="comma-separated: tiny, Qwen2.5-VL-3B, Qwen2.5-VL-7B (real sizes need CUDA)")
    parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"],
                        help="family of the tiny model (real sizes use the tiny qwen2_5_vl processor)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="records per padded batch")
    parser.add_argument("--repeat", type=int, default=8, help="data_examples/ repeated this many times")
    parser.add_argument("--rounds", type=int, default=1 if cuda else 5,
                        help="times each timed batch runs; its fastest run counts (CPU default 5: a shared "
                        "machine's bursts of other work would otherwise land on whichever configuration runs then)")
    parser.add_argument("--threads", type=int, default=None if cuda else 1,
                        help="torch CPU threads (CPU default 1: on a shared 2-core machine two threads wait on each "
                        "other and step times vary 10x)")
    parser.add_argument("--only", help="comma-separated configuration names to run (baseline always runs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if cuda else "cpu"
    configs = CONFIGS
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")} | {BASELINE.name}
        configs = [c for c in CONFIGS if c.name in wanted]
    out = str(args.out.relative_to(ROOT)) if args.out.is_relative_to(ROOT) else str(args.out)
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else cpu_name(),
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "settings": {**vars(args), "out": out},
        "models": {},
    }
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        real = model_name != "tiny"
        if real and not cuda:
            print(f"{model_name}: skipped, a real-size model needs a CUDA device (none here)")
            report["models"][model_name] = {"skipped": "no CUDA device"}
            continue
        model_path = str(tiny_model_path("qwen2_5_vl" if real else args.family))
        processor, data = build_data(model_path, args.repeat, real)
        label = model_name if real else f"tiny {args.family}"
        print(f"\n{label} on {report['device']} ({device}, {'bf16' if cuda else 'fp32'}): {len(data)} records "
              f"(data_examples x{args.repeat}), batch {args.batch_size}, {args.steps} timed steps after "
              f"{args.warmup} warm-up")
        results = []
        report["models"][model_name] = {"label": label, "records": len(data), "results": results,
                                        "settings": report["settings"]}
        for config in configs:
            if real and config.mode == "full":
                est = memory.estimate(model_name, memory.Setup(mode="full", batch_size=args.batch_size)).peak
                total = torch.cuda.get_device_properties(0).total_memory
                if est > 0.95 * total:
                    results.append({**asdict(config), "status": f"skipped: estimate {est / 1e9:.0f} GB > "
                                    f"{total / 1e9:.0f} GB on this device"})
                    continue
            try:
                results.append(run_config(model_name, model_path, processor, data, config, args, device))
            except torch.cuda.OutOfMemoryError as exc:
                results.append({**asdict(config), "status": f"error: out of memory ({str(exc)[:80]})"})
            row = results[-1]
            figures = (f" ({row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_memory'] / 1e6:,.0f} MB)"
                       if row["status"] == "ok" else "")
            print(f"  {config.name}: {row['status']}{figures}", flush=True)
            write_report(report, args.out, device)  # after each one: a run cut short keeps what it measured
        print(table(results, device))
        reference = next((r for r in results if r["name"] == "lora_vision" and r["status"] == "ok"), None)
        for target in [r for r in results if r["name"].startswith("lora_vision + ") and r["status"] == "ok"]:
            if reference:
                print(f"{target['name']} vs lora_vision padded sdpa: "
                      f"{target['tokens_per_s'] / reference['tokens_per_s']:.2f}x tokens/s at "
                      f"{target['peak_memory'] / reference['peak_memory']:.2f}x peak memory "
                      "(target with flash-attn: >= 1.8x at <= 0.6x)")
    path = write_report(report, args.out, device)
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}" if path
          else "\nnothing ran: no results written")
    return 0


def write_report(report: dict, out_dir: Path, device: str) -> Path | None:
    """Write the models measured so far to ``<device>-<date>.json``, keeping other models an earlier run of the
    day wrote there; nothing when no model ran."""
    ran = {name: entry for name, entry in report["models"].items() if entry.get("results")}
    if not ran:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{device_label(device)}-{report['date']}.json"
    if path.exists():
        ran = {**json.loads(path.read_text()).get("models", {}), **ran}
    path.write_text(json.dumps({**report, "models": ran}, indent=1, default=str) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())

