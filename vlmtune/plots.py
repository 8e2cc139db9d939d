"""Plots of a training run: ``vlmtune plot RUN_DIR``, and at the end of every training run.

The log comes from ``RUN_DIR/log_history.jsonl`` (one line per logging step, written while the run goes, so a
running job can be plotted), else from the newest ``trainer_state.json`` of the run or its checkpoints.
One PNG, ``RUN_DIR/plots/run.png``, holds a panel for each of these that the run logged: training loss (raw and
smoothed, eval loss beside it), eval loss, eval metrics, learning rate per parameter group, grad norm, tokens/s,
DPO's reward margin and accuracy, GRPO's reward (and its spread within groups) and completion length.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from vlmtune.errors import ConfigError
from vlmtune.run import LOG_FILE, PLOT_FILE, TRAINER_STATE

SMOOTHING = 0.9  # TensorBoard's default EMA weight
EVAL_SKIP = {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
             "eval_model_preparation_time", "epoch", "step"}


def read_log(run_dir: str | Path) -> list[dict]:
    """The run's log entries (dicts with ``step``), from ``log_history.jsonl`` or the newest trainer state."""
    run_dir = Path(run_dir)
    log = run_dir / LOG_FILE
    if log.is_file():
        entries = []
        for line in log.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
        if entries:
            return entries
    states = [run_dir / TRAINER_STATE, *run_dir.glob(f"checkpoint-*/{TRAINER_STATE}")]
    states = [s for s in states if s.is_file()]
    if not states:
        raise FileNotFoundError(f"{run_dir} has no {LOG_FILE} nor {TRAINER_STATE}: is it a training output "
                                "folder? (a run writes its log from its first logging step on)")
    newest = max(states, key=lambda s: json.loads(s.read_text()).get("global_step", 0))
    return json.loads(newest.read_text()).get("log_history", [])


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard smooths)."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**n))
    return out


def _series(entries: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for e in entries:
        v = e.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in e:
            xs.append(e["step"])
            ys.append(float(v))
    return xs, ys


def _draw_loss(ax, train, evals) -> None:
    xs, ys = _series(train, "loss")
    ax.plot(xs, ys, color="tab:blue", alpha=0.35, lw=1, label="loss (raw)")
    ax.plot(xs, smooth(ys), color="tab:blue", lw=2, label=f"loss (EMA {SMOOTHING})")
    ex, ey = _series(evals, "eval_loss")
    if ex:
        ax.plot(ex, ey, "o-", color="tab:orange", lw=1.5, label="eval loss")
    ax.legend(fontsize=8)


def _draw_eval_loss(ax, train, evals) -> None:
    ex, ey = _series(evals, "eval_loss")
    ax.plot(ex, ey, "o-", color="tab:orange")
    best = min(range(len(ey)), key=ey.__getitem__)
    ax.annotate(f"best {ey[best]:.4g}", (ex[best], ey[best]), textcoords="offset points", xytext=(5, 8), fontsize=8)


def _metric_names(evals) -> list[str]:
    return sorted({k for e in evals for k in e if k.startswith("eval_") and k not in EVAL_SKIP
                   and not k.startswith("eval_rewards/")})


def _draw_metrics(ax, train, evals) -> None:
    for name in _metric_names(evals):
        mx, my = _series(evals, name)
        label = name[len("eval_"):]
        if label == "bleu":  # 0-100, the others 0-1
            my, label = [v / 100 for v in my], "bleu / 100"
        ax.plot(mx, my, "o-", label=label)
    ax.legend(fontsize=8)


def _rate_keys(train) -> list[str]:
    return sorted({k for e in train for k in e if k.startswith("lr/")}) or ["learning_rate"]


def _draw_rates(ax, train, evals) -> None:
    keys = _rate_keys(train)
    for key in keys:
        gx, gy = _series(train, key)
        if gx:
            ax.plot(gx, gy, label=key[3:] if key.startswith("lr/") else "learning rate")
    rates = [v for k in keys for v in _series(train, k)[1] if v > 0]
    ax.legend(fontsize=8)
    if rates and max(rates) / min(rates) > 20:  # per-part rates (vision 2e-5 beside LLM 1e-4) differ by decades
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))


def _draw_raw_and_smooth(key: str, color: str):
    def draw(ax, train, evals) -> None:
        xs, ys = _series(train, key)
        ax.plot(xs, ys, color=color, alpha=0.4, lw=1, label="raw")
        ax.plot(xs, smooth(ys), color=color, lw=2, label="EMA")
        ax.legend(fontsize=8)
    return draw


def _draw_lines(*keys: str, zero: bool = False):
    def draw(ax, train, evals) -> None:
        for key in keys:
            xs, ys = _series(train, key)
            if xs:
                ax.plot(xs, ys, label=key)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        if zero:
            ax.set_ylim(bottom=0)
    return draw


def _has(*keys: str, source: str = "train"):
    def has(train, evals) -> bool:
        return any(_series(train if source == "train" else evals, k)[0] for k in keys)
    return has


PANELS = [  # (title, has data, draw): only the panels with data are drawn
    ("training loss", _has("loss"), _draw_loss),
    ("eval loss", _has("eval_loss", source="eval"), _draw_eval_loss),
    ("eval metrics", lambda train, evals: bool(_metric_names(evals)), _draw_metrics),
    ("learning rate per parameter group", lambda train, evals: any(_series(train, k)[0] for k in _rate_keys(train)),
     _draw_rates),
    ("grad norm", _has("grad_norm"), _draw_raw_and_smooth("grad_norm", "tab:red")),
    ("tokens / s (real tokens, padding excluded)", _has("tokens_per_s"), _draw_lines("tokens_per_s", zero=True)),
    ("DPO reward margin (chosen - rejected)", _has("rewards/margins"), _draw_lines("rewards/margins")),
    ("DPO accuracy (chosen scored higher)", _has("rewards/accuracies"), _draw_lines("rewards/accuracies")),
    ("GRPO reward and its spread within groups", _has("reward"), _draw_lines("reward", "reward_std")),
    ("GRPO completion length (tokens)", _has("completions/mean_length"),
     _draw_lines("completions/mean_length", "completions/min_length", "completions/max_length", zero=True)),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's plots into one PNG (only the panels with data); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    entries = read_log(run_dir)
    out = Path(out) if out else run_dir / PLOT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)

    train = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval_loss" in e or any(k.startswith("eval_") and k not in EVAL_SKIP for k in e)]
    panels = [(title, draw) for title, has, draw in PANELS if has(train, evals)]
    columns = min(3, max(len(panels), 1))
    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    fig.suptitle(f"{run_dir.name}: {len(train)} training log steps, {len(evals)} evaluations", fontsize=12)
    for ax, (title, draw) in zip(axes.flat, panels):
        draw(ax, train, evals)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.remove()
    if not panels:
        fig.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", color="gray")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """``vlmtune plot RUN_DIR``."""
    parser = argparse.ArgumentParser(prog="vlmtune plot", description="Draw the plots of a training run "
                                     "(finished or running) into RUN_DIR/plots/run.png.")
    parser.add_argument("run_dir")
    parser.add_argument("--output", help=f"PNG file to write (default: RUN_DIR/{PLOT_FILE})")
    args = parser.parse_args(argv)
    if args.output and Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a folder; give a PNG file name")
    print(f"plots written to {plot_run(args.run_dir, args.output)}")
    return 0
