"""Continued pre-training (``vlmtune train --stage cpt``): documents without a chat, every text token trained, the
processor's own ids; packing, the store, bad input, and a run of scripts/finetune_cpt.sh on a base model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import forkserver
import pytest
import torch
from conftest import EXAMPLES, ROOT

from vlmtune.data import media
from vlmtune.data.records import read_records

DOCS = EXAMPLES / "documents.json"
PYTHON = sys.executable
RED = "images/red_circle.png"


# ---------------------------------------------------------------- the processor's own ids


def independent_encoding(processor, budget, raw: dict):
    """The processor called directly on the document written out here: media first when the text has no tags,
    each tag replaced by the vision tokens, no BOS (Qwen tokenizers have none), <|endoftext|> at the end."""
    images = raw.get("image", [])
    images = [images] if isinstance(images, str) else images
    videos = raw.get("video", [])
    videos = [videos] if isinstance(videos, str) else videos
    text = raw["text"]
    if "<image>" not in text and "<video>" not in text:
        text = "<image>" * len(images) + "<video>" * len(videos) + text
    text = text.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>").replace(
        "<video>", "<|vision_start|><|video_pad|><|vision_end|>") + "<|endoftext|>"
    loaded = [media.load_video(EXAMPLES / v, budget) for v in videos]
    encoded = processor(text=[text], images=[media.load_image(EXAMPLES / p, budget) for p in images] or None,
                        videos=[v for v, _ in loaded] or None, video_metadata=[m for _, m in loaded] or None,
                        do_resize=False, do_sample_frames=False, return_tensors="pt")
    return encoded, text


def cpt_dataset(path, processor, family, budget):
    from vlmtune.data.check import check_data
    from vlmtune.data.dataset import VisionLanguageDataset
    from vlmtune.data.document import Document

    document = Document(processor)
    result = check_data(str(path), processor, family, budget, image_folder=str(EXAMPLES), conversation=document,
                        stage="cpt")
    assert result.errors == [], result.summary()
    return result, VisionLanguageDataset(result.records, processor, family, budget, document, None, False,
                                         result.lengths)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])  # Qwen3-VL: <t seconds> stamps in videos
def test_labels_are_the_documents_tokens_from_the_processor(tiny_model_dir, family):
    """Every example document (caption, interleaved images, video, text only, image + video): the item's ids are
    the processor's ids for the document written out by hand, its labels those ids with -100 exactly at the vision
    pads, the up-front length (from the data store) the item's length, and the labelled tokens decode to the text
    with the tags as vision start / end tokens and <|endoftext|>."""
    from vlmtune.model.load import load_family, load_processor

    path = tiny_model_dir(family)
    processor, fam = load_processor(str(path)), load_family(str(path))
    budget = media.budget_from_processor(processor, fam.factor)
    raw = {r["id"]: r for r in json.loads(DOCS.read_text())}
    result, dataset = cpt_dataset(DOCS, processor, fam, budget)
    assert result.store is not None and [r.id for r in dataset.records] == list(raw)
    tok = processor.tokenizer
    assert tok.bos_token is None
    pads = {tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|video_pad|>")}
    for i, record in enumerate(dataset.records):
        item, (want, text) = dataset[i], independent_encoding(processor, budget, raw[record.id])
        ids = want["input_ids"][0]
        assert torch.equal(item["input_ids"], ids), record.id
        expected = torch.where(torch.isin(ids, torch.tensor(sorted(pads))), -100, ids)
        assert torch.equal(item["labels"], expected), record.id
        assert bool((item["labels"] == -100).any()) == bool(record.images or record.videos)
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids"):
            if key in want:
                got = item[key] if key != "mm_token_type_ids" else item[key][None]
                assert torch.equal(got, want[key]), (record.id, key)
        assert dataset.lengths[i] == len(ids), record.id
        if not record.videos:  # (a video's labelled tokens hold Qwen3-VL's timestamps too)
            labelled = tok.decode(item["labels"][item["labels"] != -100], skip_special_tokens=False)
            assert labelled == text.replace("<|image_pad|>", ""), record.id


def test_packed_documents_train_as_they_do_alone(tiny_model_dir):
    """Packing (M-RoPE positions per record, as SFT): the summed token loss of the documents packed into rows
    equals the sum over each document run alone."""
    from transformers import AutoModelForImageTextToText

    from vlmtune.data.collator import Collator
    from vlmtune.data.packing import PackedCollator, PackedDataset, RopeIndex
    from vlmtune.model import packing as model_packing
    from vlmtune.model.load import load_family, load_processor

    path = tiny_model_dir("qwen2_vl")
    processor, fam = load_processor(str(path)), load_family(str(path))
    budget = media.budget_from_processor(processor, fam.factor)
    _, dataset = cpt_dataset(DOCS, processor, fam, budget)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    model_packing.prepare_model(model)
    packed = PackedDataset(dataset, max_seq_length=128)
    assert len(packed) < len(dataset)

    def summed(batch):
        with torch.no_grad():
            out = model(**batch)
        return float(out.loss) * int((batch["labels"][..., 1:] != -100).sum())

    pad = processor.tokenizer.pad_token_id
    got = summed(PackedCollator(pad, RopeIndex(model.config))([packed[i] for i in range(len(packed))]))
    want = sum(summed(Collator(pad)([dataset[i]])) for i in range(len(dataset)))
    assert got == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------- bad input

BAD = [
    ({"id": "b", "image": RED}, "'text' is missing; a CPT record holds its document in 'text'"),
    ({"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
     "this is chat data: train it with `vlmtune train`, --stage sft"),
    ({"id": "b", "text": ["A circle."]}, "'text' must be a string (the document), got list"),
    ({"id": "b", "image": RED, "text": "  "}, "'text' is empty"),
    ({"id": "b", "text": "A <|im_start|> circle."}, "'text' contains the reserved token(s) ['<|im_start|>']"),
    ({"id": "b", "image": [RED, RED], "text": "One <image> circle."}, "1 <image> tag(s) in 'text' but 2 image(s)"),
    ({"id": "b", "video": "videos/ball_left.mp4", "text": "A <image> ball."}, "1 <image> tag(s) in 'text' but 0"),
    ({"id": "b", "image": "images/missing.png", "text": "A circle."}, "images/missing.png"),
]


@pytest.mark.parametrize(("record", "fragment"), BAD, ids=[f"cpt-{i}" for i in range(len(BAD))])
def test_bad_documents_get_one_clear_error_naming_file_record_and_id(tmp_path, record, fragment):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"id": "fine", "text": "Fine."}, record]))
    records, problems = read_records(path, EXAMPLES, stage="cpt")
    errors = [p.format(path) for p in problems if p.level == "error"]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}: record 1 (id 'b'): ") and fragment in errors[0], errors[0]
    assert [r.id for r in records] == ["fine"]


def test_cpt_warns_of_unknown_keys_and_sft_hints_at_cpt(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"id": "a", "text": "Fine.", "caption": "x"}]))
    _, problems = read_records(path, stage="cpt")
    assert [p.level for p in problems] == ["warning"] and "unknown key 'caption'" in problems[0].message
    _, problems = read_records(path, stage="sft")
    assert any("documents ('text', no chat) train with `vlmtune train --stage cpt`" in p.message for p in problems)


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--stage", "cpt", "--label_mode", "all"],
     "--label_mode: chat options, but --stage cpt trains documents without a chat template"),
    (["train", "--stage", "cpt", "--enable_thinking", "False", "--eval_generate", "True", "--val_ratio", "0.5"],
     "--enable_thinking, --eval_generate: chat options"),
    (["dpo", "--stage", "cpt"], "--stage cpt is for `vlmtune train`; vlmtune dpo trains its own stage"),
])
def test_contradicting_flags_stop_with_one_line(argv, message, capsys):
    from vlmtune.cli import main

    assert main([*argv, "--data_path", str(DOCS), "--use_cpu", "True"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# ---------------------------------------------------------------- the script on a base model


def base_model(tmp_path, tiny_model_dir):
    """The tiny model as a base (not Instruct) checkpoint ships: no chat template, <|endoftext|> as its EOS."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("qwen2_vl"), base)
    for name in ("chat_template.jinja", "chat_template.json"):
        (base / name).unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "processor_config.json"):
        if (base / name).is_file():
            config = json.loads((base / name).read_text())
            config.pop("chat_template", None)
            if name == "tokenizer_config.json":
                config["eos_token"] = "<|endoftext|>"
            (base / name).write_text(json.dumps(config))
    return base


@pytest.mark.slow
def test_cpt_script_on_a_base_model_with_packing_then_merge(tmp_path, tiny_model_dir):
    """scripts/finetune_cpt.sh on a base model (no chat template), packed documents: the loss falls, the run
    folder says cpt, and `vlmtune merge` folds its adapters like any run."""
    from transformers import AutoProcessor

    base = base_model(tmp_path, tiny_model_dir)
    assert not AutoProcessor.from_pretrained(base).chat_template
    docs = json.loads(DOCS.read_text()) * 4
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MODEL_NAME": str(base), "DATA_PATH": str(tmp_path / "docs.json"),
           "IMAGE_FOLDER": str(EXAMPLES), "OUTPUT_DIR": str(out), "LR": "1e-2", "GLOBAL_BATCH_SIZE": "4",
           "BATCH_PER_DEVICE": "4", "LOGGING_STEPS": "1", "MAX_SEQ_LENGTH": "256", "GRADIENT_CHECKPOINTING": "0"}
    result = subprocess.run(["bash", "scripts/finetune_cpt.sh", "--max_steps", "6", "--disable_tqdm", "True",
                             "--save_strategy", "no", "--lora_rank", "16", "--lr_scheduler_type", "constant"],
                            cwd=ROOT, env=forkserver.script_env(env), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "packing:" in result.stderr and "no BOS" in result.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]) - 0.5, losses
    info = json.loads((out / "vlmtune_run.json").read_text())
    assert info["stage"] == "cpt" and info["base_model"] == str(base)
    merged = forkserver.run([PYTHON, "-m", "vlmtune.cli", "merge", str(out), str(tmp_path / "merged")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
