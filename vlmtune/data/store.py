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

Delete ``$VLMTUNE_CACHE/data`` at any time; the next run rebuilds what it needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import hashlib
import json
import logging
import mmap
import multiprocessing
import os
import shutil
import time
import uuid
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

import vlmtune
from vlmtune.data import media
from vlmtune.data.conversation import Conversation
from vlmtune.data.dataset import image_extra_tokens, video_extra_tokens
from vlmtune.data.records import (
    NO_RECORDS,
    CollectionCheck,
    Message,
    RawItem,
    Record,
    media_folders,
    parse_item,
    probe_media,
    resolvers_for,
    scan,
)
from vlmtune.errors import FileError, Problem
from vlmtune.families import Family

logger = logging.getLogger(__name__)

STORE_VERSION = 1  # bump when the layout or what a store means changes
CHUNK = 2048
"""Records per measuring job: what one worker renders and tokenizes at a time (its ids are dropped after)."""
INLINE_LIMIT = 4 * CHUNK
"""Up to this many records to measure, the building process measures them itself (no worker processes)."""
KEEP_STORES = 2
"""Stores kept per group (the current one and the one before), so an edit and its undo both reuse."""
_ARRAYS = ("offsets", "index", "hashes", "text_tokens", "lengths", "media_offsets", "media_ids", "n_images",
           "media_kind", "media_width", "media_height", "media_frames", "media_fps", "media_ok")
_IMAGE, _VIDEO = 0, 1
_BOX_KEY = (b'"box_format"', '"box_format"')  # as bytes, as str
_KINDS = ("image", "video")


# ---------------------------------------------------------------- keys


def processor_fingerprint(processor) -> str:
    """SHA-256 of what in a processor decides a record's token count: the tokenizer (vocabulary, merges,
    added tokens, normalizer and pre-tokenizer), the chat templates and the vision patching. Pixel and frame
    budgets are keyed separately (``set_processor_budget`` writes them into the processor)."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "_tokenizer", None)
    digest = hashlib.sha256()
    if hasattr(backend, "to_str"):
        # without the truncation and padding settings: a call of the tokenizer sets them, a count ignores them
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        digest.update(json.dumps(state, sort_keys=True).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    vision = {}
    for name in ("image_processor", "video_processor"):
        part = getattr(processor, name, None)
        vision[name] = None if part is None else [type(part).__name__] + [
            getattr(part, key, None) for key in ("patch_size", "merge_size", "temporal_patch_size")]
    digest.update(json.dumps({
        "processor": type(processor).__name__,
        "tokenizer": type(tokenizer).__name__,
        "chat_template": getattr(processor, "chat_template", None),
        "tokenizer_chat_template": getattr(tokenizer, "chat_template", None),
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", False),
        "vision": vision,
    }, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def store_settings(data_path: str | Path, processor, family: Family, budget: media.MediaBudget,
                   conversation: Conversation, *,
                   image_folder: str | Path | None, video_folder: str | Path | None, allow_urls: bool, deep: bool,
                   min_image_side: int, stage: str = "sft") -> dict:
    """Everything a store's contents depend on, except the data file's bytes."""
    import tokenizers
    import transformers

    images, videos = media_folders(data_path, image_folder, video_folder)
    return {
        "store": STORE_VERSION,
        "vlmtune": vlmtune.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "data_path": os.path.abspath(data_path),
        "image_folder": str(images),
        "video_folder": str(videos),
        # relative media paths are kept relative (as errors name them): they mean something only from one folder
        "cwd": None if images.is_absolute() and videos.is_absolute() else os.getcwd(),
        "allow_urls": allow_urls,
        "deep": deep,
        "min_image_side": min_image_side,
        "family": {"model_type": family.model_type, "patch_size": family.patch_size,
                   "video_timestamps": family.video_timestamps},
        "budget": dataclasses.asdict(budget),
        "processor": processor_fingerprint(processor),
        # the template's switches and how replies are cut (text tokens), and what the label check trains
        "conversation": conversation.fingerprint(),
        "label_mode": conversation.label_mode,
        **({"stage": stage} if stage != "sft" else {}),  # what the records are (SFT stores keep their key)
    }


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _record_hash(text: bytes | str) -> bytes:
    return hashlib.blake2b(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


def group_folder(settings: dict) -> Path:
    return vlmtune.cache_root() / "data" / _digest(settings)[:24]


@contextlib.contextmanager
def _locked(group: Path, exclusive: bool):
    """The group's lock: shared while a store is opened, exclusive while one is built, swapped or deleted."""
    group.mkdir(parents=True, exist_ok=True)
    with open(group / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------- reading a store


def _load(path: Path) -> np.ndarray:
    array_ = np.load(path, mmap_mode="r")
    return np.load(path) if array_.size == 0 else array_


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


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
                             int(self.media_height[m])) for m in video_ids],
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


# ---------------------------------------------------------------- building a store

_WORKER: dict = {}
"""What a measuring job needs (resolvers, conversation): set before worker processes fork, which inherit it."""


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    gc.freeze()  # what the worker inherited is never garbage: no collection walks it (nor copies its pages)


@contextlib.contextmanager
def _no_gc():
    """Cyclic collection off while one job runs: a job allocates many small objects and frees them at its end,
    and each collection would walk every object of the process (transformers and torch make hundreds of
    thousands). Measured: a third of a job's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _encode(record: Record, rid: str | None, keys: list[str]) -> bytes:
    value = [rid, [[m.role, m.text] for m in record.messages], record.images, record.videos, keys]
    # surrogatepass: a lone surrogate escaped in the user's JSON survives the round trip (json.loads(bytes) too)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


Measured = tuple  # (index, blob or None, text tokens, raw id, unknown keys or None, images, videos, problems)


def _measure(items: list[RawItem]) -> list[Measured]:
    """Parse, validate, render and tokenize some records: the work split across processes."""
    resolvers, conversation, stage = _WORKER["resolvers"], _WORKER["conversation"], _WORKER["stage"]
    with _no_gc():
        parsed = [parse_item(item, resolvers, stage) for item in items]
        valid = [record for _, record, _, _, _ in parsed if record is not None]
        counts, label_problems = conversation.measure(valid)  # text tokens as encode() cuts them; the label check
        counts, broken = iter(counts), {p.index: p for p in label_problems}
        out = []
        for index, record, problems, rid, keys in parsed:
            if record is not None and index in broken:  # labels that would not train as written: an error
                next(counts)
                record, problems = None, [*problems, broken[index]]
            if record is None:
                out.append((index, None, 0, rid, keys, None, None, problems))
            else:
                out.append((index, _encode(record, rid, keys), next(counts), rid, keys, record.images,
                            record.videos, ()))
    return out


class _Jobs:
    """Measuring jobs in file order: run here while few, then in forked worker processes, a bounded number
    in flight (so neither the file nor its results are ever held whole)."""

    def __init__(self, processes: int):
        self.processes = processes
        self.pool: ProcessPoolExecutor | None = None
        self.queue: deque = deque()
        self.todo = 0

    def submit(self, payload, items: list[RawItem]) -> Iterator:
        """Queue a job; yields the jobs done meanwhile, in order: (payload, results)."""
        self.todo += len(items)
        if self.pool is None and self.processes > 1 and self.todo > INLINE_LIMIT:
            self.pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_init_worker)
            self.queue = deque((p, i, self.pool.submit(_measure, i) if i else None) for p, i, _ in self.queue)
        future = self.pool.submit(_measure, items) if self.pool is not None and items else None
        self.queue.append((payload, items, future))
        window = 2 * self.processes if self.pool is not None else 1
        while len(self.queue) > window:
            yield self._pop()

    def _pop(self):
        payload, items, future = self.queue.popleft()
        return payload, future.result() if future is not None else _measure(items)

    def drain(self) -> Iterator:
        while self.queue:
            yield self._pop()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class _ReuseIndex:
    """Finds records of an earlier store by the hash of their raw JSON text."""

    def __init__(self, store: DataStore):
        hashes = np.asarray(store.hashes).reshape(-1, 2)
        self.order = np.argsort(hashes[:, 0], kind="stable")
        self.sorted = hashes[self.order, 0]
        self.low = hashes[:, 1]

    def find(self, hashes: np.ndarray) -> np.ndarray:
        """Position in the earlier store of each hash, or -1."""
        if not len(self.sorted):
            return np.full(len(hashes), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.sorted, hashes[:, 0]), len(self.sorted) - 1)
        found = self.order[at]
        same = (self.sorted[at] == hashes[:, 0]) & (self.low[found] == hashes[:, 1])
        return np.where(same, found, -1)


def _chunks(items: Iterable[RawItem], size: int) -> Iterator[list[RawItem]]:
    chunk: list[RawItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def default_processes() -> int:
    """Worker processes for measuring: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _hwm_gb() -> float:
    """This process's peak resident memory so far, GB (Linux; 0 elsewhere)."""
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
    except ImportError:
        return 0.0


class _Builder:
    """Writes one store into a new folder: records streamed from the file, measured in jobs, merged in order."""

    def __init__(self, folder: Path, path: Path, source: DataStore | None, processor, family: Family,
                 budget: media.MediaBudget, conversation: Conversation, settings: dict, *, image_folder,
                 video_folder, allow_urls: bool, deep: bool, min_image_side: int, processes: int, media_workers: int,
                 stage: str = "sft"):
        self.folder, self.path, self.source, self.stage = folder, path, source, stage
        self.processor, self.family, self.budget, self.settings = processor, family, budget, settings
        self.conversation = conversation
        self.deep, self.min_image_side, self.media_workers = deep, min_image_side, media_workers
        self.processes = processes
        self.resolvers = resolvers_for(path, image_folder, video_folder, allow_urls)
        self.stages: dict[str, dict] = {}
        self.pooled = False
        self.media_probed = 0
        self._clear()

    def _clear(self) -> None:
        self.blob = open(self.folder / "records.bin", "wb", buffering=1 << 20)
        self.offsets = array("q", [0])
        self.index = array("q")
        self.hashes = bytearray()
        self.text_tokens = array("q")
        self.media_offsets = array("q", [0])
        self.media_ids = array("q")
        self.n_images = array("q")
        self.media: dict[tuple[int, str], int] = {}
        self.problems: list[Problem] = []
        self.collection = CollectionCheck(self.stage)
        self.count = self.measured = self.reused = self.box_records = 0

    def _stage(self, name: str, start: float) -> float:
        now = time.perf_counter()
        self.stages[name] = {"seconds": round(now - start, 3), "peak_rss_gb": _hwm_gb()}
        return now

    def _add(self, index: int, digest: bytes, blob: bytes, text_tokens: int, images: list, videos: list) -> None:
        self.blob.write(blob)
        self.offsets.append(self.offsets[-1] + len(blob))
        self.index.append(index)
        self.hashes += digest
        self.text_tokens.append(text_tokens)
        for kind, paths in ((_IMAGE, images), (_VIDEO, videos)):
            for p in paths:
                self.media_ids.append(self.media.setdefault((kind, p), len(self.media)))
        self.media_offsets.append(len(self.media_ids))
        self.n_images.append(len(images))

    def _merge(self, payload, results: list[Measured]) -> None:
        indices, digests, reuse = payload
        measured = iter(results)
        for index, digest, at in zip(indices, digests, reuse):
            if at >= 0:
                blob = self.source.read_bytes(int(at))
                rid, _, images, videos, keys = json.loads(blob)
                self._add(index, digest, blob, int(self.source.text_tokens[at]), images, videos)
                self.collection.add(index, rid, keys)
                self.reused += 1
                continue
            _, blob, text_tokens, rid, keys, images, videos, problems = next(measured)
            if keys is not None:
                self.collection.add(index, rid, keys)
            self.problems += problems
            if blob is not None:
                self._add(index, digest, blob, text_tokens, images, videos)
                self.measured += 1

    def _records(self) -> None:
        """Stream, look up, measure and merge every record of the file."""
        reuse_index = _ReuseIndex(self.source) if self.source is not None and len(self.source) else None
        jobs = _Jobs(self.processes)
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # workers fork from here; they are the parallelism
        _WORKER.update(resolvers=self.resolvers, conversation=self.conversation, stage=self.stage)
        try:
            for chunk in _chunks(scan(self.path), CHUNK):
                self.count += len(chunk)
                # records that may declare a box convention (check_data converts those in memory)
                self.box_records += sum(_BOX_KEY[isinstance(text, str)] in text for _, _, text in chunk)
                digests = [_record_hash(text) for _, _, text in chunk]
                if reuse_index is not None:
                    reuse = reuse_index.find(np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2))
                else:
                    reuse = np.full(len(chunk), -1, dtype=np.int64)
                todo = [item for item, at in zip(chunk, reuse) if at < 0]
                payload = ([index for index, _, _ in chunk], digests, reuse.tolist())
                for done in jobs.submit(payload, todo):
                    self._merge(*done)
            for done in jobs.drain():
                self._merge(*done)
        finally:
            self.pooled = jobs.pool is not None
            jobs.close()
            self.blob.close()
            _WORKER.clear()
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved

    def _media(self) -> tuple[np.ndarray, dict[str, np.ndarray], list]:
        """Check each distinct media file once (reusing unchanged results); per file: extra tokens, the table."""
        keys = list(self.media)
        stats = [None if media.is_url(p) else _stat(p) for _, p in keys]
        previous: dict[tuple[int, str], tuple] = {}
        if self.source is not None:
            src = self.source
            for m, (kind, p, stat, error) in enumerate(src.media_table()):
                if error is None:
                    result = (int(src.media_width[m]), int(src.media_height[m])) if kind == _IMAGE else media.VideoInfo(
                        int(src.media_frames[m]), float(src.media_fps[m]), int(src.media_width[m]),
                        int(src.media_height[m]))
                else:
                    result = error
                previous[(kind, p)] = (stat, result)
        results: dict[tuple[int, str], object] = {}
        probe = {_IMAGE: [], _VIDEO: []}
        for key, stat in zip(keys, stats):
            old = previous.get(key)
            fresh = old is not None and (old[0] == stat if not media.is_url(key[1]) else not isinstance(old[1], str))
            if fresh:
                results[key] = old[1]
            else:
                probe[key[0]].append(key[1])
        images, videos = probe_media(probe[_IMAGE], probe[_VIDEO], self.min_image_side, self.deep, self.budget,
                                     self.media_workers)
        results.update({(_IMAGE, p): r for p, r in images.items()})
        results.update({(_VIDEO, p): r for p, r in videos.items()})
        self.media_probed = len(images) + len(videos)

        n = len(keys)
        table = {"media_kind": np.zeros(n, np.int8), "media_width": np.zeros(n, np.int32),
                 "media_height": np.zeros(n, np.int32), "media_frames": np.zeros(n, np.int32),
                 "media_fps": np.zeros(n, np.float64), "media_ok": np.zeros(n, bool)}
        extra = np.zeros(n, np.int64)
        rows = []
        for m, (key, stat) in enumerate(zip(keys, stats)):
            kind, p = key
            result = results[key]
            table["media_kind"][m] = kind
            error = result if isinstance(result, str) else None
            if error is None and kind == _IMAGE:
                table["media_width"][m], table["media_height"][m] = result
                extra[m] = image_extra_tokens(*result, self.budget)
            elif error is None:
                table["media_width"][m], table["media_height"][m] = result.width, result.height
                table["media_frames"][m], table["media_fps"][m] = result.frames, result.fps
                extra[m] = video_extra_tokens(result, self.budget, self.family, self.processor)
            table["media_ok"][m] = error is None
            rows.append([kind, p, stat, error])
        return extra, table, rows

    def build(self) -> dict:
        start = time.perf_counter()
        file_problem = None
        try:
            self._records()
        except FileError as exc:  # nothing of the file is usable: keep the one problem, no records
            file_problem = exc.problem
            self._clear()
            self.blob.close()
        t = self._stage("read, validate, render, tokenize", start)
        extra, table, rows = self._media()
        t = self._stage("media headers", t)

        n = len(self.index)
        media_ids = np.frombuffer(self.media_ids, dtype=np.int64) if len(self.media_ids) else np.zeros(0, np.int64)
        media_offsets = np.frombuffer(self.media_offsets, dtype=np.int64)
        owner = np.repeat(np.arange(n), np.diff(media_offsets))
        text_tokens = np.frombuffer(self.text_tokens, dtype=np.int64) if n else np.zeros(0, np.int64)
        lengths = text_tokens + np.bincount(owner, weights=extra[media_ids], minlength=n).astype(np.int64)
        bad = np.bincount(owner, weights=(~table["media_ok"][media_ids]).astype(np.float64), minlength=n) > 0
        lengths[bad] = -1

        problems = [file_problem] if file_problem else self.problems
        if not self.count and not file_problem:
            problems = [Problem("error", NO_RECORDS)]
        problems += self.collection.warnings()
        if bad.any():
            store = _PartialStore(self.folder, self.offsets)
            index = np.frombuffer(self.index, dtype=np.int64)
            for pos in np.flatnonzero(bad):
                rid = store.raw_id(pos)
                rid = rid if rid is not None else str(int(index[pos]))
                for m in media_ids[media_offsets[pos] : media_offsets[pos + 1]]:
                    if not table["media_ok"][m]:
                        problems.append(Problem("error", rows[m][3], int(index[pos]), rid))
        problems.sort(key=lambda p: -1 if p.index is None else p.index)

        arrays = {
            "offsets": np.frombuffer(self.offsets, dtype=np.int64),
            "index": np.frombuffer(self.index, dtype=np.int64) if n else np.zeros(0, np.int64),
            "hashes": np.frombuffer(bytes(self.hashes), dtype=np.uint64).reshape(-1, 2),
            "text_tokens": text_tokens.astype(np.int32),
            "lengths": lengths.astype(np.int32),
            "media_offsets": media_offsets,
            "media_ids": media_ids.astype(np.int32),
            "n_images": (np.frombuffer(self.n_images, dtype=np.int64) if n else np.zeros(0, np.int64)).astype(np.int32),
            **table,
        }
        for name, value in arrays.items():
            np.save(self.folder / f"{name}.npy", value)
        (self.folder / "media.json").write_text(json.dumps(rows))
        (self.folder / "problems.json").write_text(json.dumps([[p.level, p.message, p.index, p.id] for p in problems]))
        self._stage("lengths and write", t)
        meta = {
            "build_id": uuid.uuid4().hex,
            "created": time.time(),
            "pid": os.getpid(),
            "data_path": str(self.path),
            "records": self.count,
            "stored": n,
            "valid": int((lengths >= 0).sum()),
            "measured": self.measured,
            "box_records": self.box_records,
            "reused": self.reused,
            "media_files": len(rows),
            "media_probed": self.media_probed,
            "processes": self.processes if self.pooled else 1,
            "seconds": round(time.perf_counter() - start, 3),
            "stages": self.stages,
            "settings": self.settings,
        }
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=1))
        return meta


class _PartialStore:
    """The records of a store being built (for the ids in media errors)."""

    def __init__(self, folder: Path, offsets: array):
        with open(folder / "records.bin", "rb") as f:
            self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.offsets = offsets

    def raw_id(self, pos: int):
        return json.loads(self.data[self.offsets[pos] : self.offsets[pos + 1]])[0]


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
                              min_image_side=min_image_side, stage=stage)
    group = group_folder(settings)
    try:
        content = file_digest(path)
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
            meta = _Builder(tmp, path, source, processor, family, budget, conversation, settings,
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
