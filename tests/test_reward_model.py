"""Reward models: the Bradley-Terry loss against an independent forward, the head's files, learning on CPU, merge,
and a GRPO run whose only reward is the trained reward model."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import EXAMPLES
from test_stages import (
    GRPO_JSON,
    MIXED_PAIRS,
    PREFS,
    PYTHON,
    fresh_model,
    history,
    mean,
    perturb,
    preference_dataset,
    processor_ids,
    run,
    stage_cli,
    train_args,
)

from vlmtune.config import ModeArguments
from vlmtune.data import media


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from vlmtune.model.load import load_family, load_processor

    path = tiny_model_dir("qwen2_vl")
    processor = load_processor(str(path))
    family = load_family(str(path))
    return path, processor, family, media.budget_from_processor(processor, family.factor)


def independent_reward(model, processor, budget, record: dict, reply: str) -> float:
    """The head applied by hand to the final hidden state (the inner model's own output) at the reply's
    <|im_end|>, the ids and pixels coming from the processor's own chat template."""
    prompt_len = len(processor_ids(processor, budget, record, None)["input_ids"][0])
    full = processor_ids(processor, budget, record, reply)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    at = prompt_len + full["input_ids"][0][prompt_len:].tolist().index(im_end)
    inner = model.get_base_model()
    with torch.no_grad():
        hidden = inner.model(**full).last_hidden_state[0, at]
    return float(hidden.float() @ inner.score.weight[0].detach().float())


def test_bradley_terry_loss_equals_one_from_independent_forwards(tiny, tmp_path):
    """One mixed batch (image, video, text, multi-turn pairs in one forward): the trainer's loss is the mean of
    -log sigmoid(r_chosen - r_rejected) with rewards from plain forwards here; pair accuracy and margins too."""
    from trl.trainer.utils import disable_dropout_in_model

    from vlmtune.data.prompts import PreferenceCollator
    from vlmtune.model import modes, reward
    from vlmtune.stages.reward_model import RewardTrainer

    path, processor, family, budget = tiny
    raw = {r["id"]: r for r in json.loads(PREFS.read_text())}
    dataset = preference_dataset(tiny, MIXED_PAIRS)
    args = ModeArguments(mode="lora", lora_rank=8)
    model = modes.apply_plan(fresh_model(path), family, modes.plan_from_args(args), args)
    reward.attach_head(model, std=1.0, seed=1)
    disable_dropout_in_model(model)  # as the stage does: both rows of a pair under one network
    perturb(model, "lora_B", 0.05, 1)
    assert model.get_base_model().score.weight.requires_grad

    want = {(r.id, key): independent_reward(model, processor, budget, raw[r.id], getattr(r, key))
            for r in dataset.records for key in ("chosen", "rejected")}
    ids = [r.id for r in dataset.records]
    margins = [want[i, "chosen"] - want[i, "rejected"] for i in ids]
    assert len(set(m > 0 for m in margins)) == 2, margins  # the check below sees both outcomes

    batch = PreferenceCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    trainer = RewardTrainer(model=model, args=train_args(tmp_path), train_dataset=dataset,
                            data_collator=PreferenceCollator(processor.tokenizer.pad_token_id),
                            processing_class=processor, family=family, run_info={})
    loss = trainer.compute_loss(model, dict(batch))
    expected = mean(-math.log(1 / (1 + math.exp(-m))) for m in margins)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    loss.backward()
    assert model.get_base_model().score.weight.grad.abs().sum() > 0
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["rewards/margins"] == pytest.approx(mean(margins), abs=1e-4)
    assert logged["rewards/accuracies"] == pytest.approx(mean(m > 0 for m in margins))


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """A LoRA reward model trained on the example pairs (image, video, text), eval on the same file, merged."""
    folder = tmp_path_factory.mktemp("reward_model")
    out = folder / "rm"
    run(stage_cli("reward-model", "--data_path", str(PREFS), "--eval_data_path", str(PREFS), "--output_dir",
                  str(out), "--max_steps", "10", "--per_device_train_batch_size", "5", "--learning_rate", "1e-2",
                  "--lora_rank", "16", "--lora_alpha", "32", "--lr_scheduler_type", "constant", "--seed", "0",
                  "--eval_strategy", "steps", "--eval_steps", "5", "--save_steps", "5"))
    run([PYTHON, "-m", "vlmtune.cli", "merge", str(out), str(folder / "merged")])
    return out, folder / "merged"


@pytest.mark.slow
def test_reward_model_learns_saves_its_head_and_merges(reward_run):
    from safetensors.torch import load_file

    out, merged = reward_run
    accuracies = history(out, "rewards/accuracies")  # measured: 0.3-0.5 over steps 1-3, 1.0 over steps 8-10
    assert sorted(accuracies) == list(range(1, 11))
    assert mean(accuracies[s] for s in (8, 9, 10)) > mean(accuracies[s] for s in (1, 2, 3)) + 0.2, accuracies
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [e["eval_rewards/accuracies"] for e in state["log_history"] if "eval_rewards/accuracies" in e]
    assert len(evals) == 2 and evals[-1] >= 0.8, evals
    assert json.loads((out / "vlmtune_run.json").read_text())["stage"] == "reward_model"
    head = load_file(str(out / "reward_head.safetensors"))
    assert list(head) == ["score.weight"] and head["score.weight"].shape[0] == 1
    assert torch.equal(load_file(str(merged / "reward_head.safetensors"))["score.weight"], head["score.weight"])
    for folder in (out, out / "checkpoint-5", merged):  # the body's files never hold the head
        for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors", "model.safetensors"):
            if (folder / name).is_file():
                assert not any(k.endswith("score.weight") for k in load_file(str(folder / name))), folder / name
    assert (out / "checkpoint-5" / "reward_head.safetensors").is_file()
    assert (out / "plots" / "run.png").is_file()


@pytest.mark.slow
def test_grpo_with_the_reward_model_as_only_reward_raises_it(reward_run, tmp_path):
    """One-token completions scored by the merged reward model alone: its mean score rises."""
    _, merged = reward_run
    out = tmp_path / "grpo"
    run(stage_cli("grpo", "--data_path", str(GRPO_JSON), "--output_dir", str(out), "--max_steps", "12",
                  "--per_device_train_batch_size", "3", "--learning_rate", "1e-2", "--lora_rank", "16",
                  "--lora_alpha", "32", "--lr_scheduler_type", "constant", "--max_completion_length", "1",
                  "--num_generations", "16", "--reward_model", str(merged), "--seed", "3", "--save_strategy", "no"))
    rewards = history(out, "reward")
    assert sorted(rewards) == list(range(1, 13))
    assert history(out, "rewards/reward_model/mean") == rewards  # the only reward
    assert mean(rewards[s] for s in range(9, 13)) > mean(rewards[s] for s in range(1, 5)) + 0.3, rewards


def test_reward_model_bad_input_is_one_line(tiny, tmp_path, capsys):
    """A folder without a head as --reward_model, a missing folder, --packing, no data, and no reward at all:
    each stops with one line naming the flag, before any model loads."""
    from vlmtune.cli import main
    from vlmtune.errors import ConfigError
    from vlmtune.stage_config import GRPOArguments

    path = tiny[0]
    cases = [
        (["grpo", "--data_path", str(GRPO_JSON), "--reward_model", str(path)],
         f"--reward_model {path} is not a reward model: it has no reward_head.safetensors"),
        (["grpo", "--data_path", str(GRPO_JSON), "--reward_model", str(tmp_path / "nope")],
         f"--reward_model {tmp_path / 'nope'} does not exist"),
        (["reward-model", "--data_path", str(PREFS), "--packing", "True"], "--packing is for SFT"),
        (["reward-model"], "--data_path is required"),
    ]
    for argv, fragment in cases:
        code = main([argv[0], "--model_name_or_path", str(path), "--use_cpu", "True", "--report_to", "none",
                     "--output_dir", str(tmp_path / "out"), "--image_folder", str(EXAMPLES), *argv[1:]])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlmtune ")]
        assert code == 1 and len(err) == 1 and fragment in err[0], (argv, err)
    with pytest.raises(ConfigError, match="no reward: give --reward_funcs, --reward_model or both"):
        GRPOArguments(reward_funcs=[])


@pytest.mark.slow
def test_merged_qwen3_5_reward_model_is_a_sequence_classification_folder(tiny_model_dir, tmp_path):
    """A Qwen3.5 reward-model run (adapters + head, written here in-process) merges into transformers'
    Qwen3_5ForSequenceClassification layout: that class loads it with every key matched, its own forward's
    ``logits`` equal the run folder's rewards (base + adapters + head, as grpo / sample score), and vlmtune's
    reward-model loader gives the same rewards on both folders."""
    import transformers
    from safetensors.torch import load_file

    from vlmtune.errors import ConfigError
    from vlmtune.merge import merge
    from vlmtune.model import modes, reward
    from vlmtune.model.load import load_family, load_processor
    from vlmtune.run import load_for_inference, run_record, save_run_files
    from vlmtune.scoring import load_reward_model, score_rows

    path = tmp_path / "base"  # the tiny model, its config without pad_token_id (as hub configs may be)
    shutil.copytree(tiny_model_dir("qwen3_5"), path)
    base_config = json.loads((path / "config.json").read_text())
    base_config["text_config"]["pad_token_id"] = None
    (path / "config.json").write_text(json.dumps(base_config))
    processor, family = load_processor(str(path)), load_family(str(path))
    budget = media.budget_from_processor(processor, family.factor)
    args = ModeArguments(mode="lora", lora_rank=8)
    plan = modes.plan_from_args(args)
    model = modes.apply_plan(fresh_model(path), family, plan, args)
    head = reward.attach_head(model, std=1.0, seed=1)
    perturb(model, "lora_B", 0.05, 1)
    run_dir, merged = tmp_path / "rm", tmp_path / "merged"
    model.save_pretrained(run_dir)
    save_run_files(run_dir, model, run_record(stage="reward_model", base_model=str(path), family=family, plan=plan,
                                              dtype=torch.float32, bits=16, budget_overrides={}))
    merge(run_dir, merged, device="cpu", samples=1)

    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForSequenceClassification"] and len(config["id2label"]) == 1
    weights = load_file(str(merged / "model.safetensors"))
    assert not any(k.startswith("lm_head") for k in weights) and not (merged / reward.HEAD_FILE).exists()
    assert torch.equal(weights["score.weight"], head.weight.detach())
    seq_cls, info = transformers.Qwen3_5ForSequenceClassification.from_pretrained(str(merged),
                                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with pytest.raises(ConfigError, match="no LM head.*give it as --reward_model"):  # predict / a teacher
        load_for_inference(str(merged))

    raw = {r["id"]: r for r in json.loads(PREFS.read_text())}
    from_run = load_reward_model(str(run_dir), processor, family, "cpu")
    from_merged = load_reward_model(str(merged), processor, family, "cpu")
    assert isinstance(from_merged, transformers.Qwen3_5ForSequenceClassification)
    for rid in ("pref_red_circle", "pref_text"):
        batch = dict(processor_ids(processor, budget, raw[rid], raw[rid]["chosen"]))
        with torch.no_grad():
            want = seq_cls.eval()(**batch).logits.squeeze(-1)
        run_rewards, merged_rewards = score_rows(from_run, batch), score_rows(from_merged, batch)
        assert torch.allclose(run_rewards, want, atol=1e-4), (rid, run_rewards, want)
        assert torch.allclose(merged_rewards, run_rewards, atol=1e-4), (rid, merged_rewards, run_rewards)
    assert abs(float(want)) > 1e-3  # a reward the head actually produces
    assert config["text_config"]["pad_token_id"] == processor.tokenizer.pad_token_id  # batches of rows score
    rows = processor.tokenizer(["a red circle", "no"], padding=True, return_tensors="pt")
    assert rows["attention_mask"].sum() < rows["attention_mask"].numel()  # padded
    assert torch.allclose(score_rows(from_merged, dict(rows)), score_rows(from_run, dict(rows)), atol=1e-4)
