"""The chat template filled per conversation shape (issue 21): the text the processor's own template writes for
every record, whatever its texts hold, and no filling where the template looks into the texts."""

from __future__ import annotations

import pytest
from test_conversation import reference_messages

from vlmtune.data import media
from vlmtune.data.conversation import Conversation
from vlmtune.data.records import Message, Record
from vlmtune.families import FAMILIES
from vlmtune.model.load import load_processor

IMAGE = "images/blue_square.png"
TRICKY = ["plain words", " spaces at both ends ", "\nnewline first", "quotes \" ' and \\backslash",
          "<think>\nR\n</think>\n\nA", "{{ braces }} {% raw %}", "é \u00a0 non-ASCII\t", "end\n"]


def raw_records() -> list[dict]:
    out = []
    for i, text in enumerate(TRICKY):
        out.append({"id": f"q{i}", "image": IMAGE, "conversations": [
            {"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": TRICKY[-1 - i]}]})
        out.append({"id": f"t{i}", "conversations": [
            {"from": "system", "value": text}, {"from": "human", "value": "First?"}, {"from": "gpt", "value": text},
            {"from": "human", "value": f"{text}<image>{text}"}, {"from": "gpt", "value": "B"}], "image": IMAGE})
    return out


def as_record(index: int, raw: dict) -> Record:
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return Record(index, raw["id"], [Message(role[t["from"]], t["value"]) for t in raw["conversations"]], [IMAGE])


@pytest.mark.parametrize("template", ["tiny", "looks_into_text"])
def test_filled_texts_are_the_templates_own(tiny_model_dir, template):
    processor = load_processor(str(tiny_model_dir()))
    budget = media.budget_from_processor(processor, FAMILIES["qwen2_vl"].factor)
    if template == "looks_into_text":  # a template that trims texts: must be rendered per record
        processor = type(processor)(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                    video_processor=processor.video_processor,
                                    chat_template=processor.chat_template.replace("part['text']",
                                                                                  "part['text'] | trim"))
    raws = raw_records()
    conversation = Conversation(processor)
    texts = [rendered.text for rendered in conversation.render_many([as_record(i, r) for i, r in enumerate(raws)])]
    assert conversation._fills is (template == "tiny")
    if template == "tiny":  # every shape was filled, none fell back to rendering
        assert conversation._skeletons and all(s is not None for s in conversation._skeletons.values())
    for raw, text in zip(raws, texts):
        expected = processor.apply_chat_template(reference_messages(raw, budget), tokenize=False)
        assert text == expected, raw["id"]
