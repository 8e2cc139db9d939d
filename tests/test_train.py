"""End-to-end training on this machine: the four scripts, bf16 masters, DeepSpeed, early errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import forkserver
import pytest
import torch
from conftest import DATA_JSON, EXAMPLES, FORKRUN, ROOT, free_port

PYTHON = sys.executable


def run(cmd: list[str], timeout: int = 600, forked_python: bool = False, **env) -> subprocess.CompletedProcess:
    """Run ``cmd`` (forked from the tests' fork server where it can be); with ``forked_python``, a script's
    ``python -m vlmtune.cli`` is too (``forkserver.script_env``)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    if forked_python:
        full_env = forkserver.script_env(full_env)
    result = forkserver.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def history(output_dir: Path, key: str = "loss") -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry[key] for entry in state["log_history"] if key in entry}


def cli(*args: str) -> list[str]:
    return [PYTHON, "-m", "vlmtune.cli", "train", "--data_path", str(DATA_JSON), "--image_folder", str(EXAMPLES),
            "--use_cpu", "True", "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1", *args]


SCRIPTS = ["finetune_lora_vision.sh", "finetune_lora.sh", "finetune.sh", "finetune_video.sh"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_runs_as_is_on_this_machine_and_halves_the_loss(script, tmp_path):
    """The script with its demo defaults but 10 of the demo's 20 epochs: 30 steps, after which the mean of the last
    three losses is 0.34 (finetune.sh) to 0.45 (finetune_lora_vision.sh) of the first one, measured. The first
    script starts the real interpreter, as a user does; the others fork their `python -m vlmtune.cli` from the
    tests' fork server (the same interpreter, its imports done)."""
    result = run(["bash", f"scripts/{script}", "--disable_tqdm", "True"], forked_python=script != SCRIPTS[0],
                 OUTPUT_DIR=str(tmp_path / "out"), EPOCHS="10")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = f"{gpus} CUDA device(s) on 1 node(s), bf16" if gpus else "CPU (no CUDA found)"
    assert f"[launch] device: {device}" in result.stdout
    losses = list(history(tmp_path / "out").values())
    assert len(losses) >= 20
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < first / 2, (script, first, last)
    assert (tmp_path / "out" / "vlmtune_run.json").is_file()


NEW_FAMILY_SCRIPTS = [("qwen3_vl_moe", "finetune_video.sh"), ("qwen3_5", "finetune.sh"),
                      ("qwen3_5_moe", "finetune_lora_vision.sh")]
"""One whole-script run per newer family, rotating the scripts (finetune_lora.sh runs them in test_merge.py)."""


@pytest.mark.slow
@pytest.mark.parametrize(("family", "script"), NEW_FAMILY_SCRIPTS)
def test_each_new_family_runs_a_script_then_merges_and_predicts(family, script, tmp_path, capsys):
    from vlmtune.cli import main

    out = tmp_path / "out"
    run(["bash", f"scripts/{script}", "--tiny_family", family, "--max_steps", "4", "--disable_tqdm", "True"],
        forked_python=True, OUTPUT_DIR=str(out))  # the scripts' own run with the real interpreter is the test above
    losses = history(out)
    assert sorted(losses) == [1, 2, 3, 4] and all(0 < v < 20 for v in losses.values())
    assert json.loads((out / "vlmtune_run.json").read_text())["model_type"] == family
    aux = history(out, "aux_loss")
    if "moe" in family:  # top-2 of 4 experts: 2.0 when balanced, more when not
        assert sorted(aux) == [1, 2, 3, 4] and all(1.9 < v < 8 for v in aux.values()), aux
    else:
        assert aux == {}
    merged = tmp_path / "merged"
    assert main(["merge", str(out), str(merged)]) == 0
    printed = capsys.readouterr().out
    model = merged if merged.is_dir() else out  # a full run's output is already the model
    assert merged.is_dir() or "already a standalone model" in printed
    assert main(["predict", "--model", str(model), "--image", str(EXAMPLES / "images" / "red_circle.png"),
                 "--prompt", "What shape?", "--max_new_tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


FAKE_PYTHON = """#!/bin/bash
# Answers launch.sh's own questions with the real interpreter; writes the launch command instead of running it.
if [ "$1" = -c ]; then exec {python} "$@"; fi
printf '%s\\n' "$@" > {out}
"""


@pytest.mark.parametrize(("env", "pairs", "absent"), [
    # A hostfile of 2 nodes x 4 slots is 8 devices: 64 / (4 x 8) = 2 accumulation steps.
    ({"HOSTFILE": "hosts", "GLOBAL_BATCH_SIZE": "64", "BATCH_PER_DEVICE": "4"},
     [("-m", "deepspeed.launcher.runner"), ("--module", "vlmtune.cli"), ("--gradient_accumulation_steps", "2")], []),
    ({"NUM_DEVICES": "2", "NNODES": "2", "NODE_RANK": "1", "GLOBAL_BATCH_SIZE": "64", "BATCH_PER_DEVICE": "4"},
     [("-m", "torch.distributed.run"), ("--nnodes", "2"), ("--node_rank", "1"), ("--nproc_per_node", "2"),
      ("--gradient_accumulation_steps", "4")], []),
    ({"NUM_WORKERS": "0"}, [("--dataloader_num_workers", "0")], ["--dataloader_prefetch_factor"]),
    ({"RESUME": "auto"}, [("--resume_from_checkpoint", "auto")], []),
    ({"ENGINE": "fsdp2", "DEEPSPEED": "scripts/zero2.json"},
     [("-m", "torch.distributed.run"), ("--fsdp", "full_shard"), ("--fsdp_config", "scripts/fsdp2.json")],
     ["--deepspeed"]),
])
def test_launcher_builds_the_command_a_cluster_needs(env, pairs, absent, tmp_path):
    """launch.sh's device arithmetic and command line, checked without launching anything."""
    (tmp_path / "hosts").write_text("# two nodes\nnode-a slots=4\nnode-b slots=4\n")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=PYTHON, out=tmp_path / "argv"))
    fake.chmod(0o755)
    env = {k: str(tmp_path / v) if k == "HOSTFILE" else v for k, v in env.items()}
    run(["bash", "scripts/finetune_lora.sh"], PYTHON=str(fake), **env)
    argv = (tmp_path / "argv").read_text().splitlines()
    adjacent = set(zip(argv, argv[1:]))
    assert [p for p in pairs if p not in adjacent] == [], argv
    assert [flag for flag in absent if flag in argv] == [], argv


@pytest.mark.slow  # a training process
@pytest.mark.parametrize("pure", [False, True])
def test_a_bf16_full_run_trains_fp32_masters_and_writes_a_bf16_model(tmp_path, pure):
    """Checkpoints keep the fp32 masters of what trains (a resume continues exactly); the final folder is
    the model in the dtype it was trained and loaded in. --pure_bf16 keeps everything in bf16."""
    from safetensors import safe_open

    out = tmp_path / "out"
    result = run(cli("--mode", "full", "--bf16", "True", "--max_steps", "2", "--save_steps", "1",
                     "--learning_rate", "1e-5", "--output_dir", str(out), "--pure_bf16", str(pure)))
    assert ("fp32 master weights for " in result.stderr) is not pure

    def dtypes(folder: Path) -> dict[str, str]:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}

    final, checkpoint = dtypes(out), dtypes(out / "checkpoint-1")
    assert set(final.values()) == {"BF16"}
    assert {v for k, v in checkpoint.items() if k.startswith("visual.blocks.")} == {"BF16"}  # frozen: as loaded
    assert {v for k, v in checkpoint.items() if k.startswith("model.layers.")} == {"BF16" if pure else "F32"}


TORCHRUN = [PYTHON, "-m", "torch.distributed.run"]


def deepspeed_cmd(nproc: int, *args: str, launcher: list[str] = FORKRUN) -> list[str]:
    """`vlmtune train` on ``nproc`` ranks, on a port free at run time: forked (tests/forkrun.py) or torchrun."""
    train_args = cli(*args)[3:]  # drop "python -m vlmtune.cli"
    return [*launcher, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "-m", "vlmtune.cli",
            *train_args]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2.json", "zero3.json",
                                    # the offload pair on one xdist worker: the first builds CPU Adam while the other
                                    # would only wait on the build lock
                                    pytest.param("zero2_offload.json", marks=pytest.mark.xdist_group("cpu_adam")),
                                    pytest.param("zero3_offload.json", marks=pytest.mark.xdist_group("cpu_adam"))])
def test_deepspeed_trains_our_parameter_groups(config, tmp_path):
    """The DeepSpeed JSONs carry no optimizer block, so the engine's optimizer holds our groups and rates.
    The offload configs run DeepSpeed's CPU Adam (built on first use, about a minute, then cached)."""
    out = tmp_path / "out"
    run(deepspeed_cmd(1, "--mode", "lora_vision", "--deepspeed", f"scripts/{config}", "--max_steps", "2",
                      "--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--vision_lr", "1e-3",
                      "--merger_lr", "2e-3", "--lr_scheduler_type", "constant", "--output_dir", str(out),
                      "--save_strategy", "no"))
    for key, value in {"lr/llm": 3e-3, "lr/vision": 1e-3, "lr/merger": 2e-3, "lr/merger/no_decay": 2e-3}.items():
        rates = list(history(out, key).values())
        assert rates and rates == pytest.approx([value] * len(rates)), key
    assert history(out, "learning_rate")[1] == pytest.approx(3e-3)
    assert (out / "adapter_model.safetensors").is_file() and (out / "non_lora_trainables.safetensors").is_file()


def mixed_ranks_command(tmp_path: Path, *extra: str, entry: list[str] | None = None,
                        launcher: list[str] = FORKRUN) -> list[str]:
    """A 2-process ZeRO-3 run in which rank 0 gets only text and rank 1 images and videos: sequential
    sampling deals the batches round-robin over [text, image, text, image+video, text, video, ...]. ``entry``:
    a script in place of ``-m vlmtune.cli``."""
    raw = {r["id"]: r for r in json.loads(DATA_JSON.read_text())}
    order = ["text_only", "single_red_circle", "text_multi_turn", "image_and_video",
             "text_only", "video_ball_left", "text_multi_turn", "two_images"]
    data = [dict(raw[k], id=f"{k}_{i}") for i, k in enumerate(order)]
    (tmp_path / "data.json").write_text(json.dumps(data))
    cmd = deepspeed_cmd(2, "--mode", "lora_vision", "--deepspeed", "scripts/zero3.json", "--max_steps", "4",
                        "--per_device_train_batch_size", "1", "--train_sampling_strategy", "sequential",
                        "--output_dir", str(tmp_path / "out"), "--save_strategy", "no", *extra, launcher=launcher)
    cmd[cmd.index(str(DATA_JSON))] = str(tmp_path / "data.json")
    if entry:
        cmd[cmd.index("-m", cmd.index("--master_port")):cmd.index("vlmtune.cli") + 1] = entry
    return cmd


@pytest.mark.slow
def test_zero3_two_processes_with_text_only_on_one_rank_finishes(tmp_path):
    """Also starts from an empty cache: both ranks ask for the embedded model at once, inside the job. Launched by
    torchrun itself, as scripts/launch.sh does (the other multi-process tests fork their ranks: tests/forkrun.py)."""
    out = tmp_path / "out"
    run(mixed_ranks_command(tmp_path, launcher=TORCHRUN), timeout=420, VLMTUNE_CACHE=str(tmp_path / "cache"))
    assert sorted(history(out)) == [1, 2, 3, 4]
    (tiny,) = (tmp_path / "cache").glob("tiny-qwen2_vl-*[0-9]")  # one folder, no leftover build folders
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in tiny.iterdir()}
    # What ZeRO-3 saved (gathered, not partitioned) merges into a verified standalone model.
    from vlmtune.merge import merge

    result = merge(out, tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file() and result.diffs["merged"] < 1e-3


@pytest.mark.slow
def test_zero3_two_processes_train_a_moe_with_text_only_on_one_rank(tmp_path):
    """A tiny Qwen3-VL-MoE under ZeRO-3 on 2 processes, rank 0 text only: LoRA on the fused experts, the routers
    trained, the aux loss logged; what ZeRO-3 saved merges into a verified standalone model."""
    from safetensors.torch import load_file

    from vlmtune.merge import merge

    out = tmp_path / "out"
    run(mixed_ranks_command(tmp_path, "--tiny_family", "qwen3_vl_moe", "--train_router", "True",
                            "--lora_rank", "4"), timeout=420)
    assert sorted(history(out)) == [1, 2, 3, 4] and sorted(history(out, "aux_loss")) == [1, 2, 3, 4]
    adapters = load_file(out / "adapter_model.safetensors")
    experts_b = [v for k, v in adapters.items() if ".mlp.experts." in k and "lora_B" in k]
    assert len(experts_b) == 4 and all(float(v.abs().max()) > 0 for v in experts_b)  # gathered, and trained
    routers = load_file(out / "non_lora_trainables.safetensors")
    assert {k for k in routers if ".mlp.gate." in k} == {f"model.language_model.layers.{i}.mlp.gate.weight"
                                                        for i in (0, 1)}
    result = merge(out, tmp_path / "merged")
    assert result.diffs["merged"] < 1e-3 and result.diffs["reloaded"] < 1e-3


NO_FILLERS = """
import os, sys, threading
from transformers import Trainer
import vlmtune.stages.sft as T
T.vision_fillers = lambda *args, **kwargs: None
step = Trainer.training_step
def watched_step(self, *args, **kwargs):
    if self.state.global_step > 0:
        return step(self, *args, **kwargs)
    rank = os.environ["RANK"]
    print(f"[control] rank {rank} starts step 1", flush=True)
    def stuck():
        print(f"[control] rank {rank} still in step 1 after 60 s: the ranks wait in different collectives", flush=True)
        os._exit(3)
    watchdog = threading.Timer(60, stuck)
    watchdog.start()
    try:
        return step(self, *args, **kwargs)
    finally:
        watchdog.cancel()
Trainer.training_step = watched_step
from vlmtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_zero3_mixed_ranks_break_without_the_vision_fillers(tmp_path):
    """Control for the test above: the same run without fillers dies in its first step (measured: gloo's
    "collective mismatch" on rank 0 once both ranks had started step 1), or hangs there (the ranks wait in
    different collectives). A watchdog armed when step 1 starts, and disarmed when it returns, ends a rank still in
    step 1 after 60 s, so that a hang ends there; the test's own limit stays as a backstop, after which the whole
    process group (launcher and ranks) is killed."""
    script = tmp_path / "no_fillers.py"
    script.write_text(NO_FILLERS)
    launched = forkserver.Popen(mixed_ranks_command(tmp_path, entry=[str(script)]), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, err = launched.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(launched.pid, signal.SIGKILL)
        launched.communicate()
        return  # hung: what the fillers prevent
    assert launched.returncode != 0
    started = [f"[control] rank {rank} starts step 1" in out for rank in (0, 1)]
    assert started == [True, True], out[-3000:] + err[-3000:]  # it died in step 1, not before
    assert not (tmp_path / "out" / "trainer_state.json").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "lora", "--vision_lora", "True", "--freeze_vision_tower", "False"], "vision_lora"),
    pytest.param(["--bits", "4"], "needs a CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a machine with CUDA runs QLoRA")),
    (["--bits", "4", "--mode", "full"], "quantizes the language model"),
    (["--bits", "8", "--unfreeze_topk_llm", "2"], "quantizes the language model"),
    (["--mode", "full", "--unfreeze_topk_llm", "1"], "already trains fully"),
])
def test_bad_flag_combinations_stop_before_the_model_loads(args, message, capsys, tmp_path):
    from vlmtune.cli import main

    code = main(["train", "--data_path", str(DATA_JSON), "--output_dir", str(tmp_path), "--use_cpu", "True", *args])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_a_deepspeed_config_with_an_optimizer_block_stops_the_run(capsys, tmp_path):
    """DeepSpeed would build its own optimizer from the block, over all trainable weights at one rate."""
    from vlmtune.cli import main

    config = {**json.loads((ROOT / "scripts" / "zero2.json").read_text()),
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}}}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    code = main(["train", "--data_path", str(DATA_JSON), "--output_dir", str(tmp_path / "out"), "--use_cpu", "True",
                 "--deepspeed", str(tmp_path / "ds.json")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"vlmtune train: error: the DeepSpeed config {tmp_path / 'ds.json'} has an \"optimizer\" "
                          "block: DeepSpeed would build its own optimizer over every trainable weight at one learning "
                          "rate, dropping vlmtune's rates per part (--vision_lr, --merger_lr)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("optim", ["sgd", "adafactor"])
def test_an_optimizer_deepspeed_would_swap_for_cpu_adam_under_offload_stops_the_run(capsys, tmp_path, optim):
    """With ``offload_optimizer`` accelerate replaces any optimizer but torch's AdamW by DeepSpeed's CPU Adam
    (tests/test_upstream.py): the run stops in one line before anything loads; AdamW and a config without offload
    pass the check."""
    from vlmtune.cli import main
    from vlmtune.config import parse_train_args
    from vlmtune.model.modes import plan_from_args
    from vlmtune.stages.setup import check_environment

    code = main(["train", "--data_path", str(DATA_JSON), "--output_dir", str(tmp_path / "out"), "--use_cpu", "True",
                 "--optim", optim, "--deepspeed", "scripts/zero2_offload.json"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"vlmtune train: error: --optim {optim} cannot run with the DeepSpeed config "
                          "scripts/zero2_offload.json, which offloads the optimizer to cpu: accelerate would swap it "
                          "for one of DeepSpeed's CPU optimizers"), err
    assert not (tmp_path / "out").exists()
    passing = (["--deepspeed", "scripts/zero3_offload.json"], ["--optim", optim, "--deepspeed", "scripts/zero2.json"])
    for flags in passing:
        model, _, mode, train = parse_train_args(["--data_path", str(DATA_JSON), "--output_dir", str(tmp_path),
                                                  "--use_cpu", "True", *flags])
        check_environment(model, train, plan_from_args(mode))


RANK1_DIES_IN_SAVE = """
import os, sys
from transformers import Trainer
save = Trainer._save_optimizer_and_scheduler
def die_on_rank_1(self, output_dir):
    if os.environ["RANK"] == "1" and self.state.global_step == 2:
        os._exit(17)  # rank 1 dies before DeepSpeed writes its optimizer shard; rank 0 goes on writing its files
    return save(self, output_dir)
Trainer._save_optimizer_and_scheduler = die_on_rank_1
from vlmtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_deepspeed_checkpoint_is_published_only_when_every_rank_wrote_its_part(tmp_path):
    """Two ZeRO-2 processes; rank 1 dies in the save of checkpoint-2. Nothing is renamed into checkpoint-2, and
    `last` resumes both ranks from checkpoint-1, whose folder holds every rank's RNG state and optimizer shard."""
    out = tmp_path / "out"
    script = tmp_path / "dies.py"
    script.write_text(RANK1_DIES_IN_SAVE)
    args = ("--mode", "lora", "--deepspeed", "scripts/zero2.json", "--max_steps", "3", "--save_steps", "1",
            "--per_device_train_batch_size", "1", "--learning_rate", "5e-3", "--output_dir", str(out))
    killed = deepspeed_cmd(2, *args)
    killed[killed.index("-m", killed.index("--master_port")):killed.index("vlmtune.cli") + 1] = [str(script)]
    result = forkserver.run(killed, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode != 0
    assert not (out / "checkpoint-2").exists() and (out / "tmp-checkpoint-2").is_dir()
    first = out / "checkpoint-1"
    names = {p.name for p in first.rglob("*") if p.is_file()}
    assert {"trainer_state.json", "adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= names
    assert sum("optim_states" in name for name in names) == 2, names  # one ZeRO shard per rank
    resumed = run(deepspeed_cmd(2, *args, "--resume_from_checkpoint", "last"))
    assert f"[vlmtune] resuming from {first} (step 1)" in resumed.stderr
    assert f"[vlmtune] skipping {out / 'tmp-checkpoint-2'}: incomplete (a save that did not finish)" in resumed.stderr
    assert sorted(history(out)) == [1, 2, 3]
    assert not list(out.glob("tmp-*")) and (out / "checkpoint-3" / "rng_state_1.pth").is_file()


@pytest.mark.slow
def test_the_token_count_is_the_whole_jobs_on_two_processes(tiny_model_dir, tmp_path):
    """Two processes (gloo): the tokens behind tokens/s are every rank's, not rank 0's. After one epoch the run's
    count equals the real tokens of all four records (of different lengths), counted here from the processor's own
    chat template; rank 0 alone saw two of them."""
    from transformers import AutoProcessor

    pairs = [("Say one word.", "Yes"), ("Count to three, please.", "One two three"), ("Name a colour.", "Red"),
             ("What is two plus two? Say why.", "Four, since two and two make four.")]
    records = [{"id": f"t{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
               for i, (q, a) in enumerate(pairs)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    model = tiny_model_dir()
    processor = AutoProcessor.from_pretrained(model)
    lengths = []
    for question, answer in pairs:
        messages = [{"role": "user", "content": [{"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        lengths.append(len(processor.tokenizer(processor.apply_chat_template(messages, tokenize=False))["input_ids"]))
    assert len(set(lengths)) > 1
    out = tmp_path / "out"
    run([*FORKRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "vlmtune.cli", "train",
         "--model_name_or_path", str(model), "--data_path", str(data), "--use_cpu", "True", "--report_to", "none",
         "--disable_tqdm", "True", "--logging_steps", "1", "--num_train_epochs", "1",
         "--per_device_train_batch_size", "1", "--mode", "lora", "--save_strategy", "no", "--output_dir", str(out)],
        timeout=420)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert state["num_input_tokens_seen"] == sum(lengths)
    assert len(history(out, "tokens_per_s")) == 2
