"""A run that is killed resumes: atomic checkpoints, `--resume_from_checkpoint last|auto`, SIGTERM, a full disk,
the run lock, and the one-line errors of a run.

The kill tests run every `vlmtune train` segment through tests/segments.py (one import, a forked child per
segment, kills at points of the code chosen by seeded RNGs, never timers) and compare the loss of every step
with one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from pathlib import Path

import forkserver
import pytest
from conftest import DATA_JSON, EXAMPLES, ROOT
from safetensors.torch import load_file

MAX_STEPS, SAVE_STEPS = 6, 2
COMMON = ["--data_path", str(DATA_JSON), "--image_folder", str(EXAMPLES), "--use_cpu", "True", "--report_to", "none",
          "--disable_tqdm", "True", "--logging_steps", "1", "--mode", "lora", "--lora_rank", "8", "--lora_dropout",
          "0.1", "--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS), "--per_device_train_batch_size",
          "2", "--learning_rate", "5e-3", "--seed", "7"]
KILLED = 17
EXIT_CODE = {"step": KILLED, "mid-save": KILLED, "publish": KILLED, "rotate": KILLED, "sigterm": 143, "disk-full": 1}
SAVE_KILLS = ("mid-save", "publish", "rotate", "disk-full")


def newest_complete_after(at: str, step: int, started_at: int) -> int:
    """The checkpoint a resume must pick after a kill (0: none), for a run that started from `started_at`, from
    when saves happen (end of every SAVE_STEPS-th step, and of the step SIGTERM arrived in) and when a checkpoint
    counts as written (once renamed into place)."""
    if at in ("sigterm", "rotate"):  # checkpoint `step` is in place
        return step
    before = (step - 1) // SAVE_STEPS * SAVE_STEPS  # the last regular save before the one of `step`
    return max(started_at, before)


def chain(seed: int, kinds: tuple[str, ...]) -> list[tuple[str, int]]:
    """Kills for one run: each at a step drawn by `seed` from those the run still reaches."""
    rng = random.Random(seed)
    kills, started_at = [], 0
    for at in kinds:
        steps = [k for k in range(started_at + 1, MAX_STEPS) if at not in SAVE_KILLS or k % SAVE_STEPS == 0]
        step = rng.choice(steps[:3])
        kills.append((at, step))
        started_at = newest_complete_after(at, step, started_at)
    return kills


CHAINS = {
    "seed0": chain(0, ("mid-save", "step")),
    "seed1": chain(1, ("publish", "sigterm")),
    "seed2": chain(2, ("step", "rotate")),
    "disk": [("disk-full", 4)],
}
OLD_STYLE_INCOMPLETE = 5
"""The disk chain also gets an empty checkpoint-5, as a kill during an in-place save (before this fix) left."""


def history(output_dir: Path, key: str = "loss") -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry[key] for entry in state["log_history"] if key in entry}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, tiny_model_dir):
    """One uninterrupted run, and every chain: its killed segments, then a resume that runs to the end."""
    tiny_model_dir()  # built once, before any child needs it
    root = tmp_path_factory.mktemp("killed")
    segments = [{"argv": ["train", *COMMON, "--output_dir", str(root / "full")], "log": str(root / "full.log")}]
    for name, kills in CHAINS.items():
        out, started_at = root / name, 0
        for i, (at, step) in enumerate([*kills, (None, None)]):
            resume = "last" if i == len(kills) and started_at else "auto"
            if at:
                started_at = newest_complete_after(at, step, started_at)
            segment = {"argv": ["train", *COMMON, "--save_total_limit", "1", "--output_dir", str(out),
                                "--resume_from_checkpoint", resume],
                       "kill": {"at": at, "step": step} if at else None, "log": str(root / f"{name}-{i}.log")}
            if name == "disk" and i == 1:
                segment["mkdir"] = [str(out / f"checkpoint-{OLD_STYLE_INCOMPLETE}")]
            segments.append(segment)
    (root / "spec.json").write_text(json.dumps(segments))
    result = forkserver.run([sys.executable, str(ROOT / "tests" / "segments.py"), str(root / "spec.json"),
                             str(root / "codes.json")], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    codes = json.loads((root / "codes.json").read_text())
    assert codes[0] == 0, (root / "full.log").read_text()[-3000:]
    return root, dict(zip([s["log"] for s in segments], codes))


@pytest.mark.slow  # a chain of killed and resumed training processes
@pytest.mark.parametrize("name", list(CHAINS))
def test_a_killed_run_resumes_from_its_newest_complete_checkpoint_with_the_same_losses(killed_runs, name):
    root, codes = killed_runs
    out, kills = root / name, CHAINS[name]
    started_at, unfinished = 0, set()  # unfinished saves lie in tmp-checkpoint-N until a later save completes
    for i, (at, step) in enumerate(kills):
        finished = [s for s in range(started_at + 1, step) if s % SAVE_STEPS == 0] + (
            [step] if at == "sigterm" else [])  # saves that were published and rotated before the kill
        if finished:
            unfinished = set()
        if at in SAVE_KILLS:  # this save starts by removing what an earlier save of the same step left
            unfinished = unfinished - {step} | ({step} if at in ("mid-save", "publish") else set())
        started_at = newest_complete_after(at, step, started_at)
        log = (root / f"{name}-{i}.log").read_text()
        assert codes[str(root / f"{name}-{i}.log")] == EXIT_CODE[at], (at, step, log[-3000:])
        assert "Traceback" not in log, log[-3000:]
        resumed = (root / f"{name}-{i + 1}.log").read_text()
        if started_at:
            assert f"[vlmtune] resuming from {out / f'checkpoint-{started_at}'} (step {started_at})" in resumed, resumed
        else:
            assert f"[vlmtune] no complete checkpoint in {out}: starting from step 0" in resumed, resumed
        notes = [line for line in resumed.splitlines() if line.startswith("[vlmtune] skipping ")]
        expected = [f"[vlmtune] skipping {out / f'tmp-checkpoint-{s}'}: incomplete (a save that did not finish)"
                    for s in sorted(unfinished)]  # one note each, never resumed from
        if name == "disk":
            expected.append(f"[vlmtune] skipping {out / f'checkpoint-{OLD_STYLE_INCOMPLETE}'}: incomplete (no "
                            "trainer_state.json)")
        assert notes == expected, resumed
    final_log = root / f"{name}-{len(kills)}.log"
    assert codes[str(final_log)] == 0, final_log.read_text()[-3000:]
    full, resumed = history(root / "full"), history(out)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, kills)
    left = sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", "tmp-", ".vlmtune")))
    kept = [f"checkpoint-{MAX_STEPS}"] + ([f"checkpoint-{OLD_STYLE_INCOMPLETE}"] if name == "disk" else [])
    assert left == sorted(kept)  # --save_total_limit 1 among complete ones, no leftovers, no lock


@pytest.mark.slow  # a chain of killed and resumed training processes
def test_sigterm_saves_at_the_step_boundary_and_says_how_to_resume(killed_runs):
    root, _ = killed_runs
    (i, step), = [(i, step) for i, (at, step) in enumerate(CHAINS["seed1"]) if at == "sigterm"]
    log = (root / f"seed1-{i}.log").read_text()
    out = root / "seed1"
    assert log.count(f"[vlmtune] SIGTERM: saving checkpoint-{step}, then stopping") == 1
    assert log.splitlines()[-1] == (f"vlmtune train: stopped by SIGTERM after step {step}, saved in "
                                    f"{out / f'checkpoint-{step}'}; run the same command with "
                                    "--resume_from_checkpoint last to continue")
    started_at = newest_complete_after(*CHAINS["seed1"][i - 1], 0) if i else 0
    logged = [line for line in log.splitlines() if re.match(r"step \d+/\d+  loss ", line)]
    assert len(logged) == step - started_at  # every step up to the signal's, none after it


@pytest.mark.slow  # a chain of killed and resumed training processes
def test_a_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(killed_runs):
    root, _ = killed_runs
    log = (root / "disk-0.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("vlmtune train: error:")]
    assert len(errors) == 1 and errors == [log.splitlines()[-1]], log[-3000:]
    assert errors[0].startswith("vlmtune train: error: writing checkpoint-4 failed: No space left on device (")
    assert f"the last complete checkpoint is {root / 'disk' / 'checkpoint-2'}. Free space" in errors[0]
    assert errors[0].endswith("then run the same command with --resume_from_checkpoint last")


@pytest.mark.slow  # a chain of killed and resumed training processes
def test_lora_checkpoint_is_under_a_tenth_of_the_model(killed_runs, tiny_model_dir):
    root, _ = killed_runs
    model_bytes = sum(f.stat().st_size for f in Path(tiny_model_dir()).glob("*.safetensors"))
    saved = root / "full" / f"checkpoint-{MAX_STEPS}"
    weights = sum(f.stat().st_size for f in saved.glob("*.safetensors"))
    assert (saved / "adapter_model.safetensors").is_file()
    assert not (saved / "model.safetensors").exists()
    assert weights < 0.10 * model_bytes, (weights, model_bytes)


# ---------------------------------------------------------------- errors of a run, in one line, in-process


def train_main(*args: str) -> int:
    from vlmtune.cli import main

    return main(["train", "--data_path", str(DATA_JSON), "--image_folder", str(EXAMPLES), "--use_cpu", "True",
                 "--report_to", "none", "--disable_tqdm", "True", *args])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vlmtune train:")]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    return lines[0]


def fake_checkpoint(folder: Path) -> Path:
    """A folder with what a complete checkpoint holds, as far as picking one goes."""
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize("case", ["missing", "file", "incomplete", "run folder", "last without any"])
def test_a_bad_resume_path_stops_in_one_line_before_anything_loads(case, tmp_path, capsys):
    out = tmp_path / "out"
    fake_checkpoint(tmp_path / "old" / "checkpoint-3")
    (tmp_path / "old" / "checkpoint-4").mkdir()
    (tmp_path / "a.txt").write_text("x")
    value, message = {
        "missing": (tmp_path / "nope", f"--resume_from_checkpoint {tmp_path / 'nope'} does not exist; give a "
                    "checkpoint-N folder, or `last`"),
        "file": (tmp_path / "a.txt", f"--resume_from_checkpoint {tmp_path / 'a.txt'} is a file;"),
        "incomplete": (tmp_path / "old" / "checkpoint-4", f"is not a complete checkpoint (no trainer_state.json); "
                       f"the newest complete one beside it is {tmp_path / 'old' / 'checkpoint-3'}; or use `last`"),
        "run folder": (tmp_path / "old", f"is not a complete checkpoint (no trainer_state.json); it is a run folder, "
                       f"whose newest complete checkpoint is {tmp_path / 'old' / 'checkpoint-3'}"),
        "last without any": ("last", f"--resume_from_checkpoint last: {out} holds no complete checkpoint; start "
                             "without the flag, or use `auto`"),
    }[case]
    assert train_main("--output_dir", str(out), "--resume_from_checkpoint", str(value)) == 1
    line = one_error_line(capsys)
    assert line.startswith("vlmtune train: error: --resume_from_checkpoint ") and message in line, line
    assert not out.exists()


def test_an_output_folder_in_use_stops_the_second_run(tmp_path, capsys):
    from vlmtune.checkpoints import RunLock
    from vlmtune.run import LOCK_FILE

    out = tmp_path / "out"
    with RunLock(out):
        holder = (out / LOCK_FILE).read_text().strip()
        assert holder.startswith("pid ")
        assert train_main("--output_dir", str(out), "--max_steps", "1") == 1
        line = one_error_line(capsys)
        assert line == (f"vlmtune train: error: output folder {out} is in use by another run ({holder}); wait for it "
                        "to end, or give another --output_dir")
        assert (out / LOCK_FILE).is_file()  # the holder's lock is left alone
    assert not out.exists()  # released: the lock file goes, and the folder it made (nothing else was written)


def test_strict_length_stops_in_one_line(tmp_path, capsys):
    assert train_main("--output_dir", str(tmp_path / "out"), "--strict_length", "True", "--max_seq_length",
                      "40") == 1
    line = one_error_line(capsys)
    assert line.startswith("vlmtune train: error: ") and "over 40 tokens (vision tokens included), stopping " \
        "(--strict_length): ids 'single_red_circle'," in line, line
    assert line.endswith("; raise --max_seq_length, or drop --strict_length to skip them")


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    from vlmtune.cli import main
    from vlmtune.stages import sft

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(sft, "resolve_start", broken)
    args = ["train", "--data_path", str(DATA_JSON), "--output_dir", str(tmp_path / "o"), "--use_cpu", "True"]
    assert main(args) == 1
    assert one_error_line(capsys) == ("vlmtune train: error: KeyError: 'boom' (unexpected: run again with `vlmtune "
                                      "--debug ...` for the traceback, and report it)")
    with pytest.raises(KeyError, match="boom"):
        main(["--debug", *args])
    monkeypatch.setenv("VLMTUNE_DEBUG", "1")
    with pytest.raises(KeyError, match="boom"):
        main(args)


# ---------------------------------------------------------------- a loss that is NaN or inf


@pytest.fixture
def nan_at_step_2(monkeypatch):
    """The loss of step 2 (both of its records) is NaN: what a blown-up forward gives, gradients included."""
    from vlmtune.stages.trainer import VisionLanguageTrainer

    compute_loss = VisionLanguageTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 1 else loss

    monkeypatch.setattr(VisionLanguageTrainer, "compute_loss", poisoned)


def batch_of_step_2() -> str:
    """Records 2 and 3 of the data file: sequential sampling, 2 records a batch."""
    records = json.loads(DATA_JSON.read_text())
    return ", ".join(f"record {i} (id {records[i]['id']!r})" for i in (2, 3))


NAN_ARGS = ("--mode", "lora", "--lora_rank", "8", "--max_steps", "3", "--save_steps", "1", "--learning_rate", "5e-3",
            "--per_device_train_batch_size", "2", "--train_sampling_strategy", "sequential", "--logging_steps", "1")


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_records(nan_at_step_2, tmp_path, capsys):
    assert train_main("--output_dir", str(tmp_path / "out"), *NAN_ARGS) == 1
    assert one_error_line(capsys) == (f"vlmtune train: error: step 2: the loss is nan on the batch of "
                                      f"{batch_of_step_2()}; lower --learning_rate or check those records, or pass "
                                      "--on_nan_loss skip to skip such steps")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]


def test_on_nan_loss_skip_leaves_the_weights_of_that_step_alone(nan_at_step_2, tmp_path, caplog):
    import torch

    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="vlmtune"):
        assert train_main("--output_dir", str(out), *NAN_ARGS, "--on_nan_loss", "skip") == 0
    assert [r.getMessage() for r in caplog.records if "the loss is" in r.getMessage()] == [
        f"step 2: the loss is nan on {batch_of_step_2()}: this step is skipped (--on_nan_loss skip)"]
    weights = [load_file(str(out / f"checkpoint-{s}" / "adapter_model.safetensors")) for s in (1, 2, 3)]
    assert all(torch.isfinite(t).all() for w in weights for t in w.values())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 changed nothing
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[0])  # step 3 trained
    steps = [torch.load(out / f"checkpoint-{s}" / "optimizer.pt", weights_only=False)["state"] for s in (1, 2, 3)]
    assert [int(next(iter(state.values()))["step"]) for state in steps] == [1, 1, 2]  # AdamW did not count it


# ---------------------------------------------------------------- every family

FAMILY_STEPS = 4
FAMILY_CHAIN = [("step", 3), ("sigterm", 3)]
"""A kill inside step 3 (checkpoint-2 is the newest complete one), a resume with `last`, SIGTERM in step 3 of that
resume (it saves checkpoint-3 and stops), and a resume with `last` to the end."""


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, tiny_model_dir):
    """Per family except the default one (the chains above cover it): one uninterrupted run and the chain."""
    from vlmtune.families import FAMILIES

    families = [f for f in FAMILIES if f != "qwen2_vl"]
    for family in families:
        tiny_model_dir(family)  # built once, before any child needs it
    root = tmp_path_factory.mktemp("family-kills")
    common = [a for a in COMMON if a not in ("--max_steps", str(MAX_STEPS))]
    common += ["--max_steps", str(FAMILY_STEPS), "--lora_dropout", "0.0"]  # MoE experts take no LoRA dropout
    segments = []
    for family in families:
        argv = ["train", *common, "--tiny_family", family]
        segments.append({"argv": [*argv, "--output_dir", str(root / f"{family}-full")],
                         "log": str(root / f"{family}-full.log")})
        for i, kill in enumerate([*FAMILY_CHAIN, None]):
            segments.append({"argv": [*argv, "--output_dir", str(root / family), "--resume_from_checkpoint", "auto"],
                             "kill": {"at": kill[0], "step": kill[1]} if kill else None,
                             "log": str(root / f"{family}-{i}.log")})
    (root / "spec.json").write_text(json.dumps(segments))
    result = forkserver.run([sys.executable, str(ROOT / "tests" / "segments.py"), str(root / "spec.json"),
                             str(root / "codes.json")], cwd=ROOT, capture_output=True, text=True, timeout=1500,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return root, dict(zip([s["log"] for s in segments], json.loads((root / "codes.json").read_text())))


@pytest.mark.slow  # a chain of killed and resumed training processes
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_every_family_resumes_after_a_kill_and_a_sigterm_with_the_same_losses(family_runs, family):
    root, codes = family_runs
    out = root / family
    assert codes[str(root / f"{family}-full.log")] == 0, (root / f"{family}-full.log").read_text()[-3000:]
    logs = [(root / f"{family}-{i}.log").read_text() for i in range(len(FAMILY_CHAIN) + 1)]
    assert [codes[str(root / f"{family}-{i}.log")] for i in range(len(logs))] == [KILLED, 143, 0], logs[-1][-3000:]
    assert all("Traceback" not in log for log in logs)
    assert f"[vlmtune] resuming from {out / 'checkpoint-2'} (step 2)" in logs[1], logs[1][-3000:]
    assert f"[vlmtune] resuming from {out / 'checkpoint-3'} (step 3)" in logs[2], logs[2][-3000:]
    full, resumed = history(root / f"{family}-full"), history(out)
    assert sorted(resumed) == list(range(1, FAMILY_STEPS + 1))
    for step in range(1, FAMILY_STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (family, step)
