"""Sequence parallelism's memory split, measured: the peak memory one rank adds during a forward + backward of one
long sample, for ``--sequence_parallel_size`` 1, 2 and 4 at two sequence lengths, with the ratio of each to SP 1
at the same length, measured in the same run.

    .venv/bin/python bench/sequence_parallel_memory.py [--lengths 4096 16384] [--sizes 1 2 4]
    .venv/bin/python bench/sequence_parallel_memory.py --device cuda --model PATH --dtype bf16 --lengths 32768 131072

Each size is one launch of N processes (gloo on CPU, NCCL on CUDA), each rank building the model (the embedded tiny
Qwen2-VL by default, LoRA mode, no gradient checkpointing) and running the lengths in order, one sample each: random
text tokens (no media: the vision tower runs whole on every rank under SP, so media add the same to every size),
labels = the tokens, through ``vlmtune.model.sequence_parallel`` for N > 1 (the path ``vlmtune train
--sequence_parallel_size N`` takes) and the model's own loss for N = 1.

Measured per rank: CPU, the peak resident set size during the step (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus the resident size just before it (glibc's mmap threshold fixed at 64 kB and
``malloc_trim`` before each step, so freed tensors leave the resident set; a 256-token warm-up step first);
CUDA, ``torch.cuda.max_memory_allocated`` during the step minus the allocated memory before it.
The column is the largest rank's figure.
Results: bench/results/sequence-parallel-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def peak_rss() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def worker(args) -> None:
    """One rank: every length in order; prints one JSON line per length (rank 0: the largest rank's figure)."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForImageTextToText

    from vlmtune.config import ModeArguments
    from vlmtune.model import modes
    from vlmtune.model import sequence_parallel as sp
    from vlmtune.model.load import load_family
    from vlmtune.testing.tiny import tiny_model_path

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    path = str(tiny_model_path("qwen2_vl")) if args.model == "tiny" else args.model
    family = load_family(path)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa",
                                                        dtype=getattr(torch, args.dtype))
    mode = ModeArguments(mode="lora", lora_rank=8, lora_dropout=0.0)
    model = modes.apply_plan(model, family, modes.plan_from_args(mode), mode).to(args.device).train()
    size = dist.get_world_size()
    group = None
    if size > 1:
        group = sp.init_group(size)
        base = model.get_base_model()
        sp.install(base, base.get_submodule(family.language_model), group, "sdpa")
    config = model.config
    special = {getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                  "vision_end_token_id")}
    allowed = torch.tensor([i for i in range(config.get_text_config().vocab_size) if i not in special])
    libc = None if cuda else ctypes.CDLL("libc.so.6")
    for length in [256, *args.lengths]:  # 256: a warm-up step (one-time allocations), not reported
        if libc is not None:
            libc.malloc_trim(0)  # what the previous length freed goes back to the system before "before"
        generator = torch.Generator().manual_seed(length)
        ids = allowed[torch.randint(len(allowed), (1, length), generator=generator)].to(args.device)
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            before = rss()
            Path("/proc/self/clear_refs").write_text("5")
        if group is None:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            logits = model(input_ids=ids, use_cache=False).logits
            loss = sp.chunk_loss(logits, sp.local_targets(ids, group), sp.count_targets(ids))
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
            added = torch.cuda.max_memory_allocated() - before
        else:
            added = peak_rss() - before
        figure = torch.tensor([added], dtype=torch.float64, device=args.device)
        dist.all_reduce(figure, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0 and length in args.lengths:
            print(json.dumps({"sp": size, "length": length, "peak_mb": round(float(figure) / 1e6, 1)}), flush=True)
        del loss
    dist.destroy_process_group()


def launch(size: int, args) -> list[dict]:
    """``size`` worker processes; rank 0's JSON lines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(size),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/te-vlmtune"),
           "MALLOC_MMAP_THRESHOLD_": "65536"}  # large tensors mmapped and unmapped when freed: RSS follows them
    cmd = [sys.executable, __file__, "--worker", "--device", args.device, "--model", args.model, "--dtype",
           args.dtype, "--lengths", *map(str, args.lengths)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              text=True) for r in range(size)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"SP {size}: a rank failed")
    return [json.loads(line) for line in outs[0].splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default="tiny", help="tiny (the embedded Qwen2-VL) or a model folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = [row for size in args.sizes for row in launch(size, args)]
    base = {r["length"]: r["peak_mb"] for r in rows if r["sp"] == 1}
    print(f"{'SP':>3} {'length':>8} {'peak MB/rank':>13} {'vs SP 1':>8}")
    for r in rows:
        r["ratio_vs_sp1"] = round(r["peak_mb"] / base[r["length"]], 3) if r["length"] in base else None
        print(f"{r['sp']:>3} {r['length']:>8} {r['peak_mb']:>13.1f} {r['ratio_vs_sp1'] or float('nan'):>8.3f}")
    out = Path(args.out or ROOT / "bench" / "results" /
               f"sequence-parallel-{args.device}-{datetime.date.today().isoformat()}.json")
    out.write_text(json.dumps({"device": args.device, "model": args.model, "dtype": args.dtype, "mode": "lora",
                               "gradient_checkpointing": False, "rows": rows}, indent=1) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
