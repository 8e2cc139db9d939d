"""Prompts per second of ``vlmtune sample`` against two baselines measured in the same run, on the same tiny model
and prompts (data_examples/grpo.json: images, videos, text):

- ``predict``: one greedy reply per prompt (``Predictor.replies``, batch 1), what a prompt costs without sampling;
- ``sequential``: the same ``--num-samples`` replies drawn one ``generate`` call at a time (``--num_samples 1``,
  called N times), against ``sample``'s one call per prompt group.

    .venv/bin/python bench/sample_speed.py [--num-samples 4] [--max-new-tokens 16] [--threads 1] [--rounds 2]

Rounds are interleaved (sample, sequential, predict, sample, ...) so that a busy machine slows all three alike;
each figure is the median over rounds. Scoring (exact_match) is included in both sampling timings. Results go to
bench/results/sample-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlmtune.data.records import load_records  # noqa: E402
from vlmtune.generation import load_predictor  # noqa: E402
from vlmtune.rewards import load_rewards  # noqa: E402
from vlmtune.sample import Sampler  # noqa: E402
from vlmtune.stage_config import GRPOArguments, SampleArguments  # noqa: E402
from vlmtune.testing.tiny import tiny_model_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    predictor = load_predictor(str(tiny_model_path("qwen2_vl")), max_new_tokens=args.max_new_tokens)
    records = load_records(ROOT / "data_examples" / "grpo.json", budget=predictor.budget,
                           min_image_side=predictor.family.factor, stage="grpo")
    rewards = load_rewards(["exact_match"])
    grpo = GRPOArguments(reward_funcs=["exact_match"])

    def sampler(n: int) -> Sampler:
        return Sampler(predictor, rewards, None, grpo, SampleArguments(num_samples=n), args.max_new_tokens)

    group, single = sampler(args.num_samples), sampler(1)
    runs = {
        "sample": lambda: [group.sample(r, p) for p, r in enumerate(records)],
        "sequential": lambda: [single.sample(r, p * args.num_samples + k) for p, r in enumerate(records)
                               for k in range(args.num_samples)],
        "predict": lambda: predictor.replies(records, batch_size=1, progress=False),
    }
    runs["sample"]()  # warm-up: media decoding caches, first-call allocations
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "prompts": len(records), "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
        "threads": args.threads, "rounds": args.rounds, "seconds": seconds,
        "prompts_per_second": {name: round(len(records) / s, 3) for name, s in seconds.items()},
        "sample_time_vs_predict": round(seconds["sample"] / seconds["predict"], 3),
        "sequential_time_vs_sample": round(seconds["sequential"] / seconds["sample"], 3),
        "device": "cpu", "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=1))
    out = ROOT / "bench" / "results" / f"sample-cpu-{args.threads}t-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
