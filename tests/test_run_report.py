"""Seeing a run: console lines, the log file, plots, the end-of-run summary, and --eval_generate with
--metric_for_best_model and early stopping, on the tiny model."""

from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import DATA_JSON
from PIL import Image

from vlmtune.cli import main as cli
from vlmtune.config import parse_train_args
from vlmtune.errors import ConfigError
from vlmtune.stages.callbacks import format_log

BASE = ["--data_path", str(DATA_JSON), "--tiny_family", "qwen2_vl", "--lora_rank", "4", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
        "--save_strategy", "no", "--logging_steps", "1"]


def train(args, tmp_path):
    from vlmtune.stages.sft import train as run

    return run(*parse_train_args([*BASE, "--output_dir", str(tmp_path / "run"), *args]))


def test_format_log_lines_are_aligned_and_readable():
    line = format_log({"loss": 1.23456, "grad_norm": 0.8123, "learning_rate": 2e-4, "tokens_per_s": 3120.4,
                       "epoch": 0.5, "lr/llm": 2e-4}, 40, 300)
    assert line == "step  40/300  loss   1.235  lr 2.0e-04  grad  0.812  tok/s   3,120  epoch 0.50"
    assert format_log({"eval_loss": 1.1, "eval_anls": 0.5, "eval_runtime": 65.0, "epoch": 1.0}, 40, 300) == (
        "eval  40/300  loss 1.100  anls 0.500  (1m05s)")
    assert format_log({"train_runtime": 12.0, "train_loss": 2.0, "total_flos": 1.0}, 300, 300) is None


@pytest.fixture(scope="module")
def generated_run(tmp_path_factory):
    """A run that evaluates twice with --eval_generate and keeps the best checkpoint by exact match."""
    tmp = tmp_path_factory.mktemp("report")
    caplog_records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            caplog_records.append(record)

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("vlmtune")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    import contextlib
    import io

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            folder = train(["--val_ratio", "0.25", "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps",
                            "2", "--save_strategy", "steps", "--save_steps", "2", "--eval_generate", "True",
                            "--eval_max_new_tokens", "4", "--metric_for_best_model", "exact_match"], tmp)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return folder, out.getvalue(), [r.getMessage() for r in caplog_records]


def test_console_prints_one_aligned_line_per_log_step_and_no_dicts(generated_run):
    _, printed, _ = generated_run
    lines = printed.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [re.match(r"step (\d)/4  loss +\d+\.\d{3}  lr \d\.\de-\d\d  grad +\d+\.\d{3}  tok/s +[\d,]+  epoch",
                     line) is not None for line in steps] == [True] * 4
    evals = [line for line in lines if line.startswith("eval ")]
    assert len(evals) == 2 and all(" exact_match " in line and " loss " in line for line in evals)
    assert "{'" not in printed and "{\"" not in printed


def test_eval_generate_reports_metrics_everywhere(generated_run):
    folder, _, _ = generated_run
    state = json.loads((folder / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert len(evals) == 2 and all("eval_exact_match" in e and "eval_anls" in e for e in evals)
    # the best checkpoint is chosen by the generation metric
    assert state["best_metric"] == max(e["eval_exact_match"] for e in evals)
    assert state["best_model_checkpoint"].endswith("checkpoint-2")  # ties keep the first
    logged = [json.loads(line) for line in (folder / "log_history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "eval_exact_match" in e] == [2, 4]
    assert [e["step"] for e in logged if "loss" in e] == [1, 2, 3, 4]
    lines = [json.loads(line) for line in (folder / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3  # 25% of 12 records
    assert all({"id", "prompt", "reference", "prediction", "metrics"} <= set(line) for line in lines)
    timing = {"loss", "runtime", "samples_per_second", "steps_per_second"}
    reported = {k[len("eval_"):] for k in evals[0] if k.startswith("eval_")} - timing
    assert {"exact_match", "anls"} <= reported
    assert all(set(line["metrics"]) == reported for line in lines)


def test_the_run_ends_with_a_summary_and_a_valid_png(generated_run):
    folder, _, messages = generated_run
    summary = next(m for m in messages if m.startswith("run finished in"))
    assert "4 steps" in summary and "train loss: final" in summary and "eval loss:  final" in summary
    assert f"merge: vlmtune merge {folder} {folder}-merged" in summary
    assert "checkpoints: checkpoint-2, checkpoint-4" in summary
    assert summary.splitlines()[-1] == f"  plots: {folder / 'plots' / 'run.png'}"  # the last line names the file
    png = folder / "plots" / "run.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (1500, 800)


def test_vlmtune_plot_draws_a_run_folder(generated_run, tmp_path, capsys):
    folder, _, _ = generated_run
    out = tmp_path / "p.png"
    assert cli(["plot", str(folder), "--output", str(out)]) == 0
    assert f"plots written to {out}" in capsys.readouterr().out
    with Image.open(out) as img:
        img.verify()
    assert cli(["plot", str(tmp_path / "nothing")]) == 1
    assert "no log_history.jsonl nor trainer_state.json" in capsys.readouterr().err


def test_early_stopping_stops_when_the_metric_stalls(tmp_path):
    # eval_loss must improve by more than 100 to count: the first evaluation sets the best, the second stops
    folder = train(["--val_ratio", "0.25", "--max_steps", "20", "--eval_strategy", "steps", "--eval_steps", "2",
                    "--metric_for_best_model", "eval_loss", "--early_stopping_patience", "1",
                    "--early_stopping_threshold", "100"], tmp_path)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["global_step"] == 4


@pytest.mark.parametrize("args, message", [
    (["--metric_for_best_model", "anls", "--val_ratio", "0.25"], "generation metric: add --eval_generate True"),
    (["--eval_generate", "True"], "needs an eval split"),
    (["--eval_generate", "True", "--val_ratio", "0.25", "--eval_metrics", "anls,bogus"], "unknown metric(s) bogus"),
    (["--early_stopping_patience", "2", "--val_ratio", "0.25"], "needs --metric_for_best_model"),
    (["--early_stopping_patience", "2", "--metric_for_best_model", "eval_loss"], "needs evaluations"),
])
def test_evaluation_flags_are_checked_before_the_model_loads(args, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(args, tmp_path)


def test_eval_generate_runs_in_bf16_beside_fp32_master_weights(tmp_path):
    # lora_vision trains the merger fully: with --bf16 it keeps fp32 masters beside bf16 frozen weights, and
    # generation must run under the same autocast as the forward (it failed with a dtype mismatch without it)
    folder = train(["--val_ratio", "0.25", "--max_steps", "1", "--mode", "lora_vision", "--bf16", "True",
                    "--eval_generate", "True", "--eval_max_new_tokens", "3", "--eval_metrics", "exact_match",
                    "--report_to", "tensorboard"], tmp_path)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert [set(e) & {"eval_exact_match", "eval_anls"} for e in state["log_history"] if "eval_loss" in e] == [
        {"eval_exact_match"}]
    # and TensorBoard gets the metric like the eval loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (folder / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"eval/loss", "eval/exact_match"} <= set(events.Tags()["scalars"])
