"""Sequence parallelism (``--sequence_parallel_size``) is exact: 2 and 4 processes over gloo, each holding a chunk
of one long record (images, a video, several turns), give the loss and every trainable gradient of the plain
single-process forward (transformers' own loss, computed in this process) within 1e-5 relative.

One launch per group size runs every case (family x mode, with and without gradient checkpointing) in one
process start per rank (tests/sp_worker.py).
"""

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
from safetensors.torch import load_file

LONG_RECORD = {
    "id": "long_mixed",
    "images": ["images/red_circle.png", "images/blue_square.png"],
    "videos": ["videos/ball_right.mp4"],
    "messages": [
        {"role": "system", "content": "You describe pictures and clips."},
        {"role": "user", "content": "<image>\nWhat shape is this?"},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "And this one? <image>"},
        {"role": "assistant", "content": "A blue square, drawn flat."},
        {"role": "user", "content": "<video>\nWhere does the ball move?"},
        {"role": "assistant", "content": "The yellow ball rolls from the left to the right of the frame."},
        {"role": "user", "content": "Which of the three was round?"},
        {"role": "assistant", "content": "The circle and the ball."},
    ],
}
SHORT_RECORD = {"id": "short_text", "messages": [{"role": "user", "content": "How many sides has a triangle?"},
                                                 {"role": "assistant", "content": "Three."}]}
PAIR_RECORD = {"id": "long_pair", "images": LONG_RECORD["images"], "videos": LONG_RECORD["videos"],
               "messages": LONG_RECORD["messages"][:-1], "chosen": "The circle and the ball.",
               "rejected": "Only the blue square, which has four sides."}
"""A preference pair on the long record: its prompt (images, video, 3 turns) and two last replies."""
DPO_2 = [("qwen2_vl", "lora_vision", True)]
"""DPO (sigmoid loss, reference = adapters off, merger swapped back) on 2 ranks, with gradient checkpointing."""
DPO_BETA = 0.1
CASES_2 = [("qwen2_vl", "lora_vision", True), ("qwen2_5_vl", "lora", False), ("qwen3_vl", "full", True),
           ("qwen3_vl_moe", "lora", False)]
"""(family, mode, gradient checkpointing): every family that supports it, every mode, both checkpointing settings."""
PACKED_2 = [("qwen3_vl", "lora_vision", True)]
"""Packed: Qwen3-VL (timestamps, deepstack features placed per record) with gradient checkpointing."""
CASES_4 = [("qwen2_vl", "lora_vision", False), ("qwen3_vl", "full", True)]
BACKSTOP_S = 900  # a hung collective fails the test (the whole process group is killed) instead of the suite


def items_of(pipeline, family: str, tmp_path, rows: int) -> list[dict]:
    """The dataset items of the long record (and, for 2 rows, a short text record)."""
    from vlmtune.data.dataset import VisionLanguageDataset
    from vlmtune.data.records import load_records

    p = pipeline(family)
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps([LONG_RECORD, SHORT_RECORD][:rows]))
    records = load_records(path, EXAMPLES, budget=p.budget, min_image_side=p.family.factor)
    dataset = VisionLanguageDataset(records, p.processor, p.family, p.budget, p.conversation)
    return [dataset[i] for i in range(rows)]


def batch_of(pipeline, family: str, tmp_path, rows: int):
    """The collated batch of the long record (and, for 2 rows, a short text record padded to its length)."""
    from vlmtune.data.collator import Collator

    return Collator(pipeline(family).processor.tokenizer.pad_token_id)(items_of(pipeline, family, tmp_path, rows))


def packed_of(pipeline, family: str, tmp_path) -> tuple[dict, list[dict]]:
    """One packed row, the short text record then the long one (``--packing``'s collator), and each record's
    own unpacked batch (the reference runs those one by one)."""
    from transformers import AutoConfig

    from vlmtune.data.collator import Collator
    from vlmtune.data.packing import PackedCollator, RopeIndex

    p = pipeline(family)
    long, short = items_of(pipeline, family, tmp_path, 2)
    pad = p.processor.tokenizer.pad_token_id
    packed = PackedCollator(pad, RopeIndex(AutoConfig.from_pretrained(p.model_dir)))
    return packed([[short, long]]), [Collator(pad)([item]) for item in (short, long)]


def pair_batch(pipeline, family: str, tmp_path) -> dict:
    """The collated preference batch of ``PAIR_RECORD`` (chosen row, then rejected; the reply labelled)."""
    from vlmtune.data.prompts import PreferenceCollator, PreferenceDataset, stage_lengths
    from vlmtune.data.records import load_records

    p = pipeline(family, "last_assistant")
    path = tmp_path / f"{family}-pair.json"
    path.write_text(json.dumps([PAIR_RECORD]))
    records = load_records(path, EXAMPLES, budget=p.budget, min_image_side=p.family.factor, stage="dpo")
    lengths = stage_lengths(records, p.conversation, p.budget, p.family, "dpo")[0]
    dataset = PreferenceDataset(records, p.processor, p.family, p.budget, p.conversation, None, False, lengths)
    return PreferenceCollator(p.processor.tokenizer.pad_token_id)([dataset[0]])


def dpo_reference(case: dict, batch: dict) -> dict:
    """DPO's single-process step by hand: the model's own forward, log-softmax, the labelled next tokens'
    log-probs gathered and summed per row, under the policy and (no gradient) with PEFT's adapters off; then
    -log sigmoid(beta * (policy margin - reference margin))."""
    sys.path.insert(0, str(ROOT / "tests"))
    from sp_worker import build

    model, _ = build(case)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "pair_index")}
    targets = batch["labels"][:, 1:]
    keep = targets != -100

    def sums(logits):
        picked = logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return (picked * keep).sum(-1)

    with torch.no_grad(), model.disable_adapter():
        ref_chosen, ref_rejected = sums(model(**inputs, use_cache=False).logits)
    chosen, rejected = sums(model(**inputs, use_cache=False).logits)
    loss = -torch.nn.functional.logsigmoid(DPO_BETA * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()
             if p.requires_grad}
    return {"loss": float(loss.detach()), "grads": grads}


def reference(case: dict, batch: dict | list) -> dict:
    """The single-process run: transformers' own forward and loss on the whole batch, in this process. For a
    packed case, each record unpacked on its own, their mean losses weighted by their target counts (by hand:
    the packed row's token mean)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from sp_worker import build

    model, _ = build(case)
    if isinstance(batch, list):
        counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batch]
        losses = [model(**b, use_cache=False).loss for b in batch]
        loss = sum(part * n for part, n in zip(losses, counts)) / sum(counts)
    else:
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()
             if p.requires_grad}
    return {"loss": float(loss.detach()), "grads": grads}


def launch(world: int, spec: dict, tmp_path) -> dict:
    """``world`` worker ranks (forked by tests/forkrun.py) on one spec; their process group is killed at the
    backstop."""
    spec_path, out_path = tmp_path / f"spec{world}.pt", tmp_path / f"out{world}.pt"
    torch.save(spec, spec_path)
    cmd = [*FORKRUN, "--nproc_per_node", str(world), "--master_port", str(free_port()),
           str(ROOT / "tests" / "sp_worker.py"), str(spec_path), str(out_path)]
    run_launch(cmd)
    return torch.load(out_path, weights_only=False)


def run_launch(cmd: list[str], env: dict | None = None) -> str:
    """Run a launch command in its own process group (killed at the backstop), with ``env`` added to the
    environment; its output, checked for exit 0. The launcher is forked from the tests' fork server
    (tests/forkserver.py) where its environment allows: one thread per rank, and the ranks import the vlmtune this
    test imported (PYTHONPATH is added only where the installed one is another)."""
    import vlmtune

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if Path(vlmtune.__file__).resolve().parent != ROOT / "vlmtune":
        env["PYTHONPATH"] = str(ROOT)
    proc = forkserver.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        log = proc.communicate(timeout=BACKSTOP_S)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-4000:]
    return log


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check_cases(world: int, cases: list, pipeline, tiny_model_dir, tmp_path, rows: int = 1, packed=(),
                dpo=()) -> dict:
    """Every case (and every ``packed`` case: one packed row against its records unpacked; every ``dpo`` case:
    a preference pair's DPO loss against ``dpo_reference``) on ``world`` ranks."""
    specs = [{"name": f"{f}-{m}-{'gc' if gc else 'nogc'}", "family": f, "batch": f, "mode": m, "checkpointing": gc,
              "model_dir": str(tiny_model_dir(f))} for f, m, gc in cases]
    specs += [{"name": f"{f}-{m}-{'gc' if gc else 'nogc'}-packed", "family": f, "batch": f"{f}-packed", "mode": m,
               "checkpointing": gc, "model_dir": str(tiny_model_dir(f))} for f, m, gc in packed]
    specs += [{"name": f"{f}-{m}-{'gc' if gc else 'nogc'}-dpo", "family": f, "batch": f"{f}-dpo", "mode": m,
               "checkpointing": gc, "model_dir": str(tiny_model_dir(f)), "dpo_beta": DPO_BETA} for f, m, gc in dpo]
    batches = {f: batch_of(pipeline, f, tmp_path, rows) for f in {c["family"] for c in specs}}
    for f, _, _ in dpo:
        batches[f"{f}-dpo"] = pair_batch(pipeline, f, tmp_path)
    unpacked = {}
    for f, _, _ in packed:
        batches[f"{f}-packed"], unpacked[f"{f}-packed"] = packed_of(pipeline, f, tmp_path)
    got = launch(world, {"cases": specs, "batches": batches}, tmp_path)
    worst = {}
    for case in specs:
        batch = unpacked.get(case["batch"], batches[case["batch"]])
        want, sp = dpo_reference(case, batch) if "dpo_beta" in case else reference(case, batch), got[case["name"]]
        assert set(sp["grads"]) == set(want["grads"]) and want["grads"]
        diffs = {name: relative(sp["grads"][name], g) for name, g in want["grads"].items()}
        loss_diff = abs(sp["loss"] - want["loss"]) / abs(want["loss"])
        worst[case["name"]] = (loss_diff, max(diffs.values()))
        assert loss_diff < 1e-5, (case["name"], sp["loss"], want["loss"])
        bad = {n: d for n, d in diffs.items() if not d < 1e-5}
        assert not bad, (case["name"], bad)
    print(f"SP {world}: worst relative differences (loss, gradient):", worst)
    return worst


@pytest.mark.slow
def test_two_ranks_equal_one_process(pipeline, tiny_model_dir, tmp_path):
    """2 ranks on the long record, Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE in full, lora and
    lora_vision, with and without gradient checkpointing; and a packed row (a short text record, then the long
    one, which spans both ranks) against the two records run unpacked: no token attends across the boundary;
    and DPO on a preference pair of the long record (policy and reference log-probs summed over the group)."""
    check_cases(2, CASES_2, pipeline, tiny_model_dir, tmp_path, packed=PACKED_2, dpo=DPO_2)


@pytest.mark.slow
def test_four_ranks_equal_one_process_on_a_padded_batch(pipeline, tiny_model_dir, tmp_path):
    """4 ranks (more ranks than key/value heads: Ulysses replicates them) on a 2-row batch: the long record and
    a short text one right-padded to its length."""
    check_cases(4, CASES_4, pipeline, tiny_model_dir, tmp_path, rows=2)


@pytest.mark.parametrize("size, world, family, flags, needle", [
    (2, 3, "qwen2_vl", {}, "the 3 processes of this run do not split into groups of 2"),
    (3, 6, "qwen2_vl", {}, "has 4 attention heads, which 3 does not divide"),
    (2, 2, "qwen3_5", {}, "linear-attention (Gated DeltaNet) layers carry a recurrent state"),
    (2, 2, "qwen2_vl", {"packing": True, "attn_implementation": "flash_attention_2"}, "block mask built for sdpa"),
    (2, 2, "qwen2_vl", {"engine": "--fsdp"}, "runs under DDP or DeepSpeed"),
    (2, 2, "qwen2_vl", {"attn_implementation": "eager"}, "--attn_implementation eager"),
])
def test_sizes_and_setups_it_cannot_run_stop_in_one_line(tiny_model_dir, size, world, family, flags, needle):
    from transformers import AutoConfig

    from vlmtune.errors import ConfigError
    from vlmtune.model import sequence_parallel as sp

    config = AutoConfig.from_pretrained(tiny_model_dir(family))
    with pytest.raises(ConfigError) as caught:
        sp.check(size, world, config, family, **flags)
    assert needle in str(caught.value) and "\n" not in str(caught.value)
    sp.check(1, world, config, family, **flags)  # size 1 is off: nothing to check


def test_key_value_heads_must_divide_or_be_divided(tiny_model_dir):
    from transformers import AutoConfig

    from vlmtune.errors import ConfigError
    from vlmtune.model import sequence_parallel as sp

    config = AutoConfig.from_pretrained(tiny_model_dir("qwen2_vl"))
    config.get_text_config().num_attention_heads, config.get_text_config().num_key_value_heads = 12, 8
    with pytest.raises(ConfigError, match="has 8 key/value heads"):
        sp.check(6, 6, config, "qwen2_vl")
    sp.check(4, 4, config, "qwen2_vl")  # 8 kv heads over 4 ranks: 2 each


def test_a_batch_shorter_than_the_group_is_named():
    from vlmtune.errors import RecordError
    from vlmtune.model import sequence_parallel as sp

    group = sp.Group(size=4, rank=0, process_group=None)
    with pytest.raises(RecordError, match=r"a batch of 3 tokens \(rec_7\) is shorter than the group"):
        sp.local_targets(torch.tensor([[1, 2, 3]]), group, ["rec_7"])


def test_labels_are_shifted_before_the_split():
    """By hand: labels 0..6 (7 tokens) over 4 ranks pad to 8; the targets are labels[1:] then -100 padding, and
    rank r holds targets 2r, 2r+1: the first rank's last target is the second rank's first label."""
    from vlmtune.model import sequence_parallel as sp

    labels = torch.tensor([[10, 11, 12, 13, 14, 15, 16]])
    got = [sp.local_targets(labels, sp.Group(4, r, None)).tolist() for r in range(4)]
    assert got == [[[11, 12]], [[13, 14]], [[15, 16]], [[-100, -100]]]


def test_the_cli_refuses_the_flag_where_it_cannot_run(capsys, tiny_model_dir):
    """One process cannot form a group of 2 (train, dpo); GRPO, distill and the reward model refuse the flag,
    and so does DPO's precomputed reference; all before a model loads."""
    from vlmtune.cli import main

    prefs = EXAMPLES / "preference.json"
    base = ["--image_folder", str(EXAMPLES), "--use_cpu", "True", "--sequence_parallel_size", "2", "--output_dir",
            "/tmp/never-sp", "--data_path"]
    for argv, needle in [
        (["train", *base, str(DATA_JSON)], "vlmtune train: error: --sequence_parallel_size 2: the 1 processes"),
        (["dpo", *base, str(prefs)], "vlmtune dpo: error: --sequence_parallel_size 2: the 1 processes"),
        (["dpo", *base, str(prefs), "--precompute_ref_log_probs", "True"],
         "vlmtune dpo: error: --sequence_parallel_size 2 with --precompute_ref_log_probs: "),
        (["grpo", *base, str(prefs)], "vlmtune grpo: error: --sequence_parallel_size 2 with grpo: sequence "
         "parallelism is wired for SFT and DPO only (its sampling"),
        (["reward-model", *base, str(prefs)], "vlmtune reward-model: error: --sequence_parallel_size 2 with "
         "reward_model: sequence parallelism is wired for SFT and DPO only (its score head"),
        (["distill", *base, str(DATA_JSON), "--teacher", str(tiny_model_dir("qwen2_vl"))],
         "vlmtune distill: error: --sequence_parallel_size 2 with distill: sequence parallelism is wired for SFT "
         "and DPO only (its teacher"),
    ]:
        assert main(argv) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith(needle) and "unexpected" not in lines[-1], (argv[0], lines[-3:])


def train_flags(out, *args: str, stage: str = "train", data=DATA_JSON) -> list[str]:
    return [stage, "--data_path", str(data), "--image_folder", str(EXAMPLES), "--use_cpu", "True",
            "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1", "--output_dir", str(out),
            "--train_sampling_strategy", "sequential", "--learning_rate", "2e-3", "--lr_scheduler_type", "constant",
            "--dataloader_num_workers", "0", "--lora_dropout", "0", "--mode", "lora_vision", "--max_steps", "2",
            "--save_strategy", "no", "--gradient_checkpointing", "True", "--val_ratio", "0.2",
            "--eval_strategy", "steps", "--eval_steps", "2", "--per_device_eval_batch_size", "1",
            "--gradient_accumulation_steps", "2", *args]


def logged(out, key: str) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]


@pytest.mark.slow
def test_training_with_the_flag_under_zero3_gives_the_single_process_step(tmp_path):
    """``vlmtune train --sequence_parallel_size 2 --deepspeed scripts/zero3.json`` on 2 processes (a record per
    process and micro-step, each split across both; 2 accumulation steps) logs the training and eval losses and
    the gradient norm of one process without DeepSpeed training on both records per micro-step (the same 4
    records per optimizer step, every target weighted once), and saves the same trained weights (SGD: the step
    is linear in the gradients). ZeRO-3 averages the gradients over both processes, which the group's loss
    scale counts on: a wrong scale changes the gradient norm, a wrong gradient the weights."""
    same_losses(tmp_path, ("loss", "eval_loss", "grad_norm"), "--optim", "sgd",
                engine=("--deepspeed", str(ROOT / "scripts" / "zero3.json")))
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        one, sp = load_file(tmp_path / "one" / name), load_file(tmp_path / "sp" / name)
        assert set(sp) == set(one) and one
        diffs = {key: relative(sp[key], value) for key, value in one.items()}
        print(f"{name}: worst relative weight difference {max(diffs.values()):.2e}")
        assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda item: -item[1])[:3]


def same_losses(tmp_path, keys, *args: str, engine: tuple[str, ...] = (), **flags) -> None:
    """One process with 2 records per micro-step, then 2 processes with 1 each and ``--sequence_parallel_size
    2`` (and ``engine``'s flags): each logged ``keys`` equal within 1e-5 relative."""
    from vlmtune.cli import main

    assert main(train_flags(tmp_path / "one", "--per_device_train_batch_size", "2", *args, **flags)) == 0
    cmd = [*FORKRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "vlmtune.cli",
           *train_flags(tmp_path / "sp", "--per_device_train_batch_size", "1", "--sequence_parallel_size", "2",
                        *args, *engine, **flags)]
    log = run_launch(cmd, {"FORKRUN_CHECK_GROUPS": "1"})  # and no process group left after the command
    assert "sequence parallel: groups of 2 processes" in log
    for key in keys:
        one, sp = logged(tmp_path / "one", key), logged(tmp_path / "sp", key)
        assert len(sp) == len(one) > 0 and sp == pytest.approx(one, rel=1e-5), (key, sp, one)
        print(f"{key}: one process {one}, SP 2 {sp}")


@pytest.mark.slow
def test_dpo_with_the_flag_gives_the_single_process_losses(tmp_path):
    """``vlmtune dpo --sequence_parallel_size 2`` (lora_vision: the reference is the model with its adapters off
    and the merger swapped back, split as the policy) on 2 processes, a pair per process and micro-step, logs the
    DPO loss, eval loss and replies' log-probs of one process training on both pairs per micro-step (the second
    step's loss: after the first step's update)."""
    same_losses(tmp_path, ("loss", "eval_loss", "logps/chosen", "eval_logps/rejected"), stage="dpo",
                data=EXAMPLES / "preference.json")


def test_estimate_memory_splits_the_decoder_and_the_logits_not_the_vision_tower():
    """The activations (checkpointed: linear in the tokens) and the logits of one GPU hold ceil(S / N) of a
    sample's S tokens; the vision row is the same on every GPU of the group; the table says so."""
    from vlmtune.memory.estimate import estimate
    from vlmtune.memory.shapes import Setup

    def run(n: int):
        return estimate("Qwen/Qwen2.5-VL-7B-Instruct", Setup(gpus=4, sequence_parallel_size=n, seq_len=2048,
                                                              videos=1, video_frames=240,
                                                              gradient_checkpointing=True))

    one = run(1)
    total = 2048 + 23296  # 240 frames -> 120 temporal pairs x (360 x 420 px / 28^2 = 192 tokens) + the text
    for n in (2, 4):
        split = run(n)
        share = -(-total // n) / total
        assert split.bytes("activations") == pytest.approx(one.bytes("activations") * share, rel=1e-9)
        assert split.bytes("logits + loss") == pytest.approx(one.bytes("logits + loss") * share, rel=1e-9)
        assert split.bytes("vision") == one.bytes("vision") and split.bytes("weights") == one.bytes("weights")
        assert f"sequence parallel over {n}" in split.table() and f"1/{n} of each sample's" in split.table()
