"""``vlmtune sample`` (rejection sampling): best-of-N and the threshold against rewards computed here on the written
replies, a resume after a kill at a point in code, the output passing check-data and training, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES

GRPO_JSON = EXAMPLES / "grpo.json"
PROMPTS = 4  # the first four prompts: three with an image, one text-only
N = 4
REWARDS = '''
def vowels(completions, **kwargs):
    return [float(sum(ch in "aeiou" for ch in c)) for c in completions]


def length(completions, answer, **kwargs):
    return [len(c) / 10 + (str(answer) in c) for c in completions]
'''


def reward_by_hand(reply: str, answer) -> dict[str, float]:
    """The two test rewards, written out again, and their sum at the weights 1 and 0.5."""
    vowels = float(sum(ch in "aeiou" for ch in reply))
    length = len(reply) / 10 + (str(answer) in reply)
    return {"vowels": vowels, "length": length, "total": vowels + 0.5 * length}


def sample_argv(model: Path, folder: Path, output: str, *extra: str) -> list[str]:
    rewards = folder / "rewards.py"
    return ["--model", str(model), "--data", str(GRPO_JSON), "--limit", str(PROMPTS), "--output", str(folder / output),
            "--num_samples", str(N), "--max_new_tokens", "6", "--seed", "3",
            "--reward_funcs", f"{rewards}:vowels", f"{rewards}:length", "--reward_weights", "1", "0.5", *extra]


@pytest.fixture(scope="module")
def sampled(tiny_model_dir, tmp_path_factory):
    """One uninterrupted best-of-4 run over the first four prompts."""
    from vlmtune.sample import main

    folder = tmp_path_factory.mktemp("sample")
    (folder / "rewards.py").write_text(REWARDS)
    model = tiny_model_dir("qwen2_vl")
    assert main(sample_argv(model, folder, "best.json")) == 0
    return model, folder


def samples_of(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert "vlmtune_sample" in lines[0]
    return lines[1:]


def test_best_of_n_is_the_top_reply_by_the_rewards_computed_here(sampled):
    _, folder = sampled
    prompts = json.loads(GRPO_JSON.read_text())[:PROMPTS]
    lines = samples_of(folder / "best.samples.jsonl")
    assert [line["position"] for line in lines] == list(range(PROMPTS))
    assert any(len(set(line["replies"])) > 1 for line in lines)  # sampled, not greedy
    written = {r["id"]: r for r in json.loads((folder / "best.json").read_text())}
    for prompt, line in zip(prompts, lines):
        by_hand = [reward_by_hand(reply, prompt["answer"]) for reply in line["replies"]]
        assert line["scores"] == pytest.approx([s["total"] for s in by_hand])
        best = max((k for k, r in enumerate(line["replies"]) if r), key=lambda k: (by_hand[k]["total"], -k))
        record = written[prompt["id"]]
        assert record["conversations"][:-1] == prompt["conversations"]
        assert record["conversations"][-1] == {"from": "gpt", "value": line["replies"][best]}
        assert record["score"] == pytest.approx(by_hand[best]["total"])
        assert record["rewards"] == pytest.approx({"vowels": by_hand[best]["vowels"],
                                                   "length": by_hand[best]["length"]})
        if "image" in prompt:  # outside the output's folder: absolute
            assert Path(record["image"]) == (EXAMPLES / prompt["image"]).resolve()
    assert len(written) == PROMPTS


def test_threshold_keeps_exactly_the_replies_scoring_at_least_it(sampled, capsys):
    """Selected again from the samples file (nothing sampled), written as JSON lines."""
    from vlmtune.sample import main

    model, folder = sampled
    prompts = json.loads(GRPO_JSON.read_text())[:PROMPTS]
    lines = samples_of(folder / "best.samples.jsonl")
    totals = sorted(reward_by_hand(r, p["answer"])["total"] for p, line in zip(prompts, lines) for r in line["replies"])
    threshold = totals[len(totals) // 2]
    assert main(sample_argv(model, folder, "best.jsonl", "--keep", "all", "--min_score", str(threshold))) == 0
    want = {(f"{p['id']}-{k}", reply) for p, line in zip(prompts, lines) for k, reply in enumerate(line["replies"])
            if reply and reward_by_hand(reply, p["answer"])["total"] >= threshold}
    rows = [json.loads(line) for line in (folder / "best.jsonl").read_text().splitlines()]
    assert {(r["id"], r["conversations"][-1]["value"]) for r in rows} == want
    assert all(r["score"] >= threshold for r in rows)
    summary = json.loads((folder / "best.summary.json").read_text())
    assert summary["prompts_sampled_now"] == 0 and summary["records_written"] == len(want)
    kept_prompts = {rid.rsplit("-", 1)[0] for rid, _ in want}
    assert summary["prompts_without_a_kept_reply"] == PROMPTS - len(kept_prompts)

    too_high = str(totals[-1] + 1)  # no reply scores that much: one line with the counts, nothing written
    from vlmtune.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["sample", *sample_argv(model, folder, "best.parquet", "--min_score", too_high)]) == 1
    assert f"none of the {PROMPTS * N} replies to {PROMPTS} prompts" in one_line(capsys.readouterr().err)
    assert not (folder / "best.parquet").exists()


def one_line(err: str) -> str:
    """vlmtune's error: one line, the last (transformers' loading bar may come before it)."""
    ours = [line for line in err.strip().splitlines() if line.startswith("vlmtune")]
    assert len(ours) == 1 and err.strip().endswith(ours[0]), err
    return ours[0]


def test_a_killed_run_resumes_without_duplicates_and_writes_what_an_uninterrupted_one_does(sampled, monkeypatch):
    """Killed while writing the third prompt's line (half of it reaches the file), then run again: only the last
    two prompts are sampled, and the records and samples equal the uninterrupted run's (same seed)."""
    import vlmtune.sample as sample

    model, folder = sampled
    write = sample.append_line
    lines_written = []

    def dies_on_the_third_prompt(handle, line):
        if "position" in line and len(lines_written) == 2:
            text = json.dumps(line)
            handle.write(text[: len(text) // 2])
            handle.flush()
            raise RuntimeError("killed")
        write(handle, line)
        if "position" in line:
            lines_written.append(line)

    monkeypatch.setattr(sample, "append_line", dies_on_the_third_prompt)
    with pytest.raises(RuntimeError, match="killed"):
        sample.main(sample_argv(model, folder, "resumed.json"))
    assert not (folder / "resumed.json").exists()
    monkeypatch.setattr(sample, "append_line", write)

    calls = []
    original = sample.Sampler.sample
    monkeypatch.setattr(sample.Sampler, "sample", lambda self, record, position: calls.append(position) or
                        original(self, record, position))
    assert sample.main(sample_argv(model, folder, "resumed.json")) == 0
    assert calls == [2, 3]
    assert samples_of(folder / "resumed.samples.jsonl") == samples_of(folder / "best.samples.jsonl")
    assert json.loads((folder / "resumed.json").read_text()) == json.loads((folder / "best.json").read_text())


def test_the_output_passes_check_data_and_trains(sampled, tmp_path):
    from vlmtune.cli import main

    model, folder = sampled
    assert main(["check-data", str(folder / "best.json"), "--model", str(model)]) == 0
    out = tmp_path / "sft"
    assert main(["train", "--model_name_or_path", str(model), "--data_path", str(folder / "best.json"),
                 "--output_dir", str(out), "--use_cpu", "True", "--max_steps", "1", "--report_to", "none",
                 "--save_strategy", "no", "--disable_tqdm", "True"]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--num_samples", "0"], "--num_samples must be at least 1, got 0"),
    (["--min_score", "nan"], "--min_score must be a finite number"),
    (["--keep", "some"], "argument --keep: invalid choice"),
])
def test_bad_flags_are_one_line(sampled, capsys, extra, fragment):
    from vlmtune.cli import main

    model, folder = sampled
    try:
        code = main(["sample", *sample_argv(model, folder, "bad.json"), *extra])
    except SystemExit as exc:  # argparse: its usage, then the error on one line
        code = exc.code
        assert code == 2 and fragment in capsys.readouterr().err.strip().splitlines()[-1]
    else:
        assert code == 1 and fragment in one_line(capsys.readouterr().err)
    assert not (folder / "bad.json").exists()


@pytest.mark.parametrize(("case", "fragment"), [
    ("no_reward", "no reward: give --reward_funcs"),
    ("output_is_input", "is the input --data"),
    ("output_folder", "is a folder"),
    ("output_suffix", "name it .json"),
    ("no_data", "does not exist"),
    ("weights", "1 --reward_weights for 2 --reward_funcs"),
])
def test_bad_input_stops_before_the_model_loads(tmp_path, capsys, case, fragment):
    from vlmtune.cli import main

    argv = ["sample", "--model", str(tmp_path / "no-model"), "--data", str(GRPO_JSON), "--output",
            str(tmp_path / "out.json"), "--reward_funcs", "exact_match"]
    if case == "no_reward":
        argv = argv[:-2]
    elif case == "output_is_input":
        argv[argv.index("--output") + 1] = str(GRPO_JSON)
    elif case == "output_folder":
        argv[argv.index("--output") + 1] = str(tmp_path)
    elif case == "output_suffix":
        argv[argv.index("--output") + 1] = str(tmp_path / "out.txt")
    elif case == "no_data":
        argv[argv.index("--data") + 1] = str(tmp_path / "missing.json")
    else:
        argv += ["format", "--reward_weights", "1"]
    assert main(argv) == 1
    assert fragment in one_line(capsys.readouterr().err)


def test_other_settings_on_an_existing_samples_file_stop_in_one_line(sampled, capsys):
    from vlmtune.cli import main

    model, folder = sampled
    argv = sample_argv(model, folder, "best.json")
    argv[argv.index("--num_samples") + 1] = "2"
    assert main(["sample", *argv]) == 1
    assert "holds samples drawn with other settings (num_samples 4 then, 2 now)" in one_line(capsys.readouterr().err)


def test_a_reward_model_scores_each_reply_as_an_independent_forward_does(sampled, tmp_path):
    """--reward_model alone: each reply's reward is the head on the final hidden state at the reply's last token,
    with the prompt rendered here by the processor's own chat template and the sampled tokens appended."""
    import shutil

    from safetensors.torch import save_file
    from test_stages import processor_ids
    from transformers import AutoModelForImageTextToText

    from vlmtune.data import media
    from vlmtune.model.load import load_family, load_processor
    from vlmtune.sample import main

    model, _ = sampled
    reward_dir = tmp_path / "reward_model"
    shutil.copytree(model, reward_dir)
    head = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    save_file({"score.weight": head}, str(reward_dir / "reward_head.safetensors"), metadata={"format": "pt"})
    argv = ["--model", str(model), "--data", str(GRPO_JSON), "--limit", "2", "--output", str(tmp_path / "rm.json"),
            "--num_samples", "2", "--max_new_tokens", "4", "--reward_model", str(reward_dir)]
    assert main(argv) == 0

    processor = load_processor(str(model))
    budget = media.budget_from_processor(processor, load_family(str(model)).factor)
    body = AutoModelForImageTextToText.from_pretrained(reward_dir).eval()
    for prompt, line in zip(json.loads(GRPO_JSON.read_text()), samples_of(tmp_path / "rm.samples.jsonl")):
        inputs = processor_ids(processor, budget, prompt, None)
        for tokens, value, total in zip(line["tokens"], line["rewards"]["reward_model"], line["scores"]):
            extra = torch.tensor([tokens])
            row = {**inputs, "input_ids": torch.cat([inputs["input_ids"], extra], 1),
                   "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + len(tokens), dtype=torch.long),
                   "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)}
            with torch.no_grad():
                hidden = body.model(**row).last_hidden_state[0, -1]
            assert value == pytest.approx(float(hidden @ head[0]), abs=1e-4)
            assert total == value
