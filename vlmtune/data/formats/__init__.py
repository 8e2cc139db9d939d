"""Input formats. Each reads a user's record into the one shape ``vlmtune.data.records`` validates (LLaVA's:
``conversations`` of ``from`` / ``value`` turns with ``<image>`` / ``<video>`` where the media go, ``image`` and
``video`` lists), so nothing downstream knows which format a record came from.

  llava     ``{"conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, ...], "image": "a.png"}``
  sharegpt  ``{"messages": [{"role": "user", "content": "<image>What is it?"}, ...], "images": ["a.png"]}``
            (LLaMA-Factory, ms-swift; ``conversations`` / ``from`` / ``value`` too, a ``system`` key, and
            ms-swift's ``rejected_response`` for preference pairs)
  messages  ``{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
            {"type": "text", "text": "What is it?"}]}, ...]}`` (OpenAI / Hugging Face typed parts)

A file's format comes from its first record (or ``--data_format``); every record of the file is read in it.
Records come from JSON / JSON lines files (``jsonfile``) or from Parquet / Arrow files and ``save_to_disk`` folders
(``table``: any of the three shapes in its columns, images as bytes).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

from vlmtune.data.formats import jsonfile, messages, sharegpt, table
from vlmtune.data.schema import RawItem
from vlmtune.errors import FileError

FORMATS = ("llava", "sharegpt", "messages")
FORMAT_KEYS = {"sharegpt": sharegpt.KEYS, "messages": messages.KEYS}
"""Keys a format reads beside the LLaVA record's (so they are not reported as unknown)."""


def _typed(raw: dict) -> bool:
    turns = raw.get("messages", raw.get("conversations", raw.get("prompt")))
    return isinstance(turns, list) and any(
        isinstance(t, dict) and isinstance(t.get("content"), list) for t in turns)  # LLaVA's "value": never


def detect(raw) -> str | None:
    """The format a record is written in, or None when it is none of them (the LLaVA check then says why)."""
    if not isinstance(raw, dict):
        return None
    if _typed(raw) or ("prompt" in raw and isinstance(raw.get("prompt"), list)):
        return "messages"
    if "messages" in raw or "images" in raw or "videos" in raw or "rejected_response" in raw:
        return "sharegpt"
    return "llava" if "conversations" in raw else None


def _mixed(raw: dict, fmt: str) -> str | None:
    """Which other format a record of a ``fmt`` file is written in, if it cannot be read as ``fmt``."""
    if fmt == "llava" and ("messages" in raw or _typed(raw)):
        return "messages" if _typed(raw) else "sharegpt"
    if fmt == "sharegpt" and _typed(raw):
        return "messages"
    if fmt == "messages" and not _typed(raw) and any(k in raw for k in ("images", "videos", "image", "video")):
        return "sharegpt"
    return None


def to_llava(raw, fmt: str, err: Callable[[str], None]):
    """``raw`` (a record of a ``fmt`` file) in the LLaVA shape, or None after reporting why it cannot be read."""
    if not isinstance(raw, dict) or fmt == "llava" and _mixed(raw, fmt) is None:
        return raw
    other = _mixed(raw, fmt)
    if other is not None:
        err(f"this record is written in the {other} format, the file's first record in {fmt}: one format per file "
            f"(split the file, or convert it with `vlmtune convert`)")
        return None
    return (sharegpt.to_llava if fmt == "sharegpt" else messages.to_llava)(raw, err)


def file_format(path, forced: str | None = None) -> str:
    """The format of a data file: ``forced`` (``--data_format``), else its first record's (LLaVA if unclear)."""
    if forced:
        return forced
    try:
        for _, _, text in scan(path):
            return detect(json.loads(text)) or "llava"
    except (FileError, ValueError):  # reading the file reports it
        pass
    return "llava"


def scan(path) -> Iterator[RawItem]:
    """Every record of a data file as ``(index, line number or None, JSON text)``, in order, lazily: a table
    (Parquet, Arrow, a ``save_to_disk`` folder) by rows, else a JSON / JSON lines file (``jsonfile.scan``)."""
    return table.scan_table(path) if table.is_table(path) else jsonfile.scan(path)
