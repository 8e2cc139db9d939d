"""``vlmtune predict``: replies for image, video and text prompts, training-identical prompts, JSONL over data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DATA_JSON, EXAMPLES
from PIL import Image, ImageOps
from qwen_vl_utils import process_vision_info

from vlmtune.cli import main as cli
from vlmtune.data.dataset import VisionLanguageDataset
from vlmtune.merge import merge
from vlmtune.predict import load_predictor, prompt_of

IMAGE = EXAMPLES / "images" / "red_circle.png"
VIDEO = EXAMPLES / "videos" / "ball_right.mp4"
MAX_NEW = 6


@pytest.fixture(scope="module")
def run_and_merged(tmp_path_factory, tiny_model_dir):
    """A tiny lora_vision run (one step at a high rate, weights moved) and its merged folder."""
    from vlmtune.config import parse_train_args
    from vlmtune.stages.sft import train

    root = tmp_path_factory.mktemp("predict")
    run = train(*parse_train_args([
        "--data_path", str(DATA_JSON), "--mode", "lora_vision", "--tiny_family", "qwen2_vl", "--output_dir",
        str(root / "run"), "--max_steps", "1", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
        "--lora_rank", "4", "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true",
    ]))
    merged = merge(run, root / "merged").output_dir
    return run, merged


def reference_reply(model_dir: Path, content: list[dict]) -> str:
    """Greedy reply written from transformers and qwen-vl-utils alone (the Qwen-VL inference recipe)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True,
                                                       return_video_metadata=True, image_patch_size=14)
    metadata = None
    if videos:
        videos, metadata = map(list, zip(*videos))
    inputs = processor(text=[text], images=images, videos=videos, video_metadata=metadata, return_tensors="pt",
                       **video_kwargs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def budget_keys(model_dir: Path) -> dict:
    predictor = load_predictor(str(model_dir))
    b = predictor.budget
    return {"image": {"min_pixels": b.image_min_pixels, "max_pixels": b.image_max_pixels},
            "video": {"fps": b.fps, "min_frames": b.video_min_frames, "max_frames": b.video_max_frames,
                      "min_pixels": b.video_min_pixels, "max_pixels": b.video_max_pixels}}


@pytest.mark.parametrize("kind", ["image", "video", "text"])
def test_predict_prints_the_greedy_reply(run_and_merged, capsys, kind):
    _, merged = run_and_merged
    prompt = {"image": "What shape is in the picture?", "video": "Where does the ball move?",
              "text": "Say hello."}[kind]
    media_args = {"image": ["--image", str(IMAGE)], "video": ["--video", str(VIDEO)], "text": []}[kind]
    assert cli(["predict", "--model", str(merged), "--prompt", prompt, "--max_new_tokens", str(MAX_NEW),
                *media_args]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed and printed[-1].strip()

    keys = budget_keys(merged)
    media_part = {"image": [{"type": "image", "image": ImageOps.exif_transpose(Image.open(IMAGE)), **keys["image"]}],
                  "video": [{"type": "video", "video": str(VIDEO), **keys["video"]}], "text": []}[kind]
    assert printed[-1] == reference_reply(merged, media_part + [{"type": "text", "text": prompt}])


def test_adapter_run_predicts_what_the_merged_model_predicts(run_and_merged, capsys):
    run, merged = run_and_merged
    args = ["--image", str(IMAGE), "--prompt", "What shape?", "--max_new_tokens", str(MAX_NEW)]
    assert cli(["predict", "--model", str(merged), *args]) == 0
    from_merged = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli(["predict", "--model", str(run), *args]) == 0  # a training output: base + adapters
    assert capsys.readouterr().out.strip().splitlines()[-1] == from_merged


def test_prompt_ids_are_the_training_ids_up_to_the_reply(run_and_merged, pipeline):
    """For every example record, the prediction prompt is the training item's tokens before the last reply."""
    _, merged = run_and_merged
    predictor = load_predictor(str(merged))
    p = pipeline("qwen2_vl")
    for i, record in enumerate(p.dataset.records):
        train_ids = p.dataset[i]["input_ids"].tolist()
        prompt = VisionLanguageDataset([prompt_of(record)], predictor.processor, predictor.family,
                                       predictor.budget, predictor.conversation)[0]["input_ids"].tolist()
        reply = p.processor.tokenizer.encode(record.messages[-1].text + "<|im_end|>\n", add_special_tokens=False)
        assert prompt + reply == train_ids, record.id


def test_predict_over_data_writes_one_jsonl_line_per_record(run_and_merged, tmp_path, capsys):
    _, merged = run_and_merged
    out = tmp_path / "preds" / "out.jsonl"
    assert cli(["predict", "--model", str(merged), "--data", str(DATA_JSON), "--output", str(out),
                "--max_new_tokens", "3"]) == 0
    raw = json.loads(DATA_JSON.read_text())
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(raw)
    for line, rec in zip(lines, raw):
        assert set(line) == {"id", "prompt", "reference", "prediction"}
        assert line["id"] == rec["id"]
        assert line["reference"] == rec["conversations"][-1]["value"]
        assert line["prompt"] == rec["conversations"][-2]["value"]
        assert isinstance(line["prediction"], str)
    assert f"{len(raw)} predictions written to {out}" in capsys.readouterr().out


def test_predict_user_mistakes_are_one_line_errors(run_and_merged, tmp_path, capsys):
    _, merged = run_and_merged
    assert cli(["predict", "--model", str(merged), "--prompt", "<image> and <image>", "--image", str(IMAGE)]) == 1
    assert "2 <image>" in capsys.readouterr().err
    assert cli(["predict", "--model", str(merged), "--prompt", "hi", "--image", str(tmp_path / "no.png")]) == 1
    assert "--image" in (line := capsys.readouterr().err.splitlines()[-1]) and "no.png does not exist" in line
    assert cli(["predict", "--model", str(tmp_path / "nothing"), "--prompt", "hi"]) == 1
    assert "does not exist" in capsys.readouterr().err.splitlines()[-1]
