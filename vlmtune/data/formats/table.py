"""Parquet and Arrow files, and ``datasets.save_to_disk`` folders -> raw records, one row at a time.

Rows are read with pyarrow in record batches (the file is never held whole) and each becomes the JSON text of a
record in any of the formats (LLaVA, ShareGPT or typed messages columns). Columns that are null in a row are left
out of it. Images stored as bytes (the ``datasets`` ``Image`` feature's ``{"bytes": ..., "path": ...}``, or a plain
binary value) stay in the user's file: the record names each by a table reference (``vlmtune.data.cells``: the
file, row and cell of its first occurrence, and a hash of its bytes), and its bytes are read from that cell when
needed. Identical bytes in many rows are one image (one reference, one header check). Nothing is written to disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from vlmtune.data import cells
from vlmtune.data.schema import RawItem
from vlmtune.errors import FileError

TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
BATCH_ROWS = 1024


def is_table(path: str | Path) -> bool:
    """Whether ``path`` is a Parquet / Arrow file or a ``save_to_disk`` folder (read here, not as JSON)."""
    path = Path(path)
    return path.suffix.lower() in TABLE_SUFFIXES or (path / "state.json").is_file()


def table_files(path: str | Path) -> list[Path]:
    """The files holding a table's rows: the file itself, or the Arrow files a ``save_to_disk`` folder lists."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    try:
        state = json.loads((path / "state.json").read_text())
        return [path / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileError(f"cannot read the dataset folder's state.json ({exc}); is it a datasets.save_to_disk "
                        "folder?") from None


def _batches(path: Path) -> Iterator:
    pa, pq = cells.pyarrow()
    try:
        if path.suffix.lower() == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
            return
        with pa.memory_map(str(path)) as source:
            yield from cells.arrow_batches(source)
    except FileNotFoundError:
        raise FileError(f"data file not found: {path}; check the path") from None
    except (OSError, pa.ArrowException) as exc:
        raise FileError(f"cannot read {path.name} as a {path.suffix.lstrip('.') or 'table'} file: {exc}") from None


class _Row:
    """One row's cells as JSON values: bytes replaced by table references (identical bytes: the first one's)."""

    def __init__(self, file: str, seen: dict[bytes, str]):
        self.file, self.seen, self.row = file, seen, 0

    def plain(self, value, keys: tuple):
        if isinstance(value, bytes | bytearray | memoryview):
            digest = cells.digest(value)
            ref = self.seen.get(digest)
            if ref is None:
                ref = self.seen[digest] = cells.table_ref(self.file, self.row, keys, digest.hex())
            return ref
        if isinstance(value, dict):
            if value.keys() == {"bytes", "path"}:  # the datasets Image (or Video) feature
                return self.plain(value["bytes"], keys) if value["bytes"] is not None else value["path"]
            return {k: self.plain(v, (*keys, k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.plain(v, (*keys, i)) for i, v in enumerate(value)]
        return value


def scan_table(path: str | Path) -> Iterator[RawItem]:
    """Every row of a table as ``(index, None, JSON text)``, in order, a batch of rows at a time."""
    index = 0
    seen: dict[bytes, str] = {}
    for file in table_files(path):
        row = _Row(os.path.abspath(file), seen)
        for batch in _batches(file):
            for values in batch.to_pylist():
                cells = {k: row.plain(v, (k,)) for k, v in values.items() if v is not None}
                yield index, None, json.dumps(cells, ensure_ascii=False, default=str)
                index += 1
                row.row += 1
