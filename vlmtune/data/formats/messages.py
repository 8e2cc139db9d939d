"""OpenAI / Hugging Face chat messages with typed content parts -> the LLaVA shape.

A turn's ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``, ``{"type": "image",
"image": X}`` (also ``"url"`` / ``"path"`` instead of ``"image"``), ``{"type": "image_url", "image_url": {"url": X}}``
as OpenAI writes it, and ``{"type": "video", "video": path}`` or a list of frame files (with an optional
``"sample_fps"``, as qwen-vl-utils reads it: ``vlmtune.data.frames``). ``X`` is a path, a URL (with
``--allow_urls``) or a ``data:`` URI with base64 bytes (decoded from memory). An image part without a source takes
the next entry of the record's ``images`` list (TRL's vision datasets). Preference records: TRL's ``prompt`` /
``chosen`` / ``rejected`` message lists, or ``chosen`` / ``rejected`` strings. Each image part becomes ``<image>``
at its place in the text (parts are joined without separators, as the chat templates join them).
"""

from __future__ import annotations

import json

from vlmtune.data import frames
from vlmtune.data.formats.sharegpt import media_list, with_media
from vlmtune.data.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

KEYS = frozenset({"messages", "images", "prompt"})
_SOURCE_KEYS = ("image", "url", "path")


def _image_source(part: dict, where: str, pool: list[str], err) -> str | None:
    if part.get("type") == "image_url":
        value = part.get("image_url")
        value = value.get("url") if isinstance(value, dict) else value
    else:
        value = next((part[k] for k in _SOURCE_KEYS if part.get(k) is not None), None)
        if value is None:
            if not pool:
                err(f"{where}: an image part without a source, and the record's 'images' list is used up; "
                    "give the image's path, URL or data: URI in the part")
                return None
            return pool.pop(0)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("path")  # the datasets Image layout; bytes arrive as references from the table reader
    if not isinstance(value, str) or not value.strip():
        got = json.dumps(value, default=str)[:60]
        err(f"{where}: the image must be a path, a URL or a data: URI string, got {got}")
        return None
    return value


def _text(content, where: str, images: list, videos: list, pool: list[str], err) -> str | None:
    """A turn's content as text with placeholders; its media appended to ``images`` / ``videos``."""
    if isinstance(content, str):
        if IMAGE_PLACEHOLDER in content or VIDEO_PLACEHOLDER in content:
            err(f"{where}: an <image> / <video> tag in the text of a typed-parts file; give each image as a part "
                "({\"type\": \"image\", \"image\": ...}), or write the file as ShareGPT")
            return None
        return content
    if not isinstance(content, list):
        return content  # the LLaVA check names the type
    pieces = []
    for p, part in enumerate(content):
        at = f"{where}, part {p}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_PLACEHOLDER in part["text"] or VIDEO_PLACEHOLDER in part["text"]:
                err(f"{at}: an <image> / <video> tag in a text part; give each image as its own part")
                return None
            pieces.append(part["text"])
        elif kind in ("image", "image_url"):
            source = _image_source(part, at, pool, err)
            if source is None:
                return None
            images.append(source)
            pieces.append(IMAGE_PLACEHOLDER)
        elif kind == "video":
            video = part.get("video")
            if isinstance(video, list) and part.get("sample_fps") is not None:  # qwen-vl-utils: the frames' rate
                video = {"frames": video, "sample_fps": part["sample_fps"]}
            problem = frames.check_entry(video)
            if problem:
                err(f"{at}: {problem}")
                return None
            videos.append(video)
            pieces.append(VIDEO_PLACEHOLDER)
        else:
            err(f"{at}: expected {{\"type\": \"text\", \"text\": ...}} or an image / image_url / video part, got "
                f"{json.dumps(part, default=str)[:80]}")
            return None
    return "".join(pieces)


def _reply(value, key: str, err):
    """A preference reply given as a message list (TRL) or one message: the reply's text as a gpt turn."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            err(f"'{key}' must be one assistant message (a list of one), got {len(value)} item(s)")
            return None
        value = value[0]
    if not isinstance(value, dict) or not isinstance(value.get("content"), list):
        return value  # a string or a plain turn: the reply check reads it
    text = _text(value["content"], f"'{key}'", [], [], [], err)
    return None if text is None else {"from": value.get("role", "assistant"), "value": text}


def to_llava(raw: dict, err) -> dict | None:
    """One typed-messages record in the LLaVA shape, or None (its problems reported through ``err``)."""
    key = "messages" if "messages" in raw else "prompt" if "prompt" in raw else "conversations"
    turns = raw.get(key)
    if not isinstance(turns, list) or not turns:
        state = "missing" if key not in raw else "empty" if not turns else f"a {type(turns).__name__}, not a list"
        err(f"'{key}' is {state}; give a list of {{\"role\": ..., \"content\": [...]}} messages")
        return None
    pool = media_list(raw, "images", err)
    if pool is None:
        return None
    failed: list[str] = []

    def note(message: str) -> None:
        failed.append(message)
        err(message)

    out = {k: v for k, v in raw.items() if k not in KEYS and k != "conversations"}
    images: list[str] = []
    videos: list[str] = []
    conversation = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            conversation.append(turn)  # the LLaVA check names it
            continue
        role = turn.get("role", turn.get("from"))
        text = _text(turn.get("content", turn.get("value")), f"turn {t} ({role})", images, videos, pool, note)
        if failed:
            return None
        conversation.append({"from": role, "value": text})
    if pool:
        err(f"{len(pool)} entr(ies) of 'images' left over: one image part (without a source) per image")
        return None
    for reply in ("chosen", "rejected"):
        if reply in raw:
            out[reply] = _reply(raw[reply], reply, note)
            if failed:
                return None
    return with_media(out, conversation, images, videos)
