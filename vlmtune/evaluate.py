"""``vlmtune eval``: generate a reply for every record of a split and score it with task metrics.

The last assistant turn of each record is the reference; the prompt is everything before it, rendered as in
training and generated with the run's pixel budgets (read from the run folder). ``--compare`` scores a second
model on the same records and prints both side by side with the difference, and the records where they
disagree most.

Writes, under ``--output_dir``: ``predictions.jsonl`` (one line per record: id, prompt, reference,
prediction, each metric, the record's image paths, predicted and reference boxes in original-image pixels),
``predictions_compare.jsonl`` with ``--compare``,
and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmtune import metrics as M
from vlmtune import run
from vlmtune.config import INFERENCE_DATA_FIELDS, DataArguments, InferenceArguments
from vlmtune.data.records import Record, load_records
from vlmtune.errors import ConfigError
from vlmtune.flags import add_fields, fields_of, need_file, need_folder
from vlmtune.generation import (
    Predictor,
    Scores,
    load_predictor,
    prediction_lines,
    prompt_of,
    reference_of,
    score,
)

logger = logging.getLogger(__name__)

DISAGREEMENTS_SHOWN = 5


@dataclass
class Evaluation:
    """One model's predictions on a split, and their scores."""

    label: str
    source: str
    predictions: list[str]
    scores: Scores

    @property
    def summary(self) -> dict[str, dict]:
        return self.scores.summary

    @property
    def per_record(self) -> list[dict[str, float | None]]:
        return self.scores.per_record


def evaluate_predictions(records: list[Record], predictions: list[str], predictor: Predictor,
                         metric_names: list[str] | None, label: str = "model") -> Evaluation:
    """Score one model's predictions against the records' references (boxes in them already in the family's
    convention: converted on loading, or written so)."""
    scores = score(records, predictions, predictor.family, predictor.budget, metric_names)
    return Evaluation(label, predictor.source, predictions, scores)


def run_model(model: str | None, adapter: str | None, records_path: str, args, label: str,
              metric_names: list[str] | None, box_format: str | None) -> tuple[Evaluation, list[Record]]:
    """Load a model, generate for every record, score; the model is freed before returning."""
    budget = fields_of(args, DataArguments, *INFERENCE_DATA_FIELDS).budget_overrides()
    predictor = load_predictor(model, adapter, dtype=args.dtype, device=args.device, budget_overrides=budget,
                               max_new_tokens=args.max_new_tokens, enable_thinking=args.enable_thinking)
    records = load_records(records_path, args.image_folder, args.video_folder, budget=predictor.budget,
                           min_image_side=predictor.family.factor, box_target=predictor.family.box_format,
                           box_format=box_format)
    if args.limit:
        records = records[:args.limit]
    if not records:
        raise ConfigError(f"{records_path} holds no record to evaluate")
    predictions = predictor.replies([prompt_of(r) for r in records], args.batch_size, desc=f"eval {label}")
    result = evaluate_predictions(records, predictions, predictor, metric_names, label)
    del predictor
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, records


def write_predictions(path: Path, records: list[Record], ev: Evaluation) -> None:
    with path.open("w", encoding="utf-8") as out:
        for line in prediction_lines(records, ev.predictions, ev.scores):
            out.write(json.dumps(line, ensure_ascii=False) + "\n")


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if M.METRICS[metric].scale > 1 else f"{value:.3f}"


def table(evals: list[Evaluation]) -> str:
    """The summary table: one column per model (and the difference when there are two)."""
    names = list(dict.fromkeys(n for ev in evals for n in ev.summary))
    header = ["metric"] + [ev.label for ev in evals] + (["diff"] if len(evals) == 2 else []) + ["n"]
    rows = []
    for name in names:
        scores = [ev.summary.get(name, {}).get("score") for ev in evals]
        row = [name] + [_fmt(s, name) for s in scores]
        if len(evals) == 2:
            a, b = scores
            row.append("-" if a is None or b is None else ("+" if b - a >= 0 else "") + _fmt(b - a, name))
        row.append(str(max(ev.summary.get(name, {}).get("n", 0) for ev in evals)))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def disagreements(records: list[Record], a: Evaluation, b: Evaluation, k: int = DISAGREEMENTS_SHOWN) -> list[dict]:
    """The records where the two models differ most on the first metric (then: different replies)."""
    metric = next(iter(a.summary), None)
    scored = []
    for i in range(len(records)):
        va, vb = a.per_record[i].get(metric), b.per_record[i].get(metric)
        gap = abs((va or 0.0) - (vb or 0.0)) if metric else 0.0
        if gap > 0 or a.predictions[i] != b.predictions[i]:
            scored.append((gap, a.predictions[i] != b.predictions[i], i, va, vb))
    scored.sort(key=lambda t: (-t[0], -t[1], t[2]))
    return [{"id": records[i].id, "metric": metric, a.label: va, b.label: vb,
             "reference": reference_of(records[i]), f"{a.label}_prediction": a.predictions[i],
             f"{b.label}_prediction": b.predictions[i]} for _, _, i, va, vb in scored[:k]]


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _label(model: str | None, adapter: str | None) -> str:
    path = adapter or model or "model"
    return Path(path.rstrip("/")).name or path


def check_inputs(args: argparse.Namespace) -> None:
    """The files, folders and models ``eval`` will read, checked before any model loads."""
    need_file(args.data, "--data", "data file (JSON or JSONL)")
    need_folder(args.image_folder, "--image_folder")
    need_folder(args.video_folder, "--video_folder")
    run.check_inference_source(args.model, args.adapter)
    if args.compare or args.compare_adapter:
        run.check_inference_source(args.compare, args.compare_adapter, ("--compare", "--compare_adapter"))
    if Path(args.output_dir).is_file():
        raise ConfigError(f"--output_dir {args.output_dir} is a file; give a folder for the predictions")


def main(argv: list[str] | None = None) -> int:
    """``vlmtune eval``."""
    parser = argparse.ArgumentParser(
        prog="vlmtune eval",
        description="Generate a reply for every record of a data file (the last assistant turn is the reference) "
                    "and score it with task metrics; --compare scores a second model side by side.")
    add_fields(parser, InferenceArguments)
    add_fields(parser, DataArguments, *INFERENCE_DATA_FIELDS)
    parser.add_argument("--data", required=True, help="LLaVA-style data file (JSON / JSONL) to evaluate on")
    parser.add_argument("--compare", help="a second model (folder or training output) scored on the same records")
    parser.add_argument("--compare_adapter", help="adapters to apply to --compare")
    parser.add_argument("--name", help="column title of --model (default: its folder name)")
    parser.add_argument("--compare_name", help="column title of --compare (default: its folder name)")
    parser.add_argument("--metrics", help=f"comma-separated, from {', '.join(M.METRICS)} (default: what fits the "
                        "references: choices, numbers, short answers, free text, boxes)")
    parser.add_argument("--output_dir", default="outputs/eval", help="where predictions and metrics.json go")
    args = parser.parse_args(argv)
    if not args.model and not args.adapter:
        parser.error("give --model (a model folder or a training output)")
    fields_of(args, InferenceArguments)  # the same checks as training: ranges, cross-checks
    fields_of(args, DataArguments, *INFERENCE_DATA_FIELDS)
    names = None
    if args.metrics:
        try:
            names = M.check_metrics([n.strip() for n in args.metrics.split(",") if n.strip()])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    check_inputs(args)  # every file and both models, before the first model loads

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label_a = args.name or _label(args.model, args.adapter)
    first, records = run_model(args.model, args.adapter, args.data, args, label_a, names, args.box_format)
    evals = [first]
    write_predictions(out_dir / "predictions.jsonl", records, first)
    if args.compare or args.compare_adapter:
        label_b = args.compare_name or _label(args.compare, args.compare_adapter)
        if label_b == label_a:
            label_a, label_b = f"{label_a} (A)", f"{label_b} (B)"
            first.label = label_a
        second, records_b = run_model(args.compare, args.compare_adapter, args.data, args, label_b,
                                      names or list(first.summary), args.box_format)
        if [r.id for r in records_b] != [r.id for r in records]:
            raise ConfigError("the two models kept different records (their pixel budgets differ); "
                              "give both the same budget flags")
        evals.append(second)
        write_predictions(out_dir / "predictions_compare.jsonl", records_b, second)

    result: dict = {"data": args.data, "records": len(records),
                    "models": {ev.label: {"source": ev.source, "metrics": ev.summary} for ev in evals}}
    print(f"\nvlmtune eval: {len(records)} records of {args.data}")
    print(table(evals))
    if len(evals) == 2:
        result["diff"] = {name: (None if s.get("score") is None or evals[0].summary[name]["score"] is None
                                 else s["score"] - evals[0].summary[name]["score"])
                          for name, s in evals[1].summary.items()}
        worst = disagreements(records, *evals)
        result["disagreements"] = worst
        if worst:
            print(f"\nwhere they disagree most ({worst[0]['metric']}):")
            for d in worst:
                print(f"  {d['id']}: reference {_short(d['reference'], 40)!r}")
                for ev in evals:
                    print(f"    {ev.label}: {_short(d[f'{ev.label}_prediction'])!r} "
                          f"({_fmt(d[ev.label], d['metric'])})")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    files = "predictions.jsonl" + (", predictions_compare.jsonl" if len(evals) == 2 else "")
    print(f"\nwritten to {out_dir}: metrics.json, {files}")
    return 0
