"""The loss variants as pure functions (vlmtune.stages.losses) against hand computations on fixed batches."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlmtune.stages import losses


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def test_orpo_equals_the_papers_odds_ratio_by_hand():
    """ORPO: NLL of the chosen reply (per token) - beta * log sigmoid(log(odds_w / odds_l)), odds = P / (1 - P),
    P = exp(mean token log-prob); also where P is near 1 and near 0."""
    chosen, rejected, beta = [-0.5, -1e-3, -30.0], [-1.2, -2.0, -31.0], 0.1
    got, log_odds = losses.orpo_loss(torch.tensor(chosen, dtype=torch.float64),
                                     torch.tensor(rejected, dtype=torch.float64), beta)
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        odds_w, odds_l = math.exp(c) / (1 - math.exp(c)), math.exp(r) / (1 - math.exp(r))
        ratio = math.log(odds_w / odds_l)
        assert log_odds[i].item() == pytest.approx(ratio, rel=1e-5)
        assert got[i].item() == pytest.approx(-c - beta * log_sigmoid(ratio), rel=1e-5)
    assert got[0].item() == pytest.approx(0.524655, abs=1e-6)  # by hand: log odds ratio 1.27440


def test_simpo_equals_the_length_normalised_margin_by_hand():
    chosen, rejected = torch.tensor([-0.5, -2.0]), torch.tensor([-1.2, -1.0])
    got = losses.simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    assert got.tolist() == pytest.approx([-log_sigmoid(2 * 0.7 - 0.5), -log_sigmoid(2 * -1.0 - 0.5)], rel=1e-6)
    assert got[0].item() == pytest.approx(0.34115, abs=1e-5)
    smoothed = losses.simpo_loss(chosen, rejected, beta=2.0, gamma=0.5, label_smoothing=0.1)
    assert smoothed[0].item() == pytest.approx(-0.9 * log_sigmoid(0.9) - 0.1 * log_sigmoid(-0.9), rel=1e-6)


LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -0.4]])
OLD = torch.tensor([[-1.1, -1.7, -1.0], [-0.6, -0.7, -0.8]])  # log ratios [0.1, -0.3, 0.5] and [0.4, 0.4, 0.4]
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADVANTAGES = torch.tensor([[1.0], [2.0]])


def test_gspo_clips_one_ratio_per_sequence():
    """GSPO: row 0's ratio is exp(mean(0.1, -0.3)) = exp(-0.1) (its third token is not a completion token), inside
    [0.8, 1.2]; row 1's exp(0.4) = 1.4918 is clipped at 1.2 with a positive advantage: loss -2.4 per token."""
    log_ratio = losses.importance_log_ratio(LOGPS, OLD, MASK, "sequence")
    assert log_ratio.shape == (2, 1) and log_ratio.flatten().tolist() == pytest.approx([-0.1, 0.4], abs=1e-6)
    per_token, ratio, clipped = losses.clipped_objective(log_ratio, ADVANTAGES, 0.2, 0.2)
    assert per_token.shape == (2, 1)  # one value per completion, broadcast over its tokens in the trainer
    assert per_token.flatten().tolist() == pytest.approx([-math.exp(-0.1), -2.4], abs=1e-6)
    assert clipped.flatten().tolist() == [False, True]


def test_token_level_ratios_clip_each_token():
    log_ratio = losses.importance_log_ratio(LOGPS, OLD, MASK, "token")
    per_token, _, clipped = losses.clipped_objective(log_ratio, ADVANTAGES, 0.2, 0.28)
    # row 0 (A = 1): exp(0.1) inside; exp(-0.3) = 0.741 below 1 - 0.2 but A > 0: min keeps the ratio, no clip;
    # exp(0.5) = 1.649 clipped at 1.28. Row 1 (A = 2): exp(0.4) = 1.492 clipped at 1.28 -> -2.56 each.
    want = [-math.exp(0.1), -math.exp(-0.3), -1.28, *[-2.56] * 3]
    assert per_token.flatten().tolist() == pytest.approx(want, abs=1e-6)
    assert clipped.tolist() == [[False, False, True], [True, True, True]]
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        losses.importance_log_ratio(LOGPS, OLD, MASK, "sentence")


def test_dynamic_sampling_finds_the_groups_with_equal_rewards():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.5, 0.5, 0.5000001])
    assert losses.varied_groups(rewards, 3).tolist() == [False, True, False, False]


def test_overlong_penalty_is_dapos_soft_punishment():
    """max 10 tokens, buffer 4: nothing up to 6 tokens, then -1/4 per token, -1 at the limit (and beyond)."""
    lengths = torch.tensor([5, 6, 7, 8, 10, 12])
    assert losses.overlong_penalty(lengths, 10, 4).tolist() == pytest.approx([0, 0, -0.25, -0.5, -1, -1])
    assert losses.overlong_penalty(lengths, 10, 4, factor=0.5).tolist() == pytest.approx(
        [0, 0, -0.125, -0.25, -0.5, -0.5])
    # TRL's implementation of the same equation (DAPO eq. 13), as an outside reference
    from trl.rewards import get_soft_overlong_punishment

    trl_values = get_soft_overlong_punishment(10, 4)([[1] * n for n in lengths.tolist()])
    assert losses.overlong_penalty(lengths, 10, 4).tolist() == pytest.approx(trl_values)


# ---------------------------------------------------------------- in the trainers, against independent forwards


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from vlmtune.data import media
    from vlmtune.model.load import load_family, load_processor

    path = tiny_model_dir("qwen2_vl")
    processor, family = load_processor(str(path)), load_family(str(path))
    return path, processor, family, media.budget_from_processor(processor, family.factor)


def lora_policy(path, family, stage: str, temperature: float = 1.0):
    from test_stages import fresh_model, perturb
    from trl.trainer.utils import disable_dropout_in_model

    from vlmtune.config import ModeArguments
    from vlmtune.model import modes
    from vlmtune.stages import reference as ref

    torch.manual_seed(0)
    mode_args = ModeArguments(mode="lora", lora_rank=8)
    model = modes.apply_plan(fresh_model(path), family, modes.plan_from_args(mode_args), mode_args)
    disable_dropout_in_model(model)
    perturb(model, "lora_B", 0.05, 1)
    ref.add_log_prob_head(model, stage, temperature)
    return model


def test_orpo_and_simpo_in_the_dpo_trainer_equal_independent_forwards(tiny, tmp_path):
    """Mixed pairs (image, video, text, multi-turn) in one batch, no reference: the trainer's ORPO and SimPO losses
    equal those computed here, by hand, from each reply's log-probs in a plain forward of the policy."""
    from test_stages import MIXED_PAIRS, PREFS, preference_dataset, reply_log_probs, train_args

    from vlmtune.data.prompts import PreferenceCollator
    from vlmtune.stage_config import DPOArguments
    from vlmtune.stages.dpo import DPOTrainer

    path, processor, family, budget = tiny
    raw = {r["id"]: r for r in json.loads(PREFS.read_text())}
    dataset = preference_dataset(tiny, MIXED_PAIRS)
    model = lora_policy(path, family, "dpo")
    means = {}  # (id, key) -> mean token log-prob of the reply and its <|im_end|>
    for record in dataset.records:
        for key in ("chosen", "rejected"):
            total, tokens = reply_log_probs(model, processor, budget, raw[record.id], getattr(record, key))
            means[record.id, key] = total / tokens
    batch = PreferenceCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    ids = [r.id for r in dataset.records]
    beta = 0.5
    for loss_type in ("orpo", "simpo"):
        args = DPOArguments(beta=beta, loss_type=loss_type, simpo_gamma=0.3)
        trainer = DPOTrainer(model=model, args=train_args(tmp_path), train_dataset=dataset,
                             data_collator=PreferenceCollator(processor.tokenizer.pad_token_id),
                             processing_class=processor, family=family, run_info={}, dpo=args, reference=None)
        loss = trainer.compute_loss(model, dict(batch)).item()
        expected = []
        for i in ids:
            c, r = means[i, "chosen"], means[i, "rejected"]
            if loss_type == "orpo":
                ratio = math.log(math.exp(c) / (1 - math.exp(c))) - math.log(math.exp(r) / (1 - math.exp(r)))
                expected.append(-c - beta * log_sigmoid(ratio))
            else:
                expected.append(-log_sigmoid(beta * (c - r) - 0.3))
        assert loss == pytest.approx(sum(expected) / len(expected), rel=1e-4), loss_type
        logged = {k: v[-1] for k, v in trainer._metrics["train" if model.training else "eval"].items()}
        assert logged["rewards/margins"] == pytest.approx(mean(beta * (means[i, "chosen"] - means[i, "rejected"])
                                                               for i in ids), abs=1e-4)
        assert ("log_odds_ratio" in logged) == (loss_type == "orpo")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def grpo_trainer(tiny, tmp_path, rewards, **grpo):
    from test_stages import GRPO_JSON, train_args

    from vlmtune.data.conversation import Conversation
    from vlmtune.data.prompts import PromptDataset, collate_prompts, stage_lengths
    from vlmtune.data.records import read_records
    from vlmtune.stage_config import GRPOArguments
    from vlmtune.stages.grpo import GRPOTrainer

    path, processor, family, budget = tiny
    wanted = ("grpo_red_circle", "grpo_video_right", "grpo_triangle_sides")
    records = [r for r in read_records(GRPO_JSON, stage="grpo", budget=budget)[0] if r.id in wanted]
    conversation = Conversation(processor)
    dataset = PromptDataset(records, processor, family, budget, conversation, None, False,
                            stage_lengths(records, conversation, budget, family, "grpo")[0])
    args = GRPOArguments(**{"num_generations": 3, "max_completion_length": 4, **grpo})
    model = lora_policy(path, family, "grpo", args.temperature)
    trainer = GRPOTrainer(model=model, args=train_args(tmp_path), train_dataset=dataset,
                          data_collator=collate_prompts, processing_class=processor, family=family, run_info={},
                          grpo=args, rewards=rewards, reference=None)
    return trainer, model, collate_prompts([dataset[i] for i in range(len(dataset))])["prompts"]


def test_gspo_loss_in_the_grpo_trainer_equals_a_hand_computation(tiny, tmp_path):
    """GSPO on image, video and text prompts: the loss equals -min(s A, clip(s) A) averaged over completions, s the
    exp of the mean token log ratio, from plain forwards of the policy; old log-probs moved so the clip acts."""
    from vlmtune.rewards import Reward

    path, processor, family, budget = tiny
    length = Reward("length", lambda completions, **kw: [float(len(c)) for c in completions])
    trainer, model, prompts = grpo_trainer(tiny, tmp_path, [length], importance_sampling_level="sequence",
                                           epsilon=0.05, epsilon_high=0.1)
    batch = trainer._rollout(model, prompts, "train")
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "advantages")}).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    gen = torch.Generator().manual_seed(3)
    shift = torch.linspace(-0.3, 0.3, len(mask))[:, None]  # per completion, so that sequence ratios move
    old = torch.where(mask, logps + shift + (torch.rand(logps.shape, generator=gen) - 0.5) * 0.2, 0.0)
    batch["old_log_probs"] = old
    expected = []
    for row in range(len(mask)):
        s = math.exp(float((logps[row] - old[row])[mask[row]].mean()))
        a = float(batch["advantages"][row])
        expected.append(-min(s * a, min(max(s, 0.95), 1.1) * a))
    model.train()
    loss = trainer.compute_loss(model, dict(batch)).item()
    assert loss == pytest.approx(mean(expected), rel=1e-4, abs=1e-6)
    assert 0 < trainer._metrics["train"]["clip_ratio"][-1] < 1


def completion_lengths(batch, prompts) -> list[int]:
    """Tokens of each completion row: the row's real tokens past its prompt's."""
    sizes = [len(p["input_ids"]) for p in prompts for _ in range(len(batch["input_ids"]) // len(prompts))]
    return [int(batch["attention_mask"][r].sum()) - sizes[r] for r in range(len(sizes))]


def test_dynamic_sampling_resamples_then_drops_groups_with_equal_rewards(tiny, tmp_path):
    """One prompt's rewards are always equal: its group is sampled 1 + 2 times, then dropped; the others' never
    are. The shares are logged."""
    from vlmtune.rewards import Reward

    def rule(completions, record_id, **kw):
        return [0.0 if record_id == "grpo_red_circle" else float(i) for i in range(len(completions))]

    trainer, model, prompts = grpo_trainer(tiny, tmp_path, [Reward("rule", rule)], dynamic_sampling=2)
    calls = []
    sample = trainer.sampler.sample
    trainer.sampler.sample = lambda generator, prompts, t, **kw: calls.extend(
        p["record"]["id"] for p in prompts) or sample(generator, prompts, t, **kw)
    batch = trainer._rollout(model, prompts, "train")
    assert sorted(calls) == sorted(["grpo_red_circle"] * 3 + [p["record"]["id"] for p in prompts[1:]])
    assert prompts[0]["record"]["id"] == "grpo_red_circle" and batch["input_ids"].shape[0] == 2 * 3
    assert trainer._metrics["train"]["dynamic_sampling/equal_groups"] == [pytest.approx(1 / 3)]
    assert trainer._metrics["train"]["dynamic_sampling/dropped_groups"] == [pytest.approx(1 / 3)]
    assert trainer._metrics["train"]["frac_reward_zero_std"] == [0.0]


def test_overlong_penalty_and_filter_in_the_grpo_trainer(tiny, tmp_path):
    """A reward of 0 plus the overlong penalty: -(length - 1) / 3 past 1 of the 4 tokens, by hand from each
    completion's length; completions cut at the limit (no end token) have no label."""
    from vlmtune.rewards import Reward

    zero = Reward("zero", lambda completions, **kw: [0.0] * len(completions))
    trainer, model, prompts = grpo_trainer(tiny, tmp_path, [zero], overlong_buffer=3,
                                           mask_truncated_completions=True, num_generations=4, temperature=2.0)
    # the random tiny model seldom ends a completion: a third of its vocabulary ends one here, so lengths vary
    trainer.eos_ids = trainer.sampler.eos_ids = sorted({*range(120), *trainer.eos_ids})
    torch.manual_seed(1)
    batch = trainer._rollout(model, prompts, "train")
    lengths = completion_lengths(batch, prompts)
    penalty = [-min(max(n - 1, 0) / 3, 1) for n in lengths]
    assert len(set(penalty)) > 2  # lengths across the buffer
    assert trainer._metrics["train"]["reward"] == [pytest.approx(mean(penalty))]
    assert trainer._metrics["train"]["rewards/overlong_penalty/mean"] == [pytest.approx(mean(penalty))]
    eos, ends = set(trainer.eos_ids), []
    for row in range(len(lengths)):
        ends.append(int(batch["input_ids"][row][int(batch["attention_mask"][row].sum()) - 1]) in eos)
        assert bool((batch["labels"][row] != -100).any()) == ends[-1], row
    assert len(set(ends)) == 2  # both kinds of completion


@pytest.mark.parametrize(("argv", "message"), [
    (["dpo", "--loss_type", "orpo", "--precompute_ref_log_probs", "True"],
     "--precompute_ref_log_probs: --loss_type orpo uses no reference model; drop the flag"),
    (["dpo", "--loss_type", "orpo", "--label_smoothing", "0.1"],
     "--label_smoothing applies to the sigmoid and simpo losses, not --loss_type orpo"),
    (["grpo", "--importance_sampling_level", "sequence", "--loss_type", "bnpo"],
     "--importance_sampling_level sequence (GSPO) gives one loss per completion, averaged with --loss_type grpo"),
    (["grpo", "--overlong_buffer", "100", "--max_completion_length", "64"],
     "--overlong_buffer within [0, --max_completion_length 64]"),
    (["grpo", "--dynamic_sampling", "-1"], "--dynamic_sampling must be >= 0"),
])
def test_contradicting_variant_flags_stop_with_one_line(argv, message, capsys):
    from vlmtune.cli import main

    assert main([*argv, "--data_path", "x.json", "--use_cpu", "True"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
