"""The run view's answers: a training run's log (read again at every request, so a running job's page follows it),
its ``vlmtune_run.json``, and eval predictions beside their references, sorted by disagreement (grounding ones
drawn on their image: the predicted boxes against the reference boxes).

A run folder (``vlmtune train / dpo / grpo --output_dir``) holds ``log_history.jsonl``, ``vlmtune_run.json`` and,
with ``--eval_generate``, ``eval_predictions.jsonl``; an ``vlmtune eval --output_dir`` folder holds
``predictions.jsonl`` (and ``predictions_compare.jsonl`` with ``--compare``) and ``metrics.json``. Either is shown.
"""

from __future__ import annotations

import json
import math
import mimetypes
import os
from pathlib import Path

from vlmtune.plots import read_log
from vlmtune.run import CHECKPOINT_PREFIX, LOG_FILE, PLOT_FILE, PREDICTIONS_FILE, RUN_FILE, TRAINER_STATE
from vlmtune.view.reward_pages import reward_settings

EVAL_PREDICTIONS = "predictions.jsonl"
EVAL_COMPARE = "predictions_compare.jsonl"
EVAL_METRICS = "metrics.json"
SCALE_100 = {"bleu"}
"""Metrics on a 0-100 scale (the others are 0-1)."""


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder the run view can show (a training run or an eval output)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in
                                 (LOG_FILE, RUN_FILE, TRAINER_STATE, PREDICTIONS_FILE, EVAL_PREDICTIONS))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return lines


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def agreement(line: dict) -> float | None:
    """Mean of a prediction's metrics on a 0-1 scale (None: no metric): 1 agrees with the reference, 0 does not."""
    values = [v / 100 if k in SCALE_100 else v for k, v in (line.get("metrics") or {}).items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


class RunView:
    """One run (or eval) folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def log(self) -> list[dict]:
        """The run's log entries, as ``vlmtune plot`` reads them ([] before the first logging step)."""
        try:
            entries = read_log(self.folder)
        except FileNotFoundError:
            return []
        return [{k: _finite(v) for k, v in e.items()} for e in entries]

    def facts(self) -> dict | None:
        """``vlmtune_run.json``: the run's, else (a run still training) its newest checkpoint's."""
        found = [self.folder / RUN_FILE] if (self.folder / RUN_FILE).is_file() else sorted(
            self.folder.glob(f"{CHECKPOINT_PREFIX}-*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime)[-1:]
        return json.loads(found[0].read_text()) if found else None

    def predictions(self) -> dict:
        """Predictions beside references, most disagreeing first; with ``--compare``, the second model's beside."""
        first = _read_jsonl(self.folder / EVAL_PREDICTIONS) or _read_jsonl(self.folder / PREDICTIONS_FILE)
        second = {line.get("id"): line for line in _read_jsonl(self.folder / EVAL_COMPARE)}
        rows = []
        for line in first:
            row = {**line, "agreement": agreement(line)}
            other = second.get(line.get("id"))
            if other is not None:
                row["compare"] = {"prediction": other.get("prediction"), "metrics": other.get("metrics", {}),
                                  "boxes": other.get("boxes"), "agreement": agreement(other)}
            rows.append(row)
        # most disagreeing first: lowest agreement (no metric: a differing prediction counts as 0)
        rows.sort(key=lambda r: r["agreement"] if r["agreement"] is not None else
                  float(r.get("prediction") == r.get("reference")))
        metrics = self.folder / EVAL_METRICS
        return {"rows": rows, "compare": bool(second),
                "metrics": json.loads(metrics.read_text()) if metrics.is_file() else None}

    def state(self) -> dict:
        """Everything the run page draws."""
        log_file = self.folder / LOG_FILE
        facts = self.facts()
        grpo = (facts or {}).get("grpo")  # a GRPO run's flags, as vlmtune grpo recorded them
        return {"mode": "run", "folder": str(self.folder), "facts": facts, "log": self.log(),
                "rewards": reward_settings(grpo) if isinstance(grpo, dict) else None,
                "log_mtime": log_file.stat().st_mtime if log_file.is_file() else None,
                "predictions": self.predictions(), "plot": (self.folder / PLOT_FILE).is_file()}

    def info(self) -> dict:
        return {"mode": "run", "folder": str(self.folder)}

    def allowed_files(self) -> set[str]:
        """The run's own plot and the images its prediction lines name (read anew, as the page is): the only
        files the server hands out for a run."""
        named = {path for name in (EVAL_PREDICTIONS, PREDICTIONS_FILE, EVAL_COMPARE)
                 for line in _read_jsonl(self.folder / name) for path in line.get("images") or []
                 if isinstance(path, str) and "://" not in path
                 and (mimetypes.guess_type(path)[0] or "").startswith("image/")}
        return {os.path.realpath(self.folder / PLOT_FILE)} | {os.path.realpath(path) for path in named}
