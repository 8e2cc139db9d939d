"""FSDP2 as a second engine, on CPU over gloo: two processes train exactly as one does (same data order), a run
killed with SIGKILL resumes from `last` with the same losses, and what FSDP saved merges and predicts.

accelerate 1.16 would run DDP instead of FSDP on CPU; vlmtune.stages.engines puts FSDP back (the log line says so),
and the checkpoints hold FSDP's own files (``pytorch_model_fsdp.bin``), so these runs are FSDP2 runs."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import forkserver
import pytest
from conftest import DATA_JSON, EXAMPLES, FORKRUN, ROOT

STEPS = 5

KILLED_AT_STEP_4 = """
import os, signal, sys
from vlmtune.stages.trainer import VisionLanguageTrainer
step = VisionLanguageTrainer.training_step
def training_step(self, *args, **kwargs):
    if self.state.global_step == 3 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 after checkpoint-3 was published
    return step(self, *args, **kwargs)
VisionLanguageTrainer.training_step = training_step
from vlmtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(out: Path, *args: str) -> list[str]:
    return ["train", "--data_path", str(DATA_JSON), "--image_folder", str(EXAMPLES), "--use_cpu", "True",
            "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1", "--output_dir", str(out),
            "--train_sampling_strategy", "sequential", "--learning_rate", "2e-3", "--lr_scheduler_type", "constant",
            "--dataloader_num_workers", "0", "--lora_dropout", "0", *args]  # dropout masks differ per process


def launch(out: Path, *args: str, nproc: int = 1, script: Path | None = None, check: bool = True):
    """One process (plain, per-device batch 2: in this one, where the stack is imported already) or ``nproc``
    FSDP2 processes (per-device batch 2 / nproc)."""
    if nproc == 1:
        from vlmtune.cli import main

        assert main(train_args(out, "--per_device_train_batch_size", "2", *args)) == 0
        return None
    entry = [str(script)] if script else ["-m", "vlmtune.cli"]
    cmd = [*FORKRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *entry,
           *train_args(out, "--per_device_train_batch_size", str(2 // nproc), "--fsdp", "full_shard",
                       "--fsdp_config", "scripts/fsdp2.json", *args)]
    result = forkserver.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """lora_vision: one process for 5 steps; FSDP2 on 2 processes killed with SIGKILL in step 4 (after
    checkpoint-3), then resumed from `last` to step 5. full (fp32, a merger rate of its own): 2 steps each way."""
    root = tmp_path_factory.mktemp("fsdp2")
    lora = ("--mode", "lora_vision", "--max_steps", str(STEPS), "--save_steps", "3")
    full = ("--mode", "full", "--max_steps", "2", "--merger_lr", "5e-3", "--save_strategy", "no")
    launch(root / "single", *lora)
    launch(root / "single_full", *full)
    script = root / "killed.py"
    script.write_text(KILLED_AT_STEP_4)
    killed = launch(root / "fsdp", *lora, nproc=2, script=script, check=False)
    resumed = launch(root / "fsdp", *lora, "--resume_from_checkpoint", "last", nproc=2)
    fsdp_full = launch(root / "fsdp_full", *full, nproc=2)
    return root, killed, resumed, fsdp_full


@pytest.mark.slow
def test_two_fsdp2_processes_give_the_single_process_losses_through_a_kill_and_resume(runs):
    root, killed, resumed, fsdp_full = runs
    assert "FSDP2 on CPU over gloo" in fsdp_full.stderr
    assert killed.returncode == -9 or "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert (root / "fsdp" / "checkpoint-3" / "pytorch_model_fsdp.bin").is_file()
    assert f"resuming from {root / 'fsdp' / 'checkpoint-3'} (step 3)" in resumed.stderr
    single, fsdp = losses(root / "single"), losses(root / "fsdp")
    assert len(single) == STEPS and len(fsdp) == STEPS
    assert fsdp == pytest.approx(single, rel=1e-4), (fsdp, single)
    assert losses(root / "fsdp_full") == pytest.approx(losses(root / "single_full"), rel=1e-4)


@pytest.mark.slow
def test_what_fsdp2_saved_merges_and_predicts(runs, tmp_path, capsys):
    from safetensors import safe_open

    from vlmtune.cli import main
    from vlmtune.merge import merge

    root = runs[0]
    result = merge(root / "fsdp", tmp_path / "merged")
    assert result.diffs["merged"] < 1e-3 and result.diffs["reloaded"] < 1e-3
    with safe_open(str(root / "fsdp" / "non_lora_trainables.safetensors"), "pt") as f:  # the whole merger
        merger = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert merger and all(".merger." in k for k in merger)
    with safe_open(str(root / "fsdp_full" / "model.safetensors"), "pt") as f:  # the full run's folder is the model
        assert len(list(f.keys())) == 58
    state = json.loads((root / "fsdp_full" / "trainer_state.json").read_text())
    assert {e["lr/merger"] for e in state["log_history"] if "lr/merger" in e} == {5e-3}
    for model in (tmp_path / "merged", root / "fsdp_full"):
        assert main(["predict", "--model", str(model), "--image", str(EXAMPLES / "images" / "red_circle.png"),
                     "--prompt", "What shape?", "--max_new_tokens", "3"]) == 0
        assert capsys.readouterr().out.strip()


def test_fsdp_and_deepspeed_together_stop_in_one_line(capsys, tmp_path):
    from vlmtune.cli import main

    code = main(["train", "--data_path", str(DATA_JSON), "--output_dir", str(tmp_path / "out"), "--use_cpu", "True",
                 "--fsdp", "full_shard", "--fsdp_config", "scripts/fsdp2.json", "--deepspeed", "scripts/zero2.json"])
    # Only vlmtune's lines: transformers warns that a string --fsdp is deprecated, through a handler that an
    # earlier in-process main() may have left on a closed capture stream ("--- Logging error ---").
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("vlmtune")]
    assert code == 1 and len(ours) == 1, err
    assert ours[0].startswith("vlmtune train: error: --fsdp and --deepspeed are two engines for the same job")
    assert not (tmp_path / "out").exists()
