"""Images kept in a cell of a Parquet / Arrow file: their names (table references) and how their bytes are read.

A table reference, ``table:<hash>:<row>:<cell>:<file>``, names the bytes in one cell: a BLAKE2b hash of the bytes
it held when the file was read, the row (within that file), the cell's column and keys into its nested value
(``/``-separated, names percent-quoted, list positions as ``#i``) and the file's absolute path. The table reader
(``vlmtune.data.formats.table``) writes them; ``cell_bytes`` reads the bytes back: one column of one row group of a
Parquet file, or of one record batch of a memory-mapped Arrow file, decoded and kept for the next rows.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from urllib.parse import quote, unquote

from vlmtune.errors import FileError, MediaError

TABLE_PREFIX = "table:"
"""An image given as the bytes in a cell of a Parquet / Arrow file: read from the file when needed."""
DIGEST_BYTES = 12
"""Bytes of the BLAKE2b hash that names a cell's bytes (identical images are one; a changed file is noticed)."""
_CACHED_COLUMNS = 4
"""Column chunks (one column of one row group or record batch) a process keeps decoded for reading cells."""


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def is_table_ref(path) -> bool:
    return str(path).startswith(TABLE_PREFIX)


def table_ref(file: str, row: int, keys: tuple, digest_hex: str) -> str:
    """The name of the bytes in cell ``keys`` (column, then keys into its value) of row ``row`` of ``file``."""
    cell = "/".join(f"#{k}" if isinstance(k, int) else quote(k, safe="") for k in keys)  # "#" is quoted in names
    return f"{TABLE_PREFIX}{digest_hex}:{row}:{cell}:{file}"


def parse_table_ref(ref: str) -> tuple[str, str, int, list]:
    """``(digest, file, row, keys)`` of a table reference (list positions as ints); ``MediaError`` if malformed."""
    try:
        digest_hex, row, cell, file = ref[len(TABLE_PREFIX):].split(":", 3)
        keys = [int(k[1:]) if k.startswith("#") else unquote(k) for k in cell.split("/")]
        return digest_hex, file, int(row), keys
    except ValueError:
        raise MediaError(f"{ref[:80]!r} is not a table reference (table:<hash>:<row>:<cell>:<file>)") from None


def describe(ref: str) -> str:
    """How messages name a table's cell: its file, row and column."""
    try:
        _, file, row, keys = parse_table_ref(ref)
    except MediaError:
        return ref[:80]
    cell = keys[0] + "".join(f"[{k!r}]" if isinstance(k, str) else f"[{k}]" for k in keys[1:])
    return f"{Path(file).name} row {row}, column {cell}"


def pyarrow():
    """``(pyarrow, pyarrow.parquet)``; ``FileError`` naming the extra to install when missing."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise FileError("reading Parquet / Arrow files needs pyarrow: pip install 'vlmtune[tables]'") from None
    return pa, pq


def arrow_batches(source) -> list:
    """The record batches of a memory-mapped Arrow file (IPC file format, or the stream format ``save_to_disk``
    writes): zero-copy views of the mapping, nothing read until used."""
    pa, _ = pyarrow()
    try:
        reader = pa.ipc.open_file(source)
        return [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except pa.ArrowInvalid:
        source.seek(0)
        return list(pa.ipc.open_stream(source))


class _Open:
    """A table file opened for reading cells: its row groups (Parquet) or memory-mapped record batches (Arrow)."""

    def __init__(self, file: str, stamp: tuple):
        self.stamp = stamp  # (size, mtime) when opened
        pa, pq = pyarrow()
        if file.lower().endswith(".parquet"):
            self.parquet = pq.ParquetFile(file)
            counts = [self.parquet.metadata.row_group(i).num_rows for i in range(self.parquet.num_row_groups)]
        else:
            self.parquet = None
            self.batches = arrow_batches(pa.memory_map(file))
            counts = [b.num_rows for b in self.batches]
        self.starts = [0]
        for n in counts:
            self.starts.append(self.starts[-1] + n)

    def column(self, part: int, name: str):
        if self.parquet is not None:
            return self.parquet.read_row_group(part, columns=[name], use_threads=False).column(0)
        return self.batches[part].column(name)


class _Cells:
    """Per process: the files opened and the last column chunks decoded (rows read in file order reuse them)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pid = None
        self.files: dict[str, _Open] = {}
        self.columns: OrderedDict = OrderedDict()

    def value(self, file: str, row: int, keys: list):
        with self.lock:
            if self.pid != os.getpid():  # forked (a DataLoader worker): nothing opened by the parent is shared
                self.pid, self.files, self.columns = os.getpid(), {}, OrderedDict()
            st = os.stat(file)
            stamp = (st.st_size, st.st_mtime_ns)  # a file rewritten since it was opened is opened again
            opened = self.files.get(file)
            if opened is None or opened.stamp != stamp:
                opened = self.files[file] = _Open(file, stamp)
            part = bisect.bisect_right(opened.starts, row) - 1
            key = (file, stamp, part, keys[0])
            column = self.columns.get(key)
            if column is None:
                column = self.columns[key] = opened.column(part, keys[0])
                while len(self.columns) > _CACHED_COLUMNS:
                    self.columns.popitem(last=False)
            self.columns.move_to_end(key)
        value = column[row - opened.starts[part]].as_py()
        for key in keys[1:]:
            value = value[key]
        return value


_CELLS = _Cells()


def cell_bytes(ref: str) -> bytes:
    """The bytes a table reference names, read from its file's cell; ``MediaError`` when they cannot be read or
    are no longer the bytes that were checked (the file changed since)."""
    want, file, row, keys = parse_table_ref(ref)
    try:
        value = _CELLS.value(file, row, keys)
    except FileNotFoundError:
        raise MediaError(f"{describe(ref)}: the file is gone; rerun check-data") from None
    except Exception as exc:  # pyarrow errors, a row or key the file no longer has
        raise MediaError(f"cannot read {describe(ref)}: {type(exc).__name__}: {exc}") from None
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, bytes) or digest(value).hex() != want:
        raise MediaError(f"{describe(ref)} is not the image that was checked (the file changed since); "
                         "rerun check-data")
    return value
