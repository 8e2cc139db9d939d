"""DPO and GRPO: records, the processor-exact pair ids, losses against independent forwards, the reference policy,
advantages, rewards, learning on CPU, DeepSpeed ZeRO-2, the scripts and the merge after SFT -> DPO."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import forkserver
import pytest
import torch
from conftest import EXAMPLES, FORKRUN, ROOT, free_port

from vlmtune.config import ModeArguments, TrainingArguments
from vlmtune.data import media
from vlmtune.data.records import read_records
from vlmtune.stage_config import DPOArguments, GRPOArguments

PREFS = EXAMPLES / "preference.json"
GRPO_JSON = EXAMPLES / "grpo.json"
PYTHON = sys.executable
RED = "images/red_circle.png"


# ---------------------------------------------------------------- bad input


def prompt(text: str = "<image>\nWhat is this?") -> list[dict]:
    return [{"from": "human", "value": text}]


def pref(**overrides) -> dict:
    record = {"id": "p", "image": RED, "conversations": prompt(), "chosen": "A circle.", "rejected": "A square."}
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not None}


def prompt_record(**overrides) -> dict:
    record = {"id": "g", "image": RED, "conversations": prompt(), "answer": "circle"}
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not None}


BAD = [
    ("dpo", pref(chosen=None), "'chosen' is missing"),
    ("dpo", pref(rejected=None), "'rejected' is missing"),
    ("dpo", pref(rejected="A circle. "), "'chosen' and 'rejected' are the same reply"),
    ("dpo", pref(chosen="  "), "'chosen' is an empty reply"),
    ("dpo", pref(rejected=["A square."]), "'rejected' must be the reply as a string"),
    ("dpo", pref(chosen={"from": "human", "value": "A circle."}), "'chosen' is a turn from 'human'"),
    ("dpo", pref(chosen={"from": "gpt", "value": 3}), "'chosen' turn: 'value' must be a string"),
    ("dpo", pref(conversations=[*prompt(), {"from": "gpt", "value": "A circle."}]),
     "ends with a gpt turn; a DPO record's conversation ends with the prompt"),
    ("dpo", pref(conversations=[{"from": "system", "value": "Be brief."}], image=None), "empty prompt"),
    ("dpo", pref(conversations=prompt(" "), image=None), "empty prompt: the last human turn has no text"),
    ("dpo", pref(chosen="<image> A circle."), "'chosen' contains an <image> / <video> placeholder"),
    ("dpo", pref(rejected="A <|im_end|> square."), "'rejected' contains the reserved token(s) ['<|im_end|>']"),
    ("dpo", pref(image=[RED, RED]), "1 <image> placeholder(s) but 2 image(s)"),  # the SFT checks apply too
    ("dpo", pref(image="images/missing.png"), "images/missing.png"),
    ("grpo", prompt_record(answer=["circle"]), "'answer' must be a string or a number"),
    ("grpo", prompt_record(box=[1, 2, 3]), "'box' must be [x1, y1, x2, y2]"),
    ("grpo", prompt_record(conversations=[*prompt(), {"from": "gpt", "value": "circle"}]),
     "ends with a gpt turn and the record has an 'answer'"),
    ("grpo", prompt_record(conversations=[{"from": "gpt", "value": "circle"}], image=None), "roles out of order"),
]


@pytest.mark.parametrize(("stage", "record", "fragment"), BAD, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(BAD)])
def test_bad_records_get_one_clear_error_naming_file_record_and_id(tmp_path, stage, record, fragment):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([pref(id="fine") if stage == "dpo" else prompt_record(id="fine"), record]))
    records, problems = read_records(path, EXAMPLES, stage=stage)
    errors = [p.format(path) for p in problems if p.level == "error"]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}: record 1 (id {record['id']!r}): "), errors[0]
    assert fragment in errors[0], errors[0]
    assert [r.id for r in records] == ["fine"]


def test_stage_specific_keys_and_the_gpt_turn_answer(tmp_path):
    """A GRPO record's other keys are its fields; a trailing gpt turn is its answer; preference keys in SFT data
    get a hint, not a silent pass."""
    records, problems = read_records(GRPO_JSON, stage="grpo")
    assert problems == []
    by_id = {r.id: r for r in records}
    assert by_id["grpo_box"].fields == {"answer": "[24, 14, 72, 58]", "box": [24, 14, 72, 58]}
    assert by_id["grpo_gpt_turn_answer"].fields == {"answer": "circle"}
    assert [m.role for m in by_id["grpo_gpt_turn_answer"].messages] == ["user"]
    prefs, problems = read_records(PREFS, stage="dpo")
    assert problems == [] and len(prefs) == 10
    assert prefs[2].chosen == "The triangle is green." and prefs[2].rejected == "The triangle is red."
    _, problems = read_records(PREFS, stage="sft")
    assert any("trains with `vlmtune dpo`" in p.message for p in problems if p.level == "warning")


# ---------------------------------------------------------------- ids from the processor


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from vlmtune.model.load import load_family, load_processor

    path = tiny_model_dir("qwen2_vl")
    processor = load_processor(str(path))
    family = load_family(str(path))
    return path, processor, family, media.budget_from_processor(processor, family.factor)


def processor_ids(processor, budget, record: dict, reply: str | None):
    """The processor's own ids (and vision tensors) for a record's prompt, with the generation prompt when
    ``reply`` is None, else with the reply as the last assistant turn. Messages are written out here."""
    images = [media.load_image(EXAMPLES / p, budget) for p in ([record["image"]] if isinstance(
        record.get("image"), str) else record.get("image", []))]
    videos = [media.load_video(EXAMPLES / record["video"], budget)] if "video" in record else []
    messages = []
    for turn in record["conversations"]:
        role = {"human": "user", "gpt": "assistant", "system": "system"}[turn["from"]]
        parts, text = [], turn["value"]
        for piece in text.replace("<image>\n", "<image>").replace("<video>\n", "<video>").replace(
                "<image>", "\0image\0").replace("<video>", "\0video\0").split("\0"):
            if piece in ("image", "video"):
                parts.append({"type": piece})
            elif piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    if reply is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=reply is None)
    encoded = processor(text=[text], images=images or None, videos=[v for v, _ in videos] or None,
                        video_metadata=[m for _, m in videos] or None, do_resize=False, do_sample_frames=False,
                        return_tensors="pt")
    return encoded


def preference_dataset(tiny, ids):
    from vlmtune.data.conversation import Conversation
    from vlmtune.data.prompts import PreferenceDataset, stage_lengths

    path, processor, family, budget = tiny
    records = [r for r in read_records(PREFS, stage="dpo", budget=budget)[0] if r.id in ids]
    conversation = Conversation(processor)
    lengths, _, problems = stage_lengths(records, conversation, budget, family, "dpo")
    assert problems == []
    return PreferenceDataset(records, processor, family, budget, conversation, None, False, lengths)


MIXED_PAIRS = ("pref_red_circle", "pref_video_right", "pref_text", "pref_multi_turn")


def test_pairs_share_the_processor_prompt_ids_and_label_only_the_reply(tiny):
    path, processor, family, budget = tiny
    raw = {r["id"]: r for r in json.loads(PREFS.read_text())}
    dataset = preference_dataset(tiny, MIXED_PAIRS)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, record in enumerate(dataset.records):
        pair = dataset[i]
        prompt_ids = processor_ids(processor, budget, raw[record.id], None)["input_ids"][0]
        for key in ("chosen", "rejected"):
            item, reply = pair[key], getattr(record, key)
            full = processor_ids(processor, budget, raw[record.id], reply)
            assert torch.equal(item["input_ids"], full["input_ids"][0])  # the processor's ids, vision expanded
            n = len(prompt_ids)
            assert torch.equal(item["input_ids"][:n], prompt_ids)  # the prompt exactly as served
            labelled = (item["labels"] != -100).nonzero().flatten()
            assert labelled.tolist() == list(range(n, int(labelled[-1]) + 1))  # one span, right after the prompt
            span = item["input_ids"][labelled]
            assert span[-1] == im_end and processor.tokenizer.decode(span[:-1]) == reply
        assert pair["index"] == i


def test_check_data_reports_prompt_and_reply_lengths(tiny, capsys):
    from vlmtune.cli import main
    from vlmtune.data.check import check_data

    path, processor, family, budget = tiny
    raw = {r["id"]: r for r in json.loads(PREFS.read_text())}
    result = check_data(str(PREFS), processor, family, budget, stage="dpo")
    for record, *lengths in zip(result.records, *result.parts.values()):
        if record.id in MIXED_PAIRS:
            expected = [len(processor_ids(processor, budget, raw[record.id], reply)["input_ids"][0])
                        for reply in (None, record.chosen, record.rejected)]
            assert lengths == expected, record.id
    assert main(["check-data", str(PREFS), "--model", str(path), "--stage", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "prompt + chosen: min" in out and "prompt + rejected: min" in out and "10 valid records" in out


# ---------------------------------------------------------------- DPO loss and reference


def reply_log_probs(model, processor, budget, record: dict, reply: str, temperature: float = 1.0) -> float:
    """Sum of log p(reply token) over the reply and its <|im_end|>, from one plain forward (full logits)."""
    prompt_len = len(processor_ids(processor, budget, record, None)["input_ids"][0])
    full = processor_ids(processor, budget, record, reply)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = full["input_ids"][0]
    end = prompt_len + ids[prompt_len:].tolist().index(im_end) + 1
    with torch.no_grad():
        logits = model(**full).logits[0].float() / temperature
    logps = torch.log_softmax(logits[prompt_len - 1 : end - 1], -1)
    return logps.gather(-1, ids[prompt_len:end, None]).sum().item(), end - prompt_len


def fresh_model(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).eval()


def perturb(model, names: str, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and any(n in name for n in names.split(",")):
                param.add_(torch.randn(param.shape, generator=gen) * std)


def train_args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)


@pytest.mark.parametrize("mode", ["lora_vision", "full"])
def test_dpo_loss_equals_one_from_independent_forwards(tiny, tmp_path, mode):
    """One mixed batch (image, video, text, multi-turn pairs in one forward): the trainer's loss equals the DPO
    loss computed here from plain forwards of the policy and of the base model loaded again; under LoRA the
    reference (adapters off, the merger swapped back) scores exactly like the base model."""
    from trl.trainer.utils import disable_dropout_in_model

    from vlmtune.data.prompts import PreferenceCollator
    from vlmtune.model import modes
    from vlmtune.stages import reference as ref
    from vlmtune.stages.dpo import DPOTrainer

    path, processor, family, budget = tiny
    raw = {r["id"]: r for r in json.loads(PREFS.read_text())}
    dataset = preference_dataset(tiny, MIXED_PAIRS)
    torch.manual_seed(0)
    plan = modes.plan_from_args(ModeArguments(mode=mode, lora_rank=8))
    model = modes.apply_plan(fresh_model(path), family, plan, ModeArguments(mode=mode, lora_rank=8))
    disable_dropout_in_model(model)
    if plan.uses_lora:
        reference = ref.Reference.adapters_off(model, family, plan, False, "test")
        perturb(model, "lora_B,merger", 0.05, 1)  # the policy moves away from the base, the merger too
    else:
        reference = ref.Reference("copy", ref.frozen_copy(fresh_model(path)))
        ref.add_log_prob_head(reference.ref_model, "dpo")
        perturb(model, "layers", 0.02, 1)
    ref.add_log_prob_head(model, "dpo")
    base = fresh_model(path)

    policy, refs, tokens = {}, {}, {}
    for record in dataset.records:
        for key in ("chosen", "rejected"):
            policy[record.id, key], tokens[record.id, key] = reply_log_probs(
                model, processor, budget, raw[record.id], getattr(record, key))
            refs[record.id, key], _ = reply_log_probs(base, processor, budget, raw[record.id], getattr(record, key))
    batch = PreferenceCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    ids = [r.id for r in dataset.records]

    if plan.uses_lora:  # the reference is the base model, though adapters and merger have moved
        got = reference.log_probs(model, batch).sum(-1)
        want = [refs[i, k] for k in ("chosen", "rejected") for i in ids]
        assert got.tolist() == pytest.approx(want, abs=1e-4)
        assert max(abs(policy[i, "chosen"] - refs[i, "chosen"]) for i in ids) > 1e-2

    for loss_type, smoothing in [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]:
        args = DPOArguments(beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
        trainer = DPOTrainer(model=model, args=train_args(tmp_path), train_dataset=dataset,
                             data_collator=PreferenceCollator(processor.tokenizer.pad_token_id),
                             processing_class=processor, family=family, run_info={}, dpo=args, reference=reference)
        loss = trainer.compute_loss(model, dict(batch)).item()
        expected = []
        for i in ids:
            dc, dr = policy[i, "chosen"] - refs[i, "chosen"], policy[i, "rejected"] - refs[i, "rejected"]
            z = 0.5 * (dc - dr)
            if loss_type == "sigmoid":
                expected.append(-(1 - smoothing) * math.log(1 / (1 + math.exp(-z)))
                                - smoothing * math.log(1 / (1 + math.exp(z))))
            elif loss_type == "hinge":
                expected.append(max(0.0, 1 - z))
            else:
                margin = dc / tokens[i, "chosen"] - dr / tokens[i, "rejected"]
                expected.append((margin - 1 / (2 * 0.5)) ** 2)
        assert loss == pytest.approx(sum(expected) / len(expected), rel=1e-4, abs=1e-5), loss_type
        logged = {k: v[-1] for k, v in trainer._metrics["eval" if not model.training else "train"].items()}
        margins = [0.5 * ((policy[i, "chosen"] - refs[i, "chosen"]) - (policy[i, "rejected"] - refs[i, "rejected"]))
                   for i in ids]
        assert logged["rewards/margins"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
        assert logged["rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))


# ---------------------------------------------------------------- GRPO


def test_group_advantages_equal_a_hand_computation():
    from vlmtune.stages.grpo import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 1.5, 2.5, 3.5])
    got = group_advantages(rewards, 4)
    # group 1: mean 0.5, std (Bessel) sqrt(1/3); group 2: all equal -> 0; group 3: mean 2, std sqrt(5/3)
    s1, s3 = math.sqrt(1 / 3), math.sqrt(5 / 3)
    want = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), 0, 0, 0, 0,
            -1.5 / (s3 + 1e-4), -0.5 / (s3 + 1e-4), 0.5 / (s3 + 1e-4), 1.5 / (s3 + 1e-4)]
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert group_advantages(rewards, 4, "none").tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -1.5, -0.5, 0.5, 1.5])
    batch_std = float(rewards.std())
    assert group_advantages(rewards, 4, "batch").tolist() == pytest.approx(
        [v / (batch_std + 1e-4) for v in [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -1.5, -0.5, 0.5, 1.5]], abs=1e-6)


def test_grpo_step_on_mixed_prompts_matches_a_hand_computed_clipped_objective(tiny, tmp_path):
    """Image, video and text prompts in one step: completions sampled per prompt, rewarded, and the loss equals
    the clipped objective with KL computed here from plain forwards (policy, and the base model loaded again as
    the reference), at the sampling temperature, with old log-probs moved off the policy so the clip acts."""
    from trl.trainer.utils import disable_dropout_in_model

    from vlmtune.data.conversation import Conversation
    from vlmtune.data.prompts import PromptDataset, collate_prompts, stage_lengths
    from vlmtune.model import modes
    from vlmtune.rewards import Reward
    from vlmtune.stages import reference as ref
    from vlmtune.stages.grpo import GRPOTrainer

    path, processor, family, budget = tiny
    raw = {r["id"]: r for r in json.loads(GRPO_JSON.read_text())}
    wanted = ("grpo_red_circle", "grpo_video_right", "grpo_triangle_sides")
    records = [r for r in read_records(GRPO_JSON, stage="grpo", budget=budget)[0] if r.id in wanted]
    ids = [r.id for r in records]
    conversation = Conversation(processor)
    dataset = PromptDataset(records, processor, family, budget, conversation, None, False,
                            stage_lengths(records, conversation, budget, family, "grpo")[0])
    temperature, beta, n = 0.7, 0.1, 3
    args = GRPOArguments(num_generations=n, max_completion_length=4, temperature=temperature, beta=beta,
                         epsilon=0.1, epsilon_high=0.2)
    torch.manual_seed(0)
    plan = modes.plan_from_args(ModeArguments(mode="lora", lora_rank=8))
    model = modes.apply_plan(fresh_model(path), family, plan, ModeArguments(mode="lora", lora_rank=8))
    disable_dropout_in_model(model)
    ref.add_log_prob_head(model, "grpo", temperature)
    length = Reward("length", lambda completions, **kw: [float(len(c)) for c in completions])
    trainer = GRPOTrainer(model=model, args=train_args(tmp_path), train_dataset=dataset,
                          data_collator=collate_prompts, processing_class=processor, family=family, run_info={},
                          grpo=args, rewards=[length],
                          reference=ref.Reference.adapters_off(model, family, plan, False, "test"))
    prompts = collate_prompts([dataset[i] for i in range(3)])["prompts"]
    batch = trainer._rollout(model, prompts, "train")
    assert batch["input_ids"].shape[0] == 3 * n
    assert "pixel_values" in batch and "pixel_values_videos" in batch
    perturb(model, "lora_B", 0.05, 2)

    base = fresh_model(path)
    rows = []  # (policy per-token logps, reference per-token logps, advantage) from independent forwards
    for row in range(3 * n):
        record = raw[ids[row // n]]
        encoded = processor_ids(processor, budget, record, None)
        completion = batch["labels"][row][batch["labels"][row] != -100]
        full = dict(encoded)
        full["input_ids"] = torch.cat([encoded["input_ids"][0], completion])[None]
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        full["mm_token_type_ids"] = torch.cat([encoded["mm_token_type_ids"][0], torch.zeros_like(completion)])[None]
        start = encoded["input_ids"].shape[1]
        scores = []
        for m in (model, base):
            with torch.no_grad():
                logits = m(**full).logits[0, start - 1 : -1].float() / temperature
            scores.append(torch.log_softmax(logits, -1).gather(-1, completion[:, None]).flatten())
        rows.append((*scores, float(batch["advantages"][row])))
    mask = batch["labels"][:, 1:] != -100
    old = torch.zeros_like(mask, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    expected = []
    for row, (logp, ref_logp, adv) in enumerate(rows):
        old_row = logp + (torch.rand(len(logp), generator=gen) - 0.5) * 0.6
        old[row, mask[row]] = old_row
        ratio = torch.exp(logp - old_row)
        per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 0.9, 1.2) * adv)
        per_token = per_token + beta * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
        expected.append(per_token.mean().item())
    batch["old_log_probs"] = old
    model.train()
    loss = trainer.compute_loss(model, dict(batch)).item()
    assert loss == pytest.approx(sum(expected) / len(expected), rel=1e-4, abs=1e-5)
    assert 0 < trainer._metrics["train"]["clip_ratio"][-1] < 1
    lengths = [len(c) for c in processor.tokenizer.batch_decode(
        [batch["labels"][r][batch["labels"][r] != -100] for r in range(3 * n)], skip_special_tokens=True)]
    assert trainer._metrics["train"]["rewards/length/mean"][-1] == pytest.approx(sum(lengths) / len(lengths))


def test_reward_builtins_and_failures(tmp_path):
    from vlmtune.errors import ConfigError, RewardError
    from vlmtune.rewards import load_rewards, score

    exact, fmt, box, maths = (r.func for r in load_rewards(["exact_match", "format", "box_iou", "math"]))
    assert exact(["The Circle!", "<think>x</think><answer> circle </answer>", "a square"], answer="circle") == [
        1.0, 1.0, 0.0]
    assert fmt(["<think>a\nb</think>\n<answer>c</answer>", "<answer>c</answer>", "<think></think>x"]) == [1, 0, 0]
    assert box(["<answer>[0, 0, 10, 10]</answer>", "[5, 0, 15, 10]", "no box"], box=[0, 0, 10, 10]) == [
        1.0, pytest.approx(50 / 150), 0.0]
    assert maths(["<answer>0.5</answer>", "\\frac{1}{2}", "3"], answer="1/2") == [1.0, 1.0, 0.0]

    (tmp_path / "mine.py").write_text("def score(completions, answer):\n    return [1 / len(c) for c in completions]\n")
    (mine,) = load_rewards([f"{tmp_path}/mine.py:score"], [0.5])
    assert mine.fields == ("answer",) and mine.weight == 0.5
    record = {"index": 4, "id": "r4", "fields": {"answer": "x"}}
    assert score(mine, ["ab", "abcd"], record) == [0.5, 0.25]
    with pytest.raises(RewardError) as err:
        score(mine, ["ab", ""], record)
    assert str(err.value) == (f"reward function {tmp_path}/mine.py:score raised ZeroDivisionError: division by zero "
                              "on record 4 (id 'r4')")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_rewards([f"{tmp_path}/mine.py:nope"])
    with pytest.raises(ConfigError, match="unknown reward 'exact'"):
        load_rewards(["exact"])


# ---------------------------------------------------------------- end to end (subprocesses, as users run them)


def run(cmd: list[str], timeout: int = 900, forked_python: bool = False, **env) -> subprocess.CompletedProcess:
    """Run ``cmd`` (forked from the tests' fork server where it can be); with ``forked_python``, a script's
    ``python -m vlmtune.cli`` is too (``forkserver.script_env``)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    result = forkserver.run(cmd, cwd=ROOT, env=forkserver.script_env(env) if forked_python else env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def history(output_dir: Path, key: str) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry[key] for entry in state["log_history"] if key in entry and "loss" in entry}


def stage_cli(stage: str, *args: str) -> list[str]:
    return [PYTHON, "-m", "vlmtune.cli", stage, "--use_cpu", "True", "--report_to", "none", "--disable_tqdm", "True",
            "--logging_steps", "1", "--image_folder", str(EXAMPLES), *args]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.mark.slow
def test_dpo_learns_with_precomputed_reference(tmp_path):
    """Margins and accuracy rise on the example pairs (image, video, text); the reference precomputed before
    step 1 is the starting policy (zero rewards at step 1) and is saved with the checkpoint."""
    out = tmp_path / "out"
    run(stage_cli("dpo", "--data_path", str(PREFS), "--output_dir", str(out), "--max_steps", "12",
                  "--per_device_train_batch_size", "5", "--learning_rate", "1e-2", "--lora_rank", "16",
                  "--lora_alpha", "32", "--lr_scheduler_type", "constant", "--beta", "0.5", "--seed", "0",
                  "--precompute_ref_log_probs", "True", "--save_steps", "6"))
    margins, accuracies = history(out, "rewards/margins"), history(out, "rewards/accuracies")
    assert sorted(margins) == list(range(1, 13))
    assert abs(margins[1]) < 1e-3 and abs(history(out, "rewards/chosen")[1]) < 1e-3
    assert mean(margins[s] for s in range(9, 13)) > mean(margins[s] for s in range(1, 5)) + 0.5, margins
    # measured: margins 0, -0.15, 1.9, 2.8 over steps 1-4 and 4.5, 3.9, 4.2, 5.1 over 9-12; accuracies 0.5 -> 0.95
    last, first = mean(accuracies[s] for s in range(9, 13)), mean(accuracies[s] for s in range(1, 5))
    assert last >= 0.8 and last > first + 0.2, accuracies
    assert (out / "checkpoint-6" / "ref_log_probs.safetensors").is_file()
    assert json.loads((out / "vlmtune_run.json").read_text())["stage"] == "dpo"


def first_token_targets(tiny, record: dict, mass: float = 0.15) -> list[str]:
    """The likeliest first tokens of the base model's reply to the record (texts), until they hold ``mass``."""
    path, processor, family, budget = tiny
    with torch.no_grad():
        probs = fresh_model(path)(**processor_ids(processor, budget, record, None)).logits[0, -1].softmax(-1)
    special = set(processor.tokenizer.all_special_ids)
    texts, total = [], 0.0
    for token in probs.argsort(descending=True).tolist():
        text = processor.tokenizer.decode([token])
        if token in special or not text.strip() or "\ufffd" in text or text in texts:
            continue
        texts.append(text)
        total += probs[token].item()
        if total >= mass:
            return texts
    raise AssertionError("no targets")


REWARD_FILE = '''
def first_token(completions, targets, **kwargs):
    return [1.0 if c in targets else 0.0 for c in completions]
'''


@pytest.mark.slow
def test_grpo_learns_a_first_token_task_on_mixed_prompts(tiny, tmp_path):
    """Reward 1 when the one-token completion is among the prompt's target tokens (the base model's likeliest,
    about 15% of its mass): the mean reward rises. Each step holds an image, a video and a text prompt; the
    reward is a user's function reading a record field."""
    raw = {r["id"]: r for r in json.loads(GRPO_JSON.read_text())}
    data = [dict(raw[i], targets=first_token_targets(tiny, raw[i]))
            for i in ("grpo_red_circle", "grpo_video_right", "grpo_triangle_sides")]
    (tmp_path / "data.json").write_text(json.dumps(data))
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    out = tmp_path / "out"
    run(stage_cli("grpo", "--data_path", str(tmp_path / "data.json"), "--output_dir", str(out), "--max_steps", "12",
                  "--per_device_train_batch_size", "3", "--learning_rate", "1e-2", "--lora_rank", "16",
                  "--lora_alpha", "32", "--lr_scheduler_type", "constant", "--max_completion_length", "1",
                  "--num_generations", "16", "--reward_funcs", f"{tmp_path}/rewards.py:first_token", "--seed", "3",
                  "--save_strategy", "no"))
    rewards = history(out, "reward")  # seeds 3 and 4 measured: about 0.2 over steps 1-4, 0.6 over steps 9-12
    assert sorted(rewards) == list(range(1, 13))
    assert mean(rewards[s] for s in range(9, 13)) > mean(rewards[s] for s in range(1, 5)) + 0.2, rewards
    assert history(out, f"rewards/{tmp_path}/rewards.py:first_token/mean") == rewards
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 12 and {"step", "id", "prompt", "completion", "rewards", "advantage"} <= set(samples[0])


@pytest.mark.slow
def test_a_reward_that_raises_stops_the_run_with_one_line(tmp_path):
    (tmp_path / "rewards.py").write_text("def broken(completions, answer):\n    raise KeyError(answer)\n")
    result = forkserver.run(stage_cli("grpo", "--data_path", str(GRPO_JSON), "--output_dir", str(tmp_path / "out"),
                                      "--max_steps", "1", "--per_device_train_batch_size", "1",
                                      "--train_sampling_strategy", "sequential", "--num_generations", "2",
                                      "--max_completion_length", "1", "--reward_funcs",
                                      f"{tmp_path}/rewards.py:broken"),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"vlmtune grpo: error: reward function {tmp_path}/rewards.py:broken raised KeyError: 'red' on "
                    "record 0 (id 'grpo_red_circle')"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_missing_reward_field_stops_before_the_model_loads(tmp_path):
    data = [{"id": "q1", "conversations": [{"from": "human", "value": "Say hi."}]}]
    (tmp_path / "data.json").write_text(json.dumps(data))
    result = forkserver.run(stage_cli("grpo", "--data_path", str(tmp_path / "data.json"), "--output_dir",
                                      str(tmp_path / "out"), "--reward_funcs", "exact_match", "format"),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert (f"{tmp_path}/data.json: record 0 (id 'q1'): reward function exact_match reads the field 'answer', which "
            "the record lacks") in result.stderr
    assert "loaded Qwen2VL" not in result.stderr


def deepspeed_cmd(stage: str, *args: str) -> list[str]:
    """torchrun of a stage under ZeRO-2, on a port free at run time."""
    return [*FORKRUN, "--nproc_per_node", "1", "--master_port", str(free_port()),
            *stage_cli(stage, "--deepspeed", "scripts/zero2.json", "--save_strategy", "no", *args)[1:]]


@pytest.mark.slow
def test_zero2_dpo_lora_vision(tmp_path):
    """ZeRO-2, a LoRA plan with a fully trained merger (the reference swaps its starting values back)."""
    out = tmp_path / "out"
    run(deepspeed_cmd("dpo", "--data_path", str(PREFS), "--output_dir", str(out), "--mode", "lora_vision",
                      "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
                      "--lora_rank", "8", "--seed", "0"))
    chosen = history(out, "rewards/chosen")
    assert sorted(chosen) == [1, 2, 3] and abs(chosen[1]) < 1e-4 and abs(chosen[3]) > 1e-4
    assert (out / "adapter_model.safetensors").is_file() and (out / "non_lora_trainables.safetensors").is_file()


@pytest.mark.slow
def test_zero2_grpo_full_with_a_reference_copy(tmp_path):
    """ZeRO-2, full training, beta > 0: the frozen reference copy runs as a DeepSpeed inference engine; with
    --num_iterations 2 each batch of completions trains two steps."""
    out = tmp_path / "out"
    (tmp_path / "rewards.py").write_text("def length(completions, **kw):\n    return [len(c) for c in completions]\n")
    run(deepspeed_cmd("grpo", "--data_path", str(GRPO_JSON), "--output_dir", str(out), "--mode", "full",
                      "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
                      "--num_generations", "3", "--max_completion_length", "3", "--beta", "0.1",
                      "--num_iterations", "2", "--reward_funcs", "format", f"{tmp_path}/rewards.py:length"))
    kl = history(out, "kl")
    assert sorted(kl) == [1, 2] and kl[1] == pytest.approx(0, abs=1e-6) and kl[2] > 0
    assert sorted(history(out, "reward")) == [1]  # step 2 reused step 1's completions
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_sft_then_dpo_script_then_merge(tiny, tmp_path):
    """finetune_dpo.sh from an SFT LoRA run's folder: the SFT adapters are merged in first and that model is the
    reference (zero rewards at step 1); `vlmtune merge` of the DPO run equals merging both adapter sets with PEFT."""
    from peft import PeftModel

    from vlmtune.merge import merge

    path, processor, family, budget = tiny
    sft, out = tmp_path / "sft", tmp_path / "dpo"
    run([PYTHON, "-m", "vlmtune.cli", "train", "--data_path", str(EXAMPLES / "data.json"), "--image_folder",
         str(EXAMPLES), "--use_cpu", "True", "--report_to", "none", "--disable_tqdm", "True", "--mode", "lora",
         "--lora_rank", "8", "--max_steps", "3", "--learning_rate", "1e-2", "--output_dir", str(sft),
         "--save_strategy", "no"])
    run(["bash", "scripts/finetune_dpo.sh", "--max_steps", "2", "--disable_tqdm", "True", "--save_strategy", "no"],
        forked_python=True, MODEL_NAME=str(sft), DATA_PATH=str(PREFS), IMAGE_FOLDER=str(EXAMPLES), OUTPUT_DIR=str(out),
        LORA_RANK="8", LR="1e-2", GLOBAL_BATCH_SIZE="4", LOGGING_STEPS="1", GRADIENT_CHECKPOINTING="0")
    info = json.loads((out / "vlmtune_run.json").read_text())
    assert info["stage"] == "dpo" and info["init_run"] == str(sft.resolve()) and info["base_model"] == str(path)
    assert abs(history(out, "rewards/chosen")[1]) < 1e-4

    merge(out, tmp_path / "merged")
    expected = PeftModel.from_pretrained(PeftModel.from_pretrained(fresh_model(path), str(sft)).merge_and_unload(),
                                         str(out)).merge_and_unload()
    merged = fresh_model(tmp_path / "merged")
    batch = processor_ids(processor, budget, json.loads(PREFS.read_text())[0], "A red circle.")
    with torch.no_grad():
        diff = (merged(**batch).logits - expected(**batch).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.slow
def test_grpo_script_runs_as_is_on_cpu(tmp_path):
    out = tmp_path / "out"
    result = run(["bash", "scripts/finetune_grpo.sh", "--max_steps", "2", "--disable_tqdm", "True"],
                 OUTPUT_DIR=str(out))
    assert "[launch] device: CPU" in result.stdout and "sampling: HF generate (CPU)" in result.stderr
    assert sorted(history(out, "reward")) == [1, 2]
    assert (out / "completions.jsonl").is_file() and (out / "adapter_model.safetensors").is_file()
