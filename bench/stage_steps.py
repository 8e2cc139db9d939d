"""Steps per second of every training stage (SFT, CPT, DPO, GRPO, reward model, distillation off- and on-policy) on the
same tiny model and the same records, in one run.

    .venv/bin/python bench/stage_steps.py [--steps 12] [--batch-size 4] [--threads 1] [--rounds 2] [--stages ...]
                                          [--image-scale 2] [--clock cpu]

Data: data_examples/preference.json, read three ways so every stage sees the same prompts and media: SFT trains
on prompt + chosen reply, CPT (``--stage cpt``) on the same turns and reply as one document (no chat template),
DPO on (chosen, rejected), GRPO samples ``--num-generations`` completions of up to
``--max-completion-length`` tokens per prompt (reward: exact match with the chosen reply), the reward model on
(chosen, rejected), distillation on the SFT records from a teacher that is the tiny model with 4 layers (``gkd``:
every step on-policy, the student sampling ``--max-completion-length`` tokens per record). Each stage runs
through its own recipe (``vlmtune.stages.sft.train``, ``dpo.dpo``, ``grpo.grpo``, ...), LoRA on the language model,
fp32 on CPU, ``--batch-size`` records per optimizer step, no gradient checkpointing; the time of each optimizer
step is taken from the Trainer's step callbacks, the first two steps of a run are dropped (warm-up), and a
stage's figure is the median step time over ``--rounds`` runs, interleaved (SFT, DPO, GRPO, SFT, ...) so that a
busy machine slows all three alike. GRPO's sampling time is measured apart (HF generate). ``--image-scale S``
resizes every example image by S on each side first (S = 2: 4x the pixels and about 4x the vision tokens, where
the vision tower's share of a step grows). ``--clock cpu`` times the steps in this process's CPU time instead of
wall time (one thread, data loaded in the process): on a machine that others load, wall times swing with their
load while CPU times hold. ``grpo_before`` is GRPO with the policy-step levers of issue 21 switched off
(``grpo_levers_off``: LoRA merged for sampling, the tower's outputs and the rows' positions kept for a rollout's
forwards, TRL's fused head fitted to the CPU (labelled positions only, a tile no wider than the vocabulary), the
group decoding loop, and the shared prompt prefix), for a before / after in one run: ``--stages grpo_before grpo``;
``grpo_generate`` is GRPO with only the group decoding loop off (sampling through HF ``generate``, as before its
second round); ``grpo_third`` is GRPO with the third round's levers off (``shared_prefix``: the training and scoring
forwards on the full rows, each prompt once per completion; ``merged_lora.base_layers_in_place``: the LoRA wrappers
called around the merged weights while sampling; TRL's unwrap called around sampling where it gives the model
back).

Results go to bench/results/stages-<device>-<date>.json, with the ratios to SFT.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import transformers.trainer as hf_trainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from vlmtune.config import parse_train_args  # noqa: E402
from vlmtune.stages import grpo as grpo_stage  # noqa: E402

EXAMPLES = ROOT / "data_examples"
RESULTS = ROOT / "bench" / "results"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


class StepTimer(TrainerCallback):
    """Time of every optimizer step (forward, backward, optimizer; GRPO: sampling and scoring too), on ``clock``."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = clock()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(clock() - self._start)


def scaled_images(folder: Path, scale: float) -> Path:
    """A copy of the example image folder with every image resized by ``scale`` on each side (EXIF kept), beside
    the example videos (unchanged)."""
    from PIL import Image

    (folder / "videos").symlink_to(EXAMPLES / "videos")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for path in (EXAMPLES / "images").iterdir():
        with Image.open(path) as img:
            size = (round(img.width * scale), round(img.height * scale))
            img.resize(size, Image.BICUBIC).save(folder / "images" / path.name, exif=img.getexif())
    return folder


def stage_files(folder: Path) -> dict[str, Path]:
    """The example preference records as SFT, CPT, DPO and GRPO data files (same prompts, same media)."""
    records = json.loads((EXAMPLES / "preference.json").read_text())
    paths = {stage: folder / f"{stage}.json" for stage in ("sft", "cpt", "dpo", "grpo")}
    paths["dpo"].write_text(json.dumps(records))

    def reply(value):
        return value["value"] if isinstance(value, dict) else value

    sft = [{**{k: v for k, v in r.items() if k not in ("chosen", "rejected")},
            "conversations": [*r["conversations"], {"from": "gpt", "value": reply(r["chosen"])}]} for r in records]
    paths["sft"].write_text(json.dumps(sft))
    cpt = [{**{k: v for k, v in r.items() if k != "conversations"},
            "text": "\n".join(turn["value"] for turn in r["conversations"])} for r in sft]
    paths["cpt"].write_text(json.dumps(cpt))
    grpo = [{**{k: v for k, v in r.items() if k not in ("chosen", "rejected")}, "answer": reply(r["chosen"])}
            for r in records]
    paths["grpo"].write_text(json.dumps(grpo))
    return paths


STAGES = {"sft": ("sft", "sft"), "cpt": ("sft", "cpt"), "dpo": ("dpo", "dpo"), "grpo": ("grpo", "grpo"),
          "grpo_before": ("grpo", "grpo"), "grpo_generate": ("grpo", "grpo"), "grpo_third": ("grpo", "grpo"),
          "reward_model": ("reward_model", "dpo"), "distill": ("distill", "sft"), "gkd": ("distill", "sft")}
"""Benchmarked stage -> (the recipe's stage, the data file it reads)."""


@contextlib.contextmanager
def grpo_levers_off():
    """GRPO as before issue 21's policy-step levers (``grpo_before``): sampling through the LoRA adapters, the
    tower run again and 3-D positions computed again in every forward of a rollout, the LM head on every
    position on CPU in tiles of 32,768 columns."""
    from vlmtune.stages import reference, rollout_positions, vision_once

    @contextlib.contextmanager
    def through_adapters(model):
        yield model

    with grpo_through_generate(), grpo_third_off(), \
            mock.patch.object(grpo_stage, "merged_for_sampling", through_adapters), \
            mock.patch.object(vision_once.Encodings, "for_model", lambda model: None), \
            mock.patch.object(rollout_positions, "row_positions", lambda *a: None), \
            mock.patch.object(reference, "fitted_fused_head", lambda model: contextlib.nullcontext()):
        yield


@contextlib.contextmanager
def grpo_through_generate():
    """GRPO sampling through HF ``generate`` (``grpo_generate``): ``group_decoding``'s loop off, the rest on."""
    from vlmtune.stages import group_decoding

    with mock.patch.object(group_decoding, "applies", lambda model: False):
        yield


@contextlib.contextmanager
def grpo_third_off():
    """GRPO as its third round found it (``grpo_third``): the training and scoring forwards on the full rows
    (``shared_prefix`` off: each prompt run once per completion), the LoRA wrappers left in place around the
    merged weights while sampling, and TRL's unwrap called for sampling; the rest on."""
    from vlmtune.stages import merged_lora, shared_prefix

    with mock.patch.object(shared_prefix, "applies", lambda model, batch: False), \
            mock.patch.object(merged_lora, "base_layers_in_place", lambda model, named: contextlib.nullcontext()), \
            mock.patch.object(grpo_stage.GRPOTrainer, "_needs_unwrap", lambda self, model: True):
        yield


def run_stage(stage: str, data: Path, out: Path, args) -> tuple[list[float], float]:
    """(step times, seconds spent sampling) of one run of a stage."""
    from vlmtune.stages.distill import distill
    from vlmtune.stages.dpo import dpo
    from vlmtune.stages.reward_model import reward_model
    from vlmtune.stages.sft import train

    argv = ["--data_path", str(data), "--image_folder", str(args.image_folder), "--output_dir", str(out),
            "--use_cpu", "True",
            "--report_to", "none", "--disable_tqdm", "True", "--save_strategy", "no", "--max_steps", str(args.steps),
            "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", "1e-3", "--mode", "lora",
            "--lora_rank", "8", "--logging_steps", str(args.steps), "--seed", "0", "--dataloader_num_workers", "0"]
    if stage == "cpt":
        argv += ["--stage", "cpt"]
    if stage.startswith("grpo"):
        argv += ["--num_generations", str(args.num_generations), "--max_completion_length",
                 str(args.max_completion_length), "--reward_funcs", "exact_match", "--log_completions", "0"]
    if stage in ("distill", "gkd"):
        argv += ["--teacher", str(args.teacher)]
    if stage == "gkd":
        argv += ["--lmbda", "1", "--max_new_tokens", str(args.max_completion_length)]
    timer = StepTimer()
    hf_trainer.DEFAULT_CALLBACKS.append(timer)
    sampling = [0.0]
    sample = grpo_stage.HFSampler.sample

    def timed_sample(self, *a, **k):
        start = clock()
        try:
            return sample(self, *a, **k)
        finally:
            sampling[0] += clock() - start

    grpo_stage.HFSampler.sample = timed_sample
    try:
        recipe = STAGES[stage][0]
        run = {"sft": train, "dpo": dpo, "grpo": grpo_stage.grpo, "reward_model": reward_model, "distill": distill}
        levers = {"grpo_before": grpo_levers_off, "grpo_generate": grpo_through_generate,
                  "grpo_third": grpo_third_off}
        with levers.get(stage, contextlib.nullcontext)():
            run[recipe](*parse_train_args(argv, stage=recipe))
    finally:
        hf_trainer.DEFAULT_CALLBACKS.remove(timer)
        grpo_stage.HFSampler.sample = sample
    return timer.times, sampling[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="wall time, or this process's CPU time")
    parser.add_argument("--out", type=Path, help="the results file (default: bench/results/stages-cpu-...json)")
    parser.add_argument("--image-scale", type=float, default=1.0, help="resize the images by this on each side")
    parser.add_argument("--stages", nargs="+", default=[s for s in STAGES if s != "grpo_before"], choices=list(STAGES))
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    times: dict[str, list[float]] = {stage: [] for stage in dict.fromkeys(["sft", *args.stages])}
    sampling_share: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        from vlmtune.testing.tiny import build_tiny_model

        files = stage_files(Path(tmp))
        args.image_folder = scaled_images(Path(tmp), args.image_scale) if args.image_scale != 1 else EXAMPLES
        args.teacher = build_tiny_model(Path(tmp) / "teacher", text_overrides={"num_hidden_layers": 4})
        for round_ in range(args.rounds):
            for stage in times:
                steps, sampled = run_stage(stage, files[STAGES[stage][1]], Path(tmp) / f"{stage}-{round_}", args)
                kept = steps[2:]
                times[stage] += kept
                if stage.startswith("grpo"):
                    sampling_share.setdefault(stage, []).append(sampled / sum(steps))
                print(f"round {round_ + 1} {stage}: {len(kept)} steps, median {statistics.median(kept):.3f} s",
                      flush=True)

    median = {stage: statistics.median(values) for stage, values in times.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": "cpu", "threads": args.threads,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "model": "embedded tiny qwen2_vl (LoRA rank 8, fp32)", "batch_records": args.batch_size,
        "num_generations": args.num_generations, "max_completion_length": args.max_completion_length,
        "steps_per_run": args.steps, "rounds": args.rounds, "image_scale": args.image_scale,
        "clock": args.clock,
        "seconds_per_step": {k: round(v, 4) for k, v in median.items()},
        "steps_per_s": {k: round(1 / v, 3) for k, v in median.items()},
        "steps_per_s_vs_sft": {k: round(median["sft"] / v, 3) for k, v in median.items()},
        "grpo_sampling_share": {k: round(statistics.mean(v), 3) for k, v in sampling_share.items()} or None,
    }
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    scaled = f"-image{args.image_scale:g}x" if args.image_scale != 1 else ""
    path = args.out or RESULTS / f"stages-cpu-{args.threads}t{scaled}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
