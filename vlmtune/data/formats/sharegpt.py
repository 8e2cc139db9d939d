"""ShareGPT records as LLaMA-Factory and ms-swift write them -> the LLaVA shape.

``messages`` (or ``conversations``) of ``role`` / ``content`` (or ``from`` / ``value``) turns with ``<image>`` /
``<video>`` tags in the text, ``images`` / ``videos`` lists, an optional ``system`` key, and ms-swift's preference
pairs (``rejected_response``: the conversation's last reply is the chosen one). A ``videos`` entry is a file or a
list of frame files (``vlmtune.data.frames``). A record with media and no tag in
any turn (as LLaMA-Factory's ``mllm_demo.json`` is published at some commits) has its media placed at the start of
its first user turn, images first.
"""

from __future__ import annotations

import json

from vlmtune.data import frames

KEYS = frozenset({"messages", "images", "videos", "system", "rejected_response"})


def media_list(raw: dict, key: str, err) -> list | None:
    """The ``images`` / ``videos`` list of a record (a single name is taken as a list of one), or None."""
    value = raw.get(key)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if key == "videos" and isinstance(values, list):  # a video is a file or a list of frames
        problem = next((f"entry {i}: {p}" for i, p in enumerate(map(frames.check_entry, values)) if p), None)
        if problem:
            err(f"'{key}' {problem}")
            return None
        return values
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        err(f"'{key}' must be a list of file names, got {json.dumps(value, default=str)[:80]}")
        return None
    return values


def with_media(out: dict, conversation: list, images: list, videos: list) -> dict:
    """``out`` as a LLaVA record: its turns, and its media lists where it has any."""
    out["conversations"] = conversation
    if images:
        out["image"] = images
    if videos:
        out["video"] = videos
    return out


def _place_untagged(conversation: list, images: list, videos: list) -> None:
    texts = [t.get("value") for t in conversation if isinstance(t, dict)]
    if not (images or videos) or any(isinstance(v, str) and ("<image>" in v or "<video>" in v) for v in texts):
        return
    for turn in conversation:
        if isinstance(turn, dict) and turn.get("from") in ("user", "human") and isinstance(turn.get("value"), str):
            turn["value"] = "<image>" * len(images) + "<video>" * len(videos) + turn["value"]
            return


def to_llava(raw: dict, err) -> dict | None:
    """One ShareGPT record in the LLaVA shape, or None (its problems reported through ``err``)."""
    key = "messages" if "messages" in raw else "conversations"
    turns = raw.get(key)
    if not isinstance(turns, list) or not turns:
        state = "missing" if key not in raw else "empty" if not turns else f"a {type(turns).__name__}, not a list"
        err(f"'{key}' is {state}; give a list of {{\"role\": \"user\"|\"assistant\", \"content\": ...}} turns")
        return None
    images, videos = media_list(raw, "images", err), media_list(raw, "videos", err)
    if images is None or videos is None:
        return None
    out = {k: v for k, v in raw.items() if k not in KEYS and k != "conversations"}
    conversation = []
    system = raw.get("system")
    if system is not None:
        if not isinstance(system, str):
            err(f"'system' must be a string, got {type(system).__name__}")
            return None
        conversation.append({"from": "system", "value": system})
    for turn in turns:
        if isinstance(turn, dict):  # anything else: the LLaVA check names the turn
            turn = {"from": turn.get("role", turn.get("from")), "value": turn.get("content", turn.get("value"))}
        conversation.append(turn)
    if "rejected_response" in raw:  # ms-swift: the last reply is the chosen one
        last = conversation[-1] if conversation else None
        if not isinstance(last, dict) or last.get("from") not in ("assistant", "gpt"):
            err(f"'rejected_response' needs '{key}' to end with the chosen reply (an assistant turn)")
            return None
        out["chosen"], out["rejected"] = conversation.pop()["value"], raw["rejected_response"]
    _place_untagged(conversation, images, videos)
    return with_media(out, conversation, images, videos)
