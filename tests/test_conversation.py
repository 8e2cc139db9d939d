"""Token parity with the processor's own inference recipe, and assistant-only labels."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA_JSON, EXAMPLES, FAMILIES, THINKING_TEMPLATE_FAMILIES
from PIL import Image, ImageOps
from qwen_vl_utils import process_vision_info

from vlmtune.data.conversation import IGNORE_INDEX, content_parts

RAW = json.loads(DATA_JSON.read_text())


def reference_messages(raw: dict, budget) -> list[dict]:
    """The Qwen-VL inference recipe's messages for a raw record, written independently of vlmtune."""
    images = iter([raw["image"]] if isinstance(raw.get("image"), str) else raw.get("image", []))
    videos = iter([raw["video"]] if isinstance(raw.get("video"), str) else raw.get("video", []))
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = []
    for turn in raw["conversations"]:
        content = []
        text = turn["value"]
        while text:
            cut = min((text.find(p), p) for p in ("<image>", "<video>") if p in text) if (
                "<image>" in text or "<video>" in text) else (len(text), "")
            before, placeholder = text[: cut[0]], cut[1]
            if before:
                content.append({"type": "text", "text": before})
            if not placeholder:
                break
            if placeholder == "<image>":
                img = ImageOps.exif_transpose(Image.open(EXAMPLES / next(images)))
                content.append({"type": "image", "image": img, "min_pixels": budget.image_min_pixels,
                                "max_pixels": budget.image_max_pixels})
            else:
                content.append({"type": "video", "video": str(EXAMPLES / next(videos)), "fps": budget.fps,
                                "min_frames": budget.video_min_frames, "max_frames": budget.video_max_frames,
                                "min_pixels": budget.video_min_pixels, "max_pixels": budget.video_max_pixels})
            text = text[cut[0] + len(placeholder):]
            if text.startswith("\n"):
                text = text[1:]
        messages.append({"role": role[turn["from"]], "content": content})
    return messages


@pytest.mark.parametrize("family", FAMILIES)
def test_input_ids_match_the_processor_inference_recipe(pipeline, family):
    p = pipeline(family)
    assert len(p.dataset) == len(RAW)
    for raw, item in zip(RAW, (p.dataset[i] for i in range(len(p.dataset)))):
        messages = reference_messages(raw, p.budget)
        text = p.processor.apply_chat_template(messages, tokenize=False)
        images, videos, video_kwargs = process_vision_info(
            messages, return_video_kwargs=True, return_video_metadata=True, image_patch_size=p.family.patch_size
        )
        metadata = None
        if videos:
            videos, metadata = map(list, zip(*videos))
        expected = p.processor(text=[text], images=images, videos=videos, video_metadata=metadata,
                               return_tensors="pt", **video_kwargs)
        assert item["input_ids"].tolist() == expected["input_ids"][0].tolist(), raw["id"]
        assert item["mm_token_type_ids"].tolist() == expected["mm_token_type_ids"][0].tolist(), raw["id"]
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            assert (key in item) == (key in expected), (raw["id"], key)
            if key in item:
                torch.testing.assert_close(item[key], expected[key], msg=f"{raw['id']} {key}")


def test_rendered_text_of_a_record_is_the_chat_template(pipeline):
    p = pipeline("qwen2_vl")
    record = next(r for r in p.records if r.id == "system_prompt")
    assert p.conversation.text(record) == (
        "<|im_start|>system\nAnswer with one word.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Name the shape.<|im_end|>\n"
        "<|im_start|>assistant\nTriangle.<|im_end|>\n"
    )
    record = next(r for r in p.records if r.id == "text_only")
    assert p.conversation.text(record).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in THINKING_TEMPLATE_FAMILIES])
def test_labels_cover_exactly_the_assistant_replies(pipeline, family):
    # Qwen3.5's template inserts an empty think block before the last reply: what it labels is issue 8's section 4.
    p = pipeline(family)
    tok = p.processor.tokenizer
    for record, item in zip(p.dataset.records, (p.dataset[i] for i in range(len(p.dataset)))):
        labels, ids = item["labels"], item["input_ids"]
        assert labels.shape == ids.shape
        kept = labels != IGNORE_INDEX
        assert torch.equal(labels[kept], ids[kept])
        # the runs of labelled tokens, read off the mask
        edges = torch.diff(kept.int(), prepend=torch.tensor([0]), append=torch.tensor([0]))
        spans = list(zip(torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()))
        decoded = [tok.decode(ids[s:e]) for s, e in spans]
        replies = [m.text + "<|im_end|>" for m in record.messages if m.role == "assistant"]
        assert decoded == replies, record.id
        # each run starts right after the assistant header
        header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        assert all(ids[s - len(header):s].tolist() == header for s, _ in spans), record.id


def test_label_modes(pipeline):
    last = pipeline("qwen2_vl", "last_assistant")
    every = pipeline("qwen2_vl", "all")
    index = next(i for i, r in enumerate(last.dataset.records) if r.id == "multi_turn")
    tok = last.processor.tokenizer
    item = last.dataset[index]
    assert tok.decode(item["labels"][item["labels"] != IGNORE_INDEX]) == "It is blue.<|im_end|>"
    item = every.dataset[index]
    pads = {tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|video_pad|>")}
    for token, label in zip(item["input_ids"].tolist(), item["labels"].tolist()):
        assert label == (IGNORE_INDEX if token in pads else token)


@pytest.mark.parametrize("family", FAMILIES)
def test_lengths_known_without_decoding_equal_real_lengths(pipeline, family):
    p = pipeline(family)
    for i, record in enumerate(p.dataset.records):
        assert p.dataset.lengths[i] == len(p.dataset[i]["input_ids"]), record.id


def test_content_parts_split_placeholders_and_drop_the_llava_newline():
    assert content_parts("Image 1: <image>\nImage 2: <image>\nWhat?") == [
        {"type": "text", "text": "Image 1: "}, {"type": "image"},
        {"type": "text", "text": "Image 2: "}, {"type": "image"},
        {"type": "text", "text": "What?"},
    ]
    assert content_parts("Is <video> yellow?") == [
        {"type": "text", "text": "Is "}, {"type": "video"}, {"type": "text", "text": " yellow?"}]


def test_text_counts_hold_after_a_padded_truncated_call_of_the_tokenizer(tiny_model_dir):
    """The counts use the fast tokenizer's backend directly; a call that padded and truncated (as the processor's
    batches do) leaves that state in the backend, and it must not reach the counts."""
    from vlmtune.data.conversation import Conversation
    from vlmtune.data.records import Message, Record
    from vlmtune.model.load import load_processor

    processor = load_processor(str(tiny_model_dir()))
    record = Record(0, "r", [Message("user", "What shape is this?"), Message("assistant", "A red circle.")], [], [])
    messages = [{"role": "user", "content": [{"type": "text", "text": "What shape is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    expected = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    processor.tokenizer(["a", "a b c d"], padding="max_length", truncation=True, max_length=3)
    assert Conversation(processor).token_counts([record]) == [expected]
