"""Plots of a training run: ``vlmtune plot RUN_DIR``, and at the end of every training run.

The log comes from ``RUN_DIR/log_history.jsonl`` (one line per logging step, written while the run goes, so a
running job can be plotted), else from the newest ``trainer_state.json`` of the run or its checkpoints.
One PNG, ``RUN_DIR/plots/run.png``, holds six panels: training loss (raw and smoothed, eval loss beside it),
eval loss, eval metrics, learning rate per parameter group, grad norm, and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

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


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's plots into one PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    entries = read_log(run_dir)
    out = Path(out) if out else run_dir / PLOT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)

    train = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval_loss" in e or any(k.startswith("eval_") and k not in EVAL_SKIP for k in e)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    fig.suptitle(f"{run_dir.name}: {len(train)} training log steps, {len(evals)} evaluations", fontsize=12)

    def empty(ax, what):
        ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="gray")

    ax = axes[0, 0]
    xs, ys = _series(train, "loss")
    if xs:
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, lw=1, label="loss (raw)")
        ax.plot(xs, smooth(ys), color="tab:blue", lw=2, label=f"loss (EMA {SMOOTHING})")
        ex, ey = _series(evals, "eval_loss")
        if ex:
            ax.plot(ex, ey, "o-", color="tab:orange", lw=1.5, label="eval loss")
        ax.legend(fontsize=8)
    else:
        empty(ax, "training loss")
    ax.set_title("training loss")

    ax = axes[0, 1]
    ex, ey = _series(evals, "eval_loss")
    if ex:
        ax.plot(ex, ey, "o-", color="tab:orange")
        best = min(range(len(ey)), key=ey.__getitem__)
        ax.annotate(f"best {ey[best]:.4g}", (ex[best], ey[best]), textcoords="offset points", xytext=(5, 8),
                    fontsize=8)
    else:
        empty(ax, "eval loss")
    ax.set_title("eval loss")

    ax = axes[0, 2]
    names = sorted({k for e in evals for k in e if k.startswith("eval_") and k not in EVAL_SKIP})
    for name in names:
        mx, my = _series(evals, name)
        label = name[len("eval_"):]
        if label == "bleu":  # 0-100, the others 0-1
            my, label = [v / 100 for v in my], "bleu / 100"
        ax.plot(mx, my, "o-", label=label)
    if names:
        ax.legend(fontsize=8)
    else:
        empty(ax, "eval metric (--eval_generate True)")
    ax.set_title("eval metrics")

    ax = axes[1, 0]
    groups = sorted({k for e in train for k in e if k.startswith("lr/")})
    for key in groups or ["learning_rate"]:
        gx, gy = _series(train, key)
        if gx:
            ax.plot(gx, gy, label=key[3:] if key.startswith("lr/") else "learning rate")
    rates = [v for k in groups or ["learning_rate"] for v in _series(train, k)[1] if v > 0]
    if rates:
        ax.legend(fontsize=8)
        if max(rates) / min(rates) > 20:  # per-part rates (vision 2e-5 beside LLM 1e-4) differ by decades
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    else:
        empty(ax, "learning rate")
    ax.set_title("learning rate per parameter group")

    ax = axes[1, 1]
    gx, gy = _series(train, "grad_norm")
    if gx:
        ax.plot(gx, gy, color="tab:red", alpha=0.4, lw=1, label="raw")
        ax.plot(gx, smooth(gy), color="tab:red", lw=2, label="EMA")
        ax.legend(fontsize=8)
    else:
        empty(ax, "grad norm")
    ax.set_title("grad norm")

    ax = axes[1, 2]
    tx, ty = _series(train, "tokens_per_s")
    if tx:
        ax.plot(tx, ty, color="tab:green")
        ax.set_ylim(bottom=0)
    else:
        empty(ax, "throughput")
    ax.set_title("tokens / s (real tokens, padding excluded)")

    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
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
    print(f"plots written to {plot_run(args.run_dir, args.output)}")
    return 0
