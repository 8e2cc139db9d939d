"""JSON and JSON lines data files -> raw records ``(index, line number, JSON text)``, streamed in file order."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from vlmtune.data.schema import RawItem
from vlmtune.errors import FileError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
_JSON_WS = re.compile(r"[ \t\n\r]*")
_BLOCK = 1 << 22  # bytes read at a time from a JSON lines file


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileError("data file not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FileError(f"cannot read the data file: {exc}") from None


def _invalid_json(exc: json.JSONDecodeError) -> FileError:
    return FileError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                     "fix the file (a JSON array of records, or one record per line)")


def _blank(line: bytes) -> bool:
    if not line.strip():
        return True
    return not line.isascii() and not line.decode("utf-8", "replace").strip()  # Unicode spaces only


def _lines(path: Path) -> Iterator[RawItem]:
    """The non-blank lines of a JSON lines file, read in blocks (the file is never held whole)."""
    index = lineno = 0
    rest = b""
    with open(path, "rb") as f:
        first = True
        while True:
            block = f.read(_BLOCK)
            if first and block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
            first = False
            if not block:
                break
            lines = (rest + block).split(b"\n")  # not splitlines(): U+2028 may sit inside a string
            rest = lines.pop()
            for line in lines:
                lineno += 1
                if not _blank(line):
                    yield index, lineno, line
                    index += 1
    if not _blank(rest):
        yield index, lineno + 1, rest


def _array(text: str) -> Iterator[RawItem]:
    """The elements of a JSON array, each as its own text, parsed one at a time (in file order)."""
    decode = json.JSONDecoder().raw_decode
    index = pos = 0
    try:
        pos = _JSON_WS.match(text).end()
        if text[pos : pos + 1] != "[":
            raise ValueError("not an array")
        pos = _JSON_WS.match(text, pos + 1).end()
        if text[pos : pos + 1] != "]":
            while True:
                _, end = decode(text, pos)
                yield index, None, text[pos:end]
                index += 1
                pos = _JSON_WS.match(text, end).end()
                sep = text[pos : pos + 1]
                pos = _JSON_WS.match(text, pos + 1).end()
                if sep == "]":
                    break
                if sep != ",":
                    raise ValueError("not an array")
        else:
            pos = _JSON_WS.match(text, pos + 1).end()
        if pos != len(text):
            raise ValueError("data after the array")
    except ValueError:
        try:  # the whole-file parse names the first error exactly as json reports it
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _invalid_json(exc) from None
        raise FileError(f"unexpected layout of a valid JSON array (at character {pos}); "
                        f"please report it: {type(data).__name__}") from None


def scan(path: str | Path) -> Iterator[RawItem]:
    """Every record of a data file as ``(index, line number, JSON text)``, in file order, lazily.

    A JSON array, JSON lines (``.jsonl`` / ``.ndjson``, or one record per line under another name) and a single
    record are read. Records are not parsed here; a JSON lines file is read in blocks, never whole. Raises
    ``FileError`` for a file that holds no readable records (possibly after yielding some: discard them).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_BLOCK).decode("utf-8-sig", "replace").lstrip()
    except FileNotFoundError:
        raise FileError("data file not found; check the path") from None
    except OSError as exc:
        raise FileError(f"cannot read the data file: {exc}") from None
    if head.startswith("["):
        return _array(_read_text(path))
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _lines(path)
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # Several JSON objects one per line in a .json file: JSON lines under another name.
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _lines(path)
        raise _invalid_json(exc) from None
    if isinstance(data, dict) and ("conversations" in data or "messages" in data or "text" in data):  # text: CPT
        return iter([(0, None, text)])  # a single record (one-line JSON lines file)
    got = f"an object with keys {sorted(data)[:5]}" if isinstance(data, dict) else type(data).__name__
    raise FileError(f"the top level must be a JSON array of records ([{{...}}, ...]) or "
                    f"one record per line (JSON lines), got {got}")
