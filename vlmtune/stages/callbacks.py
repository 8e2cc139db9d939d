"""What a run shows and leaves behind: the console, the log file, the summary at the end.

* ``ConsoleCallback`` replaces the Trainer's progress bar and raw log dicts: on a terminal one progress bar with
  ETA and one aligned line per logging step (``step  40/300  loss 1.234  lr 2.0e-04  grad 0.81  tok/s 3,120``);
  elsewhere (CI, a log file) the same lines, plain, with no bar. DPO lines add the reward margin and accuracy, GRPO
  lines the mean reward, its spread within groups and the completion length, and a note when every group had equal
  rewards (no learning signal).
* ``LogFileCallback`` appends every log entry to ``OUTPUT_DIR/log_history.jsonl``, so ``vlmtune plot`` can draw a
  run while it goes.
* ``summary`` is the few lines printed when a run ends: time, steps, losses, where things are, how to merge.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from vlmtune.generation import format_duration
from vlmtune.run import LOG_FILE

HIDDEN_KEYS = {"total_flos", "epoch", "step", "learning_rate", "samples_per_s", "eval_runtime",
               "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time"}


def _number(value: float, key: str) -> str:
    if key.startswith("lr") or key == "learning_rate":
        return f"{value:.1e}"
    if key in ("tokens_per_s", "tok/s"):
        return f"{value:,.0f}"
    if isinstance(value, int) or (abs(value) >= 1000 and float(value).is_integer()):
        return f"{int(value):,}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:,.1f}"


def _judged_by(logs: dict) -> list[str]:
    """What a preference or policy stage is judged by: DPO its reward margin and accuracy (share of pairs whose
    chosen reply out-scores the rejected one); GRPO its mean reward, the mean spread of rewards within a prompt's
    group, and the completions' mean length in tokens."""
    parts = []
    if "rewards/margins" in logs:
        parts.append(f"margin {logs['rewards/margins']:.3f}")
    if "rewards/accuracies" in logs:
        parts.append(f"acc {logs['rewards/accuracies']:.2f}")
    if "reward" in logs:
        spread = f" ± {logs['reward_std']:.3f}" if "reward_std" in logs else ""
        parts.append(f"reward {logs['reward']:.3f}{spread}")
    if "completions/mean_length" in logs:
        parts.append(f"len {logs['completions/mean_length']:.1f}")
    return parts


FLAT_REPEAT = 5
"""Log steps in a row where every GRPO group had equal rewards before the note is said again."""
FLAT_NOTE = ("every group of prompts got equal rewards ({seen}): no learning signal, so the loss and gradient are 0. "
             "Check that the reward functions can tell the completions apart (OUTPUT_DIR/completions.jsonl holds "
             "samples with their rewards); more generations per prompt (--num_generations) or a higher "
             "--temperature spread them")


def flat_rewards_note(logs: dict, streak: int) -> tuple[str | None, int]:
    """(the note to print or None, the new streak) for a training log entry: said when every group of the step had
    equal rewards (``frac_reward_zero_std`` 1), and again every ``FLAT_REPEAT`` such log steps in a row."""
    if "loss" not in logs or "frac_reward_zero_std" not in logs:
        return None, streak
    if logs["frac_reward_zero_std"] < 1.0:
        return None, 0
    streak += 1
    if streak == 1:
        return FLAT_NOTE.format(seen="this step"), streak
    if streak % FLAT_REPEAT == 0:
        return FLAT_NOTE.format(seen=f"still, {streak} log steps in a row"), streak
    return None, streak


def format_log(logs: dict, step: int, max_steps: int) -> str | None:
    """One aligned console line for a log entry (None for entries not worth a line)."""
    width = len(str(max_steps))
    where = f"{step:>{width}}/{max_steps}"
    if "loss" in logs:
        parts = [f"step {where}", f"loss {_number(logs['loss'], 'loss'):>7}"]
        if "learning_rate" in logs:
            parts.append(f"lr {_number(logs['learning_rate'], 'lr')}")
        if "grad_norm" in logs and logs["grad_norm"] is not None and math.isfinite(logs["grad_norm"]):
            parts.append(f"grad {_number(logs['grad_norm'], 'grad'):>6}")
        if "tokens_per_s" in logs:
            parts.append(f"tok/s {_number(logs['tokens_per_s'], 'tokens_per_s'):>7}")
        parts += _judged_by(logs)
        if "epoch" in logs:
            parts.append(f"epoch {logs['epoch']:.2f}")
        return "  ".join(parts)
    evals = {k[len("eval_"):]: v for k, v in logs.items() if k.startswith("eval_") and k not in HIDDEN_KEYS}
    if evals:
        parts = [f"eval {where}"]
        parts += [f"{k} {_number(v, k)}" for k, v in evals.items() if isinstance(v, (int, float))]
        if "eval_runtime" in logs:
            parts.append(f"({format_duration(logs['eval_runtime'])})")
        return "  ".join(parts)
    return None  # the Trainer's end-of-training totals: the run summary says it better


class ConsoleCallback(ProgressCallback):
    """A progress bar with ETA on a terminal (unless ``--disable_tqdm``) and one aligned line per log step."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.flat_streak = 0  # GRPO: log steps in a row where every group had equal rewards

    def _bars(self, args) -> bool:
        return self.tty and not args.disable_tqdm

    def on_train_begin(self, args, state, control, **kwargs):
        self.current_step = state.global_step
        if self._bars(args):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.update(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self._bars(args):
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = format_log(logs, state.global_step, state.max_steps)
        note, self.flat_streak = flat_rewards_note(logs, self.flat_streak)
        for text in (line, note and f"note: {note}"):
            if text is None:
                continue
            if self.training_bar is not None:
                self.training_bar.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


class LogFileCallback(TrainerCallback):
    """Append each log entry (with its step) to ``OUTPUT_DIR/log_history.jsonl``; a resumed run first drops the
    entries after the step it resumes from."""

    def on_train_begin(self, args, state, control, **kwargs):
        path = Path(args.output_dir, LOG_FILE)
        if not state.is_world_process_zero or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= state.global_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        path.write_text("".join(k + "\n" for k in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            path = Path(args.output_dir, LOG_FILE)
            path.parent.mkdir(parents=True, exist_ok=True)
            entry = {**{k: v for k, v in logs.items() if isinstance(v, (int, float, str)) or v is None},
                     "step": state.global_step}
            with path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


def install(trainer) -> None:
    """Swap the Trainer's printer / progress bar for ours, and add the log file."""
    for cls in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cls)
    trainer.add_callback(ConsoleCallback())
    trainer.add_callback(LogFileCallback())


def summary(trainer, started: float, output_dir: str | Path, *, lora: bool, plot: Path | None,
            predictions: Path | None) -> str:
    """The lines printed when a run ends."""
    state = trainer.state
    output_dir = Path(output_dir)
    history = state.log_history
    train_losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
    eval_losses = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    lines = [f"run finished in {format_duration(time.time() - started)}: {state.global_step} steps"
             + (f" ({state.epoch:.2f} epochs)" if state.epoch else "")]
    if train_losses:
        best = min(train_losses, key=lambda t: t[1])
        lines.append(f"  train loss: final {train_losses[-1][1]:.4f}, best {best[1]:.4f} (step {best[0]})")
    if eval_losses:
        best = min(eval_losses, key=lambda t: t[1])
        lines.append(f"  eval loss:  final {eval_losses[-1][1]:.4f}, best {best[1]:.4f} (step {best[0]})")
    metric = trainer.args.metric_for_best_model
    if state.best_metric is not None and metric:
        lines.append(f"  best {metric}: {state.best_metric:.4f}"
                     + (f" at {state.best_model_checkpoint}" if state.best_model_checkpoint else ""))
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                         if p.name.split("-")[-1].isdigit() else -1)
    lines.append(f"  model: {output_dir}" + (f"; checkpoints: {', '.join(p.name for p in checkpoints)}"
                                               if checkpoints else ""))
    if predictions is not None:
        lines.append(f"  eval predictions: {predictions}")
    if lora:
        lines.append(f"  merge: vlmtune merge {output_dir} {output_dir}-merged")
    else:
        lines.append("  the folder is a standalone model (no merge needed)")
    if plot is not None:
        lines.append(f"  plots: {plot}")
    return "\n".join(lines)
