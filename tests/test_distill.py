"""Distillation: the loss against independent forwards of teacher and student, the tokenizer check, and a student
learning a tiny teacher's distributions (off- and on-policy) on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA_JSON
from test_stages import history, mean, perturb, run, stage_cli, train_args
from trl.trainer.utils import disable_dropout_in_model

from vlmtune.config import ModeArguments
from vlmtune.stage_config import DistillArguments

RECORDS = ("single_red_circle", "video_ball_right", "text_only", "multi_turn")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """The tiny model with twice the layers (its own random weights): same tokenizer and vision tokens."""
    from vlmtune.testing.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher"), seed=0, text_overrides={"num_hidden_layers": 4})


def by_hand(student_logits, teacher_logits, labels, beta: float, temperature: float) -> tuple[list[float], list]:
    """Per labelled token: the divergence written out from the two softmaxes, and -log p_student(label)."""
    divs, ces = [], []
    for t in range(len(labels) - 1):
        if labels[t + 1] == -100:
            continue
        s = torch.log_softmax(student_logits[t].double() / temperature, -1)
        q = torch.log_softmax(teacher_logits[t].double() / temperature, -1)
        if beta == 0:
            div = (q.exp() * (q - s)).sum()
        elif beta == 1:
            div = (s.exp() * (s - q)).sum()
        else:
            m = torch.log(beta * q.exp() + (1 - beta) * s.exp())
            div = beta * (q.exp() * (q - m)).sum() + (1 - beta) * (s.exp() * (s - m)).sum()
        divs.append(float(div))
        ces.append(-float(torch.log_softmax(student_logits[t].double(), -1)[labels[t + 1]]))
    return divs, ces


def test_distill_loss_equals_one_from_independent_forwards(pipeline, teacher_dir, tmp_path):
    """A mixed batch (image, video, text, multi-turn): the trainer's loss equals the token mean of the divergence
    computed here from each record's own forward of student and teacher (no padding, no batching), for forward KL,
    reverse KL and JSD, with and without the CE term; the teacher gets no gradient."""
    from transformers import AutoModelForImageTextToText

    from vlmtune.data.collator import Collator
    from vlmtune.model import modes
    from vlmtune.stages import reference as ref
    from vlmtune.stages.distill import DistillTrainer

    pipe = pipeline()
    dataset = pipe.dataset
    picked = [i for i, r in enumerate(pipe.records) if r.id in RECORDS]
    items = [dataset[i] for i in picked]
    args = ModeArguments(mode="lora", lora_rank=8)
    student = modes.apply_plan(pipe.model(), pipe.family, modes.plan_from_args(args), args)
    disable_dropout_in_model(student)
    perturb(student, "lora_B", 0.05, 1)
    teacher = ref.frozen_copy(AutoModelForImageTextToText.from_pretrained(teacher_dir))
    model_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                  "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")
    forwards = []
    with torch.no_grad():
        for item in items:
            inputs = {k: (v[None] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                      for k, v in item.items() if k in model_keys}
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            forwards.append((student(**inputs).logits[0], teacher(**inputs).logits[0], item["labels"]))
    batch = Collator(pipe.processor.tokenizer.pad_token_id)(items)

    for beta, temperature, ce_weight in [(0.0, 1.0, 0.0), (1.0, 2.0, 0.0), (0.5, 1.0, 0.3)]:
        trainer = DistillTrainer(model=student, args=train_args(tmp_path), train_dataset=dataset,
                                 data_collator=lambda x: {"items": x}, processing_class=pipe.processor,
                                 family=pipe.family, run_info={},
                                 distill=DistillArguments(teacher="t", beta=beta, temperature=temperature,
                                                          ce_weight=ce_weight), teacher=teacher)
        divs, ces = [], []
        for s, q, labels in forwards:
            d, c = by_hand(s, q, labels, beta, temperature)
            divs += d
            ces += c
        loss = trainer.compute_loss(student, dict(batch))
        assert loss.item() == pytest.approx(mean(divs) + ce_weight * mean(ces), rel=1e-4), (beta, temperature)
        logged = {k: v[-1] for k, v in trainer._metrics["train" if student.training else "eval"].items()}
        assert logged["distill/kl"] == pytest.approx(mean(divs), rel=1e-4)
        assert mean(divs) > 1e-3
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for n, p in student.named_parameters() if "lora_" in n)


def test_prompt_end_is_the_start_of_the_last_reply():
    from vlmtune.stages.distill import prompt_end

    assert prompt_end(torch.tensor([-100, -100, 5, 6, -100, -100, 7, 8, -100])) == 6
    assert prompt_end(torch.tensor([-100, 3, 4])) == 1


@pytest.mark.slow
def test_student_learns_the_teachers_distribution_on_and_off_policy(teacher_dir, tmp_path):
    """The tiny student distils the 4-layer teacher on the example records, half the steps on its own samples
    (GKD): the KL to the teacher falls on the off-policy steps, and on-policy steps run and log theirs."""
    out = tmp_path / "out"
    run(stage_cli("distill", "--teacher", str(teacher_dir), "--data_path", str(DATA_JSON), "--output_dir", str(out),
                  "--max_steps", "14", "--per_device_train_batch_size", "4", "--learning_rate", "2e-2",
                  "--lora_rank", "16", "--lora_alpha", "32", "--lr_scheduler_type", "constant", "--seed", "0",
                  "--lmbda", "0.3", "--max_new_tokens", "6", "--save_strategy", "no"))
    kl, on_policy = history(out, "distill/kl"), history(out, "distill/on_policy")
    assert sorted(kl) == list(range(1, 15)) and all(v >= 0 for v in kl.values())
    off = [kl[s] for s in sorted(kl) if on_policy[s] == 0]
    assert 0 < sum(on_policy.values()) < 14 and len(off) >= 6, on_policy
    assert mean(off[-3:]) < 0.85 * mean(off[:3]), off  # measured: 0.57 over the first 3 off-policy steps, 0.41 last
    assert json.loads((out / "vlmtune_run.json").read_text())["stage"] == "distill"


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(tmp_path, tiny_model_dir, capsys):
    """Teacher checks and flags, each one line before any training: another tokenizer, a missing folder, no
    --teacher, a --beta outside [0, 1]."""
    from vlmtune.cli import main
    other = tiny_model_dir("qwen3_vl")  # its own tokens (<think>) and 16-pixel patches
    student = tiny_model_dir("qwen2_vl")
    cases = [(["--teacher", str(other)], f"--teacher {other} does not share the run's vision token scheme"),
             (["--teacher", str(tmp_path / "nope")], "does not exist"),
             ([], "--teacher is required"),
             (["--teacher", str(other), "--beta", "2"], "--beta and --lmbda must be in [0, 1]")]
    for extra, fragment in cases:
        code = main(["distill", "--model_name_or_path", str(student), "--data_path", str(DATA_JSON), "--use_cpu",
                     "True", "--report_to", "none", "--max_steps", "1", "--output_dir", str(tmp_path / "out"), *extra])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlmtune ")]
        assert code == 1 and len(err) == 1 and fragment in err[0], (extra, err)


def linear_kinds(model) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}


@pytest.mark.slow
def test_an_8bit_teacher_is_llm_int8_outside_the_skip_modules_and_close_to_16_bits(pipeline, teacher_dir, tmp_path):
    """--teacher_bits 8: the language model's Linear layers are bitsandbytes' Linear8bitLt, the vision tower and the
    LM head plain Linear; frozen, eval mode; its logits equal those of the folder loaded here by transformers with a
    BitsAndBytesConfig, and stay close to the 16-bit teacher's (LLM.int8's rounding of the weights and activations);
    its parameters hold fewer bytes than the bf16 teacher's."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from vlmtune.stages.distill import load_teacher, parameter_bytes

    teacher = load_teacher(str(teacher_dir), train_args(tmp_path, bf16=True), bits=8)  # a bf16 run's teacher
    kinds = linear_kinds(teacher)
    skipped = {n for n in kinds if n.startswith("model.visual.") or n == "lm_head"}
    assert skipped and all(kinds[n] == "Linear" for n in skipped), kinds
    assert len(kinds) > len(skipped) and all(kinds[n] == "Linear8bitLt" for n in set(kinds) - skipped), kinds
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["model.visual", "lm_head"])
    reference = AutoModelForImageTextToText.from_pretrained(teacher_dir, dtype=torch.bfloat16, device_map={"": "cpu"},
                                                            quantization_config=config).eval()
    bf16 = AutoModelForImageTextToText.from_pretrained(teacher_dir, dtype=torch.bfloat16).eval()
    pipe = pipeline()
    item = next(pipe.dataset[i] for i, r in enumerate(pipe.records) if r.id == "single_red_circle")
    inputs = {k: (v[None] if k in ("input_ids", "mm_token_type_ids") else v) for k, v in item.items()
              if k in ("input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")}
    with torch.no_grad():
        int8, ref8, half = (m(**inputs).logits[0].float() for m in (teacher, reference, bf16))
    assert torch.equal(int8, ref8), (int8 - ref8).abs().max()
    error = ((int8 - half).abs().max() / half.abs().max()).item()
    kl = torch.nn.functional.kl_div(int8.log_softmax(-1), half.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()  # KL(bf16 || int8) per token
    # measured: 0.045 and 0.0004 (the student-teacher KL of this toy task starts near 0.5); bytes 453,456 vs 600,912
    assert 0 < error < 0.1 and kl < 0.005, (error, kl)
    assert parameter_bytes(teacher) < parameter_bytes(bf16)


@pytest.mark.slow
def test_one_distill_step_with_an_8bit_teacher_logs_the_kl(teacher_dir, tiny_model_dir, tmp_path):
    """A distillation step through the CLI with --teacher_bits 8 runs and logs distill/kl."""
    from vlmtune.cli import main

    out = tmp_path / "out"
    code = main(["distill", "--model_name_or_path", str(tiny_model_dir("qwen2_vl")), "--teacher", str(teacher_dir),
                 "--teacher_bits", "8", "--data_path", str(DATA_JSON), "--image_folder", str(DATA_JSON.parent),
                 "--use_cpu", "True", "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1",
                 "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no",
                 "--output_dir", str(out)])
    assert code == 0
    kl = history(out, "distill/kl")
    assert list(kl) == [1] and kl[1] > 0, kl


def test_an_8bit_teacher_is_refused_where_it_cannot_apply(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """--teacher_bits 8, each one line before anything loads: a MoE teacher, a LoRA training output, --deepspeed,
    bitsandbytes not importable."""
    import sys

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlmtune.cli import main

    student = tiny_model_dir("qwen2_vl")
    lora_run = tmp_path / "lora_run"
    peft_model = get_peft_model(AutoModelForImageTextToText.from_pretrained(student),
                                LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(lora_run)
    (lora_run / "vlmtune_run.json").write_text(json.dumps({"base_model": str(student)}))
    moe = tiny_model_dir("qwen3_vl_moe")
    cases = [(["--teacher", str(moe)], "MoE experts"),
             (["--teacher", str(lora_run)], "merge it first with vlmtune merge"),
             (["--teacher", str(student), "--deepspeed", str(DATA_JSON.parents[1] / "scripts" / "zero2.json")],
              "and --deepspeed"),
             (["--teacher", str(student), "no bitsandbytes"], "bitsandbytes is not importable")]
    for extra, fragment in cases:
        if "no bitsandbytes" in extra:
            extra = extra[:-1]
            monkeypatch.setitem(sys.modules, "bitsandbytes", None)
        code = main(["distill", "--model_name_or_path", str(student), "--data_path", str(DATA_JSON), "--use_cpu",
                     "True", "--report_to", "none", "--max_steps", "1", "--output_dir", str(tmp_path / "out"),
                     "--teacher_bits", "8", *extra])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlmtune ")]
        assert code == 1 and len(err) == 1 and fragment in err[0], (extra, err)
        assert not (tmp_path / "out").exists()
