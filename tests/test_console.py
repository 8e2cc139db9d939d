"""What a run prints and draws, stage by stage: DPO and GRPO step lines, the note when GRPO has nothing to learn
from, the end-of-run plot's panels (only those with data), and the noise of imports kept off the console."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import pytest

from vlmtune.stages.callbacks import ConsoleCallback, format_log


def test_dpo_step_line_shows_reward_margin_and_accuracy():
    line = format_log({"loss": 0.6931, "grad_norm": 0.5, "rewards/margins": 0.1234, "rewards/accuracies": 0.75,
                       "rewards/chosen": 0.2, "rewards/rejected": 0.08}, 3, 10)
    assert line == "step  3/10  loss   0.693  grad  0.500  margin 0.123  acc 0.75"


def test_grpo_step_line_shows_mean_reward_spread_and_completion_length():
    line = format_log({"loss": 0.0, "grad_norm": 0.0, "reward": 0.4567, "reward_std": 0.125,
                       "completions/mean_length": 11.5, "frac_reward_zero_std": 0.0}, 9, 9)
    assert line == "step 9/9  loss   0.000  grad  0.000  reward 0.457 ± 0.125  len 11.5"


def _console_lines(entries: list[dict]) -> list[str]:
    stream = io.StringIO()
    console = ConsoleCallback(stream)
    args = SimpleNamespace(disable_tqdm=True)
    for step, logs in enumerate(entries, 1):
        state = SimpleNamespace(is_world_process_zero=True, global_step=step, max_steps=len(entries))
        console.on_log(args, state, None, logs=logs)
    return stream.getvalue().splitlines()


def test_grpo_says_when_every_group_had_equal_rewards_once_and_again_if_it_lasts():
    flat = {"loss": 0.0, "reward": 0.0, "reward_std": 0.0, "frac_reward_zero_std": 1.0}
    moving = {"loss": 0.1, "reward": 0.3, "reward_std": 0.2, "frac_reward_zero_std": 0.5}
    lines = _console_lines([flat] * 7 + [moving] + [flat])
    notes = [i for i, line in enumerate(lines) if line.startswith("note:")]
    steps = [line for line in lines if line.startswith("step")]
    assert len(steps) == 9
    # said after the first flat step, again after the fifth in a row, and anew when it comes back
    assert [lines[i - 1].split()[1] for i in notes] == ["1/9", "5/9", "9/9"]
    assert "equal rewards" in lines[notes[0]] and "still, 5 log steps in a row" in lines[notes[1]]


def test_end_of_run_plot_draws_only_panels_with_data(tmp_path, monkeypatch):
    import json

    import matplotlib.figure

    from vlmtune.plots import plot_run

    drawn = []
    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (
        drawn.append([ax.get_title() for ax in fig.axes]), original(fig, *a, **k))[1])
    run = tmp_path / "run"
    run.mkdir()
    log = [{"step": s, "loss": 1.0 / s, "grad_norm": 0.5, "learning_rate": 1e-4} for s in range(1, 4)]
    (run / "log_history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    plot_run(run)
    assert drawn[-1] == ["training loss", "learning rate per parameter group", "grad norm"]  # no eval: no eval panels

    grpo = [{**e, "reward": 0.1 * e["step"], "reward_std": 0.05, "completions/mean_length": 9.0} for e in log]
    (run / "log_history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in grpo))
    plot_run(run)
    assert drawn[-1][-2:] == ["GRPO reward and its spread within groups", "GRPO completion length (tokens)"]


def test_deepspeeds_cpu_accelerator_warning_is_not_printed(capsys):
    pytest.importorskip("deepspeed")
    from deepspeed.utils import logger as deepspeed_logger  # the logger DeepSpeed's accelerator detection warns on

    from vlmtune.cli import _setup_logging

    _setup_logging()
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    deepspeed_logger.addHandler(handler)
    try:
        deepspeed_logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable "
                                 "to detect it.")
        deepspeed_logger.warning("something else")
    finally:
        deepspeed_logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["something else"]


def test_similarity_reward_gives_partial_credit():
    from rapidfuzz.distance import Indel

    from vlmtune.rewards import BUILTINS

    values = BUILTINS["similarity"](["Red.", "<answer>rd</answer>", "blue"], answer="red")
    assert values[0] == 1.0
    assert values[1] == pytest.approx(Indel.normalized_similarity("rd", "red"))  # 0.8: closer earns more
    assert 0 <= values[2] < values[1]


def test_the_stores_first_build_logs_its_progress(tmp_path, tiny_model_dir, monkeypatch, caplog):
    import json

    from conftest import DATA_JSON

    from vlmtune.cli import main
    from vlmtune.data import progress, store_build

    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line at every chunk, not every 10 s
    monkeypatch.setattr(store_build, "CHUNK", 4)
    records = json.loads(DATA_JSON.read_text())
    data = tmp_path / "progress.json"  # a file of its own: its store is built here, not found in the cache
    data.write_text(json.dumps([{**r, "id": f"progress_{r['id']}"} for r in records]))
    with caplog.at_level(logging.INFO, logger="vlmtune.data.progress"):
        assert main(["check-data", str(data), "--image_folder", str(DATA_JSON.parent), "--model",
                     str(tiny_model_dir()), "--processes", "1"]) == 0
    counts = [int(r.getMessage().split(": ")[2].split()[0]) for r in caplog.records
              if r.name == "vlmtune.data.progress"]
    assert counts == list(range(4, len(records) + 1, 4))  # 12 records read 4 at a time: 4, 8, 12
