"""Parquet and Arrow files, and ``datasets.save_to_disk`` folders -> raw records, one row at a time.

Rows are read with pyarrow in record batches (the file is never held whole) and each becomes the JSON text of a
record in any of the formats (LLaVA, ShareGPT or typed messages columns). Images stored as bytes (the ``datasets``
``Image`` feature's ``{"bytes": ..., "path": ...}``, or a plain binary value) become ``data:`` URIs: they are
decoded from memory when read, never written to the user's disk. Columns that are null in a row are left out of it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

from vlmtune.data.schema import RawItem
from vlmtune.errors import FileError

TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
BATCH_ROWS = 1024
_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"), (b"RIFF", "image/webp"),
          (b"BM", "image/bmp"))


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


def data_uri(data: bytes) -> str:
    """Bytes as a ``data:`` URI (the media type sniffed from the first bytes; the reader sniffs again)."""
    kind = next((k for magic, k in _MAGIC if data.startswith(magic)), "application/octet-stream")
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _plain(value):
    """A cell as JSON values: image structs and bytes as data: URIs."""
    if isinstance(value, bytes | bytearray | memoryview):
        return data_uri(bytes(value))
    if isinstance(value, dict):
        if value.keys() == {"bytes", "path"}:  # the datasets Image (or Video) feature
            return data_uri(value["bytes"]) if value["bytes"] is not None else value["path"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _batches(path: Path) -> Iterator:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise FileError("reading Parquet / Arrow files needs pyarrow: pip install 'vlmtune[tables]'") from None

    try:
        if path.suffix.lower() == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
            return
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:  # save_to_disk writes the stream format
                source.seek(0)
                batches = pa.ipc.open_stream(source)
            yield from batches
    except FileNotFoundError:
        raise FileError(f"data file not found: {path}; check the path") from None
    except (OSError, pa.ArrowException) as exc:
        raise FileError(f"cannot read {path.name} as a {path.suffix.lstrip('.') or 'table'} file: {exc}") from None


def scan_table(path: str | Path) -> Iterator[RawItem]:
    """Every row of a table as ``(index, None, JSON text)``, in order, a batch of rows at a time."""
    index = 0
    for file in table_files(path):
        for batch in _batches(file):
            for row in batch.to_pylist():
                row = {k: _plain(v) for k, v in row.items() if v is not None}
                yield index, None, json.dumps(row, ensure_ascii=False, default=str)
                index += 1
