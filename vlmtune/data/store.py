"""The checked data store: a data file validated, normalised and measured once per node, then kept on disk.

``open_store`` returns the store of a data file under one processor, family, budgets and media folders. The
first process to ask builds it under a file lock while the others wait; then every process (every rank of a
node) reads the same files, memory-mapped, so the OS keeps one copy of them and a record is decoded only when
it is read. A second run on the same file opens the store in seconds.

Where: ``$VLMTUNE_CACHE/data/<group>/<content>/``. ``group`` hashes everything the results depend on except
the file's bytes: the file's path, the processor's tokenizer, chat template and vision patching, the budgets,
the family, the media folders and flags, and the versions of vlmtune and the tokenizer libraries. ``content``
is the SHA-256 of the file's bytes. A new build in a group reuses the records of the group's latest store
whose raw JSON text is unchanged (a hash per record), so an edited file re-measures only the edited records;
media header results are reused while the file's size and mtime are unchanged. A store holds:

  records.bin        the valid records, normalised: one compact JSON array each, ``[id, [[role, text], ...],
                     images, videos, unknown keys]`` (resolved paths)
  offsets.npy        where each record starts in records.bin (one entry more than records)
  index.npy          each record's index in the file
  hashes.npy         a 128-bit hash of each record's raw JSON text (two uint64 columns)
  text_tokens.npy    tokens of each record's chat-template text
  lengths.npy        text plus vision tokens; -1 where one of its media files is unusable
  media_offsets.npy, media_ids.npy, n_images.npy
                     each record's media (images first, then videos) as indices into the media table
  media_*.npy        the media table: kind, width, height, frames, fps, usable
  media.json         the media table's kinds, paths, sizes and mtimes when checked, and error messages
  problems.json      every error and warning, sorted by record
  meta.json          what was measured or reused, by which process, how long each stage took

Delete ``$VLMTUNE_CACHE/data`` at any time; the next run rebuilds what it needs. The keys are
``vlmtune.data.store_key``; the builder is ``vlmtune.data.store_build``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vlmtune.data import formats, media
from vlmtune.data.conversation import Conversation
from vlmtune.data.frames import is_frame_list
from vlmtune.data.records import Message, Record
from vlmtune.data.store_build import Builder, default_processes
from vlmtune.data.store_key import _locked, _stat, content_digest, group_folder, store_settings
from vlmtune.errors import FileError, Problem
from vlmtune.families import Family

logger = logging.getLogger(__name__)

KEEP_STORES = 2
"""Stores kept per group (the current one and the one before), so an edit and its undo both reuse."""
_ARRAYS = ("offsets", "index", "hashes", "text_tokens", "lengths", "media_offsets", "media_ids", "n_images",
           "media_kind", "media_width", "media_height", "media_frames", "media_fps", "media_ok")


# ---------------------------------------------------------------- reading a store


def _load(path: Path) -> np.ndarray:
    array_ = np.load(path, mmap_mode="r")
    return np.load(path) if array_.size == 0 else array_



class DataStore:
    """One built store, opened read-only: arrays memory-mapped, records decoded one at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        for name in _ARRAYS:
            setattr(self, name, _load(self.folder / f"{name}.npy"))
        self.built = False
        """True in the process that built it during this open."""
        # Opened now, under the group's lock: a later rebuild or clean-up may delete the folder, not what is open.
        with open(self.folder / "records.bin", "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._fd = os.dup(f.fileno())
        rows = json.loads((self.folder / "problems.json").read_text())
        self.problems = [Problem(*row) for row in rows]
        """Every error and warning of the file, sorted by record."""

    def __del__(self):
        with contextlib.suppress(AttributeError, OSError):
            os.close(self._fd)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:  # DataLoader workers started by spawn reopen the same files
        return {"folder": str(self.folder), "build_id": self.meta["build_id"], "built": self.built}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])
        self.built = state["built"]
        if self.meta["build_id"] != state["build_id"]:
            raise RuntimeError(f"the data store {self.folder} was rebuilt while a run read it; restart the run")

    def media_table(self) -> list[list]:
        """``[kind, path, [size, mtime_ns] or None, error or None]`` of each distinct media file."""
        return json.loads((self.folder / "media.json").read_text())

    def is_current(self, workers: int = 16) -> bool:
        """Whether every media file is as it was when checked (same size and mtime; URLs: fetched fine)."""
        table = self.media_table()
        local = [(row[1], row[2]) for row in table if not media.is_url(row[1])]
        if any(row[3] is not None for row in table if media.is_url(row[1])):
            return False  # a URL that failed may work now
        if len(local) < 256:
            return all(_stat(path) == stat for path, stat in local)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return all(now == stat for now, (_, stat) in zip(pool.map(_stat, [p for p, _ in local]), local))

    def _bytes(self, pos: int) -> bytes:
        return self._blob[int(self.offsets[pos]) : int(self.offsets[pos + 1])]

    def read_bytes(self, pos: int) -> bytes:
        """``_bytes`` through a read, not the mapping: a pass over every record leaves no pages mapped."""
        start = int(self.offsets[pos])
        return os.pread(self._fd, int(self.offsets[pos + 1]) - start, start)

    def raw_record(self, pos: int) -> list:
        """``[raw id, [[role, text], ...], images, videos, unknown keys]`` of the record at ``pos``."""
        return json.loads(self._bytes(pos))

    def record(self, pos: int) -> Record:
        """The record at position ``pos`` (0 .. len - 1), as ``read_records`` would have returned it."""
        rid, messages, images, videos, _ = self.raw_record(pos)
        index = int(self.index[pos])
        ids = self.media_ids[int(self.media_offsets[pos]) : int(self.media_offsets[pos + 1])]
        image_ids, video_ids = ids[: len(images)], ids[len(images) :]
        return Record(
            index, rid if rid is not None else str(index), [Message(role, text) for role, text in messages],
            images, videos,
            [(int(self.media_width[m]), int(self.media_height[m])) for m in image_ids],
            [media.VideoInfo(int(self.media_frames[m]), float(self.media_fps[m]), int(self.media_width[m]),
                             int(self.media_height[m]), is_frame_list(v)) for v, m in zip(videos, video_ids)],
        )

    def valid_positions(self) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.lengths) >= 0)

    def records(self) -> RecordSequence:
        """The valid records (no error), in file order, decoded when read."""
        return RecordSequence(self, self.valid_positions())

    def valid_lengths(self) -> np.ndarray:
        lengths = np.asarray(self.lengths)
        return lengths[lengths >= 0].astype(np.int64)


class RecordSequence(Sequence):
    """Records of a store at some positions: a sequence whose items are decoded when read (a few µs each)."""

    def __init__(self, store: DataStore, positions: np.ndarray):
        self.store = store
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return RecordSequence(self.store, self.positions[i])
        return self.store.record(int(self.positions[i]))

    def take(self, positions) -> RecordSequence:
        """The records at ``positions`` of this sequence, still lazy."""
        return RecordSequence(self.store, self.positions[np.asarray(positions, dtype=np.int64)])

    def media_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, videos) of each record."""
        offsets = np.asarray(self.store.media_offsets)
        images = np.asarray(self.store.n_images)[self.positions]
        return images, (offsets[self.positions + 1] - offsets[self.positions]) - images

    def shape_counts(self) -> Counter:
        """How many records of each ``Record.shape``, without decoding any."""
        images, videos = self.media_counts()
        names = np.where(videos > 0, np.where(images > 0, 4, 3), np.where(images > 1, 2, np.where(images > 0, 1, 0)))
        shapes = ("text", "image", "multi_image", "video", "image+video")
        return Counter({shapes[k]: int(n) for k, n in zip(*np.unique(names, return_counts=True))})


def _stores(group: Path) -> list[Path]:
    """Complete stores of a group, newest first."""
    found = [p for p in group.iterdir() if p.is_dir() and not p.name.startswith(("tmp-", "old-"))
             and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: (p / "meta.json").stat().st_mtime_ns, reverse=True)


def _tidy(group: Path, keep: Path) -> None:
    """Under the exclusive lock: drop leftovers of interrupted builds and all but the newest stores."""
    for p in group.iterdir():
        if p.is_dir() and p.name.startswith(("tmp-", "old-")):
            shutil.rmtree(p, ignore_errors=True)
    others = [p for p in _stores(group) if p != keep]
    for p in others[KEEP_STORES - 1 :]:
        shutil.rmtree(p, ignore_errors=True)


def open_store(
    data_path: str | Path,
    processor,
    family: Family,
    budget: media.MediaBudget,
    conversation: Conversation | None = None,
    *,
    image_folder: str | Path | None = None,
    video_folder: str | Path | None = None,
    allow_urls: bool = False,
    deep: bool = False,
    min_image_side: int = 28,
    processes: int | None = None,
    media_workers: int = 16,
    data_format: str | None = None,
    stage: str = "sft",
) -> DataStore:
    """The checked store of a data file: opened if it exists and its media are unchanged, else built once.
    ``stage``: "sft" (conversations, ``conversation`` a ``Conversation``) or "cpt" (documents, a ``Document``).

    Every process of a node may call this at once: one builds under the group's lock while the others wait,
    then all read the same files. Raises ``FileError`` only when the file cannot be read at all.
    """
    path = Path(data_path)
    conversation = conversation or Conversation(processor)
    settings = store_settings(path, processor, family, budget, conversation, image_folder=image_folder,
                              video_folder=video_folder, allow_urls=allow_urls, deep=deep,
                              min_image_side=min_image_side, data_format=formats.file_format(path, data_format),
                              stage=stage)
    group = group_folder(settings)
    try:
        content = content_digest(path, group)
    except FileNotFoundError:
        raise FileError("data file not found; check the path") from None
    except OSError as exc:
        raise FileError(f"cannot read the data file: {exc}") from None
    folder = group / content[:32]

    def current() -> DataStore | None:
        if not (folder / "meta.json").is_file():
            return None
        store = DataStore(folder)
        return store if store.is_current(media_workers) else None

    with _locked(group, exclusive=False):
        store = current()
    if store is not None:
        return store
    with _locked(group, exclusive=True):
        store = current()
        if store is not None:  # another process built it while this one waited
            return store
        (group / "settings.json").write_text(json.dumps(settings, indent=1))
        stores = _stores(group)
        source = DataStore(stores[0]) if stores else None
        tmp = group / f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta = Builder(tmp, path, source, processor, family, budget, conversation, settings,
                            image_folder=image_folder, video_folder=video_folder, allow_urls=allow_urls, deep=deep,
                            min_image_side=min_image_side, processes=processes or default_processes(),
                            media_workers=media_workers, stage=stage).build()
            old = group / f"old-{uuid.uuid4().hex[:8]}"
            if folder.exists():
                os.rename(folder, old)  # readers that opened it keep their mapped files
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        with open(group / "builds.jsonl", "a") as log:
            log.write(json.dumps({k: meta[k] for k in ("created", "pid", "records", "measured", "reused",
                                                       "media_probed", "seconds")}) + "\n")
        _tidy(group, folder)
        logger.info("data store: %s records checked, %s measured, %s reused, in %.1fs (%s process(es)): %s",
                    f"{meta['records']:,}", f"{meta['measured']:,}", f"{meta['reused']:,}", meta["seconds"],
                    meta["processes"], folder)
        store = DataStore(folder)
        store.built = True
    return store


def build_log(store: DataStore) -> list[dict]:
    """Every build of the store's group, oldest first (one JSON line each)."""
    path = store.folder.parent / "builds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
