"""Media given as their bytes rather than as files: checked, named and decoded from memory, never written to disk.

Two kinds of name stand for such bytes in a record:

  ``data:image/png;base64,...``
      a ``data:`` URI in the record's own text (JSON files): the bytes are the name.
  ``table:<hash>:<row>:<cell>:<file>``
      a cell of a Parquet / Arrow file (``vlmtune.data.cells``): the bytes stay in the user's file and are read
      from it when needed.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from vlmtune.data import cells
from vlmtune.data.cells import TABLE_PREFIX, is_table_ref  # noqa: F401  (re-exported)
from vlmtune.errors import MediaError

DATA_PREFIX = "data:"
"""An image given as its bytes (a ``data:`` URI with base64 data): decoded from memory, never written to disk."""
_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"), (b"RIFF", "image/webp"),
          (b"BM", "image/bmp"))


def is_inline(path: str | Path) -> bool:
    """Whether a media name stands for bytes (a ``data:`` URI or a table cell), not a file or URL of its own."""
    return str(path).startswith((DATA_PREFIX, TABLE_PREFIX))


def shown(path: str | Path) -> str:
    """How messages name a media file: its path, for a data: URI its type and size, for a table cell its file,
    row and column."""
    path = str(path)
    if path.startswith(TABLE_PREFIX):
        return cells.describe(path)
    if not path.startswith(DATA_PREFIX):
        return path
    header = path.split(",", 1)[0]
    return f"{header},... ({len(path) - len(header) - 1:,} base64 characters)"


def inline_bytes(uri: str) -> bytes:
    """The bytes a ``data:...;base64,...`` URI or a table reference stands for; ``MediaError`` when they cannot be
    had."""
    if uri.startswith(TABLE_PREFIX):
        return cells.cell_bytes(uri)
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(f"{shown(uri)} is not a base64 data: URI (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"{shown(uri)} does not hold base64 data: {exc}") from None


def media_type(path: str, data: bytes) -> str | None:
    """The media type of inline bytes: a data: URI's own, else sniffed from the first bytes (None if unknown)."""
    if path.startswith(DATA_PREFIX):
        return path[len(DATA_PREFIX):].split(";", 1)[0].split(",", 1)[0]
    return next((kind for magic, kind in _MAGIC if data.startswith(magic)), None)
