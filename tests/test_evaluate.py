"""``vlmtune eval`` on the tiny model: --compare of the base model against a fine-tuned run, the files it writes,
and batched generation equal to one prompt at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA_JSON, EXAMPLES, FAMILIES
from test_predict import MAX_NEW, reference_reply

from vlmtune.cli import main as cli
from vlmtune.data.records import load_records
from vlmtune.generation import load_predictor, prompt_of

IMAGES = ("red_circle.png", "blue_square.png", "green_triangle.png")


@pytest.fixture(scope="module")
def base_run_and_data(tmp_path_factory, tiny_model_dir):
    """The tiny base model, a one-step LoRA run on it, and a split whose references are the base model's own
    greedy replies, generated with transformers + qwen-vl-utils alone."""
    from vlmtune.config import parse_train_args
    from vlmtune.stages.sft import train

    root = tmp_path_factory.mktemp("evaluate")
    base = tiny_model_dir("qwen2_vl")
    run = train(*parse_train_args([
        "--data_path", str(DATA_JSON), "--mode", "lora", "--tiny_family", "qwen2_vl", "--output_dir",
        str(root / "run"), "--max_steps", "1", "--per_device_train_batch_size", "2", "--learning_rate", "5e-2",
        "--lora_rank", "4", "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true",
    ]))
    records = []
    for i, name in enumerate(IMAGES):
        image = EXAMPLES / "images" / name
        reply = reference_reply(base, [{"type": "image", "image": str(image)},
                                       {"type": "text", "text": "What shape is in the picture?"}])
        assert reply, "the tiny model's reply is empty: pick another prompt"
        records.append({"id": f"r{i}", "image": str(image), "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is in the picture?"}, {"from": "gpt", "value": reply}]})
    data = root / "val.json"
    data.write_text(json.dumps(records))
    return base, run, data


def test_eval_compare_scores_both_models_and_writes_files(base_run_and_data, tmp_path, capsys):
    base, run, data = base_run_and_data
    out = tmp_path / "eval"
    assert cli(["eval", "--model", str(base), "--name", "base", "--compare", str(run), "--compare_name", "tuned",
                "--data", str(data), "--max_new_tokens", str(MAX_NEW), "--batch_size", "2",
                "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "metrics.json").read_text())
    assert result["records"] == 3 and set(result["models"]) == {"base", "tuned"}
    base_metrics = result["models"]["base"]["metrics"]
    # short references: exact match and ANLS; the base model's replies are its references
    assert list(base_metrics) == ["exact_match", "anls"]
    assert base_metrics["exact_match"] == {"score": 1.0, "n": 3}
    assert base_metrics["anls"] == {"score": 1.0, "n": 3}
    tuned = result["models"]["tuned"]["metrics"]
    for name in ("exact_match", "anls"):
        assert result["diff"][name] == pytest.approx(tuned[name]["score"] - base_metrics[name]["score"])

    refs = {r["id"]: r["conversations"][-1]["value"] for r in json.loads(data.read_text())}
    for file, label in (("predictions.jsonl", "base"), ("predictions_compare.jsonl", "tuned")):
        lines = [json.loads(line) for line in (out / file).read_text().splitlines()]
        assert [line["id"] for line in lines] == ["r0", "r1", "r2"]
        assert all(line["reference"] == refs[line["id"]] for line in lines)
        mean = sum(line["metrics"]["exact_match"] for line in lines) / 3
        assert result["models"][label]["metrics"]["exact_match"]["score"] == pytest.approx(mean)
        if label == "base":
            assert all(line["prediction"] == line["reference"] for line in lines)
    # the fine-tuned run moved: its replies differ, and the table and the disagreements say so
    tuned_lines = [json.loads(line) for line in (out / "predictions_compare.jsonl").read_text().splitlines()]
    assert any(line["prediction"] != line["reference"] for line in tuned_lines)
    assert result["disagreements"] and result["disagreements"][0]["metric"] == "exact_match"
    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "base", "tuned", "diff", "n"]
    assert "where they disagree most (exact_match)" in printed


def test_eval_rejects_unknown_metrics(base_run_and_data, capsys):
    base, _, data = base_run_and_data
    assert cli(["eval", "--model", str(base), "--data", str(data), "--metrics", "exact,anls"]) == 1
    assert "unknown metric(s) exact" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_equals_one_prompt_at_a_time(family, tiny_model_dir):
    predictor = load_predictor(str(tiny_model_dir(family)), max_new_tokens=MAX_NEW)
    records = load_records(DATA_JSON, EXAMPLES, budget=predictor.budget, min_image_side=predictor.family.factor)
    prompts = [prompt_of(r) for r in records]  # text, image, several images, video, both: lengths differ
    assert predictor.replies(prompts, batch_size=5, progress=False) == [predictor.reply(p) for p in prompts]


def test_prediction_lines_name_images_as_the_records_do(tmp_path):
    """A local image is named by its absolute path; a data: URI and a table cell stay as the record gives them
    (made absolute, they named files that do not exist)."""
    import dataclasses

    from vlmtune.generation import Scores, prediction_lines

    record = next(r for r in load_records(DATA_JSON, EXAMPLES) if r.images)
    uri = "data:image/png;base64,iVBORw0KGgo="
    cell = "table:" + str(tmp_path / "data.parquet") + "#0/image"
    record = dataclasses.replace(record, images=[record.images[0], uri, cell])
    (line,) = prediction_lines([record], ["a reply"], Scores([], [{}], {}, [[]]))
    assert Path(line["images"][0]).is_absolute() and Path(line["images"][0]).is_file()
    assert line["images"][1:] == [uri, cell]
