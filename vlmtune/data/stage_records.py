"""What preference (DPO) and prompt (GRPO) records add to a conversation: the replies, the reward fields; and the
text of a document (CPT), which has no conversation."""

from __future__ import annotations

import json

from vlmtune.data.schema import IMAGE_PLACEHOLDER, KNOWN_KEYS, ROLES, VIDEO_PLACEHOLDER, Message
from vlmtune.families.base import SPECIAL_TOKENS

_REPLY_KEYS = ("chosen", "rejected")


def stage_hint(key: str, stage: str) -> str:
    if stage == "sft" and key in _REPLY_KEYS:
        return "; preference data (chosen / rejected) trains with `vlmtune dpo`"
    if stage == "sft" and key == "text":
        return "; documents ('text', no chat) train with `vlmtune train --stage cpt`"
    return ""


def document_text(raw: dict, images: list | None, videos: list | None, err) -> str | None:
    """A CPT record's text with one placeholder per medium: as written where it places its media with <image> /
    <video> tags, else with every image, then every video, before the text (an image and its caption)."""
    text = raw.get("text")
    if text is None:
        hint = " (this is chat data: train it with `vlmtune train`, --stage sft)" if "conversations" in raw else ""
        err(f"'text' is missing; a CPT record holds its document in 'text', with <image> / <video> where the media "
            f"go{hint}")
        return None
    if not isinstance(text, str):
        err(f"'text' must be a string (the document), got {type(text).__name__}")
        return None
    if not text.strip():
        err("'text' is empty; write the document or drop the record")
        return None
    reserved = [tok for tok in SPECIAL_TOKENS if tok in text] if "<|" in text else None
    if reserved:
        err(f"'text' contains the reserved token(s) {reserved}; remove them (write <image> / <video> where the "
            "media go)")
        return None
    if images is None or videos is None:
        return None
    counts = {kind: text.count(tag) for kind, tag in (("image", IMAGE_PLACEHOLDER), ("video", VIDEO_PLACEHOLDER))}
    if not any(counts.values()):
        return IMAGE_PLACEHOLDER * len(images) + VIDEO_PLACEHOLDER * len(videos) + text
    for kind, files in (("image", images), ("video", videos)):
        if counts[kind] != len(files):
            err(f"{counts[kind]} <{kind}> tag(s) in 'text' but {len(files)} {kind}(s); put one <{kind}> where each "
                f"{kind} goes (or none at all: the media then come before the text)")
            return None
    return text


def _reply_text(key: str, value, err) -> str | None:
    """A preference reply: a string, or a turn object ``{"from": "gpt", "value": ...}``; None (and an error)."""
    if isinstance(value, dict):
        role_name = value.get("from", value.get("role"))
        if role_name is not None and ROLES.get(role_name) != "assistant":
            err(f"'{key}' is a turn from {role_name!r}; a reply comes from 'gpt' (or give the text as a string)")
            return None
        value = value.get("value", value.get("content"))
        if not isinstance(value, str):
            err(f"'{key}' turn: 'value' must be a string, got {type(value).__name__}")
            return None
    if not isinstance(value, str):
        err(f"'{key}' must be the reply as a string (or a {{\"from\": \"gpt\", \"value\": ...}} turn), "
            f"got {type(value).__name__}")
        return None
    if not value.strip():
        err(f"'{key}' is an empty reply; write the reply or drop the record")
        return None
    reserved = [tok for tok in SPECIAL_TOKENS if tok in value] if "<|" in value else None
    if reserved:
        err(f"'{key}' contains the reserved token(s) {reserved}; remove them")
        return None
    if IMAGE_PLACEHOLDER in value or VIDEO_PLACEHOLDER in value:
        err(f"'{key}' contains an <image> / <video> placeholder; media belong in the human turns")
        return None
    return value


def stage_parts(raw: dict, stage: str, messages: list[Message], names: list, err) -> dict:
    """The ``Record`` fields a stage adds: ``chosen`` and ``rejected`` (DPO), ``fields`` (GRPO).

    A GRPO record whose conversation ends with a gpt turn (as in Qwen2-VL-Finetune's GRPO data) has that turn
    taken out of the prompt as its ``answer`` field.
    """
    if stage == "dpo":
        parts = {}
        for key in _REPLY_KEYS:
            if key not in raw:
                err(f"'{key}' is missing; a preference record gives the better reply in 'chosen' and the worse "
                    "in 'rejected'")
            else:
                parts[key] = _reply_text(key, raw[key], err)
        if len(parts) == 2 and None not in parts.values() and parts["chosen"].strip() == parts["rejected"].strip():
            err("'chosen' and 'rejected' are the same reply; a preference pair needs two different replies")
        return parts
    if stage != "grpo":
        return {}
    fields = {k: v for k, v in raw.items() if k not in KNOWN_KEYS}
    if len(messages) >= 2 and messages[-1].role == "assistant":
        if "answer" in fields:
            err("the conversation ends with a gpt turn and the record has an 'answer': a GRPO record's "
                "conversation ends with the prompt; keep the gold answer in 'answer' only")
        names.pop()
        fields.setdefault("answer", messages.pop().text)
    answer = fields.get("answer")
    if "answer" in fields and (isinstance(answer, bool) or not isinstance(answer, str | int | float)):
        err(f"'answer' must be a string or a number, got {json.dumps(fields['answer'])[:60]}")
    box = fields.get("box")
    if box is not None and not (isinstance(box, list) and len(box) == 4
                                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)):
        err(f"'box' must be [x1, y1, x2, y2] (four numbers), got {json.dumps(box)[:60]}")
    return {"fields": fields}


def check_prompt_turns(messages: list[Message], names: list, stage: str, err) -> None:
    """A DPO / GRPO conversation: an optional system turn, then human and gpt alternating, ending with the human
    prompt that the replies answer."""
    roles = [m.role for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body:
        err(f"empty prompt: no human turn in {names}; add the question the replies answer")
    elif body != expected[: len(body)]:
        err(f"roles out of order: {names}; after an optional system turn, human and gpt alternate, "
            "starting with human and ending with human (the prompt)")
    elif body[-1] != "user":
        where = ("the replies go in 'chosen' and 'rejected'" if stage == "dpo"
                 else "the gold answer goes in 'answer'")
        err(f"the conversation ends with a gpt turn; a {stage.upper()} record's conversation ends with the "
            f"prompt (a human turn), and {where}")
    elif not messages[-1].text.strip():
        err("empty prompt: the last human turn has no text or media; write the question")
