"""Images given as their bytes inside a record (``data:`` URIs with base64 data): checked, named and decoded from
memory, never written to disk."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from vlmtune.errors import MediaError

DATA_PREFIX = "data:"
"""An image given as its bytes (a ``data:`` URI with base64 data): decoded from memory, never written to disk."""


def is_inline(path: str | Path) -> bool:
    return str(path).startswith(DATA_PREFIX)


def shown(path: str | Path) -> str:
    """How messages name a media file: its path, or for bytes given inline their type and size."""
    path = str(path)
    if not is_inline(path):
        return path
    header = path.split(",", 1)[0]
    return f"{header},... ({len(path) - len(header) - 1:,} base64 characters)"


def inline_bytes(uri: str) -> bytes:
    """The bytes of a ``data:...;base64,...`` URI; ``MediaError`` when it is not one."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(f"{shown(uri)} is not a base64 data: URI (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"{shown(uri)} does not hold base64 data: {exc}") from None
