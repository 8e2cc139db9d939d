"""Building a data store: records streamed from the file, measured in jobs (in worker processes when many),
merged in file order, media checked once per distinct file, everything written as ``vlmtune.data.store`` reads it."""

from __future__ import annotations

import contextlib
import gc
import json
import mmap
import multiprocessing
import os
import time
import uuid
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from vlmtune.data import media
from vlmtune.data.conversation import Conversation
from vlmtune.data.dataset import image_extra_tokens, video_extra_tokens
from vlmtune.data.frames import is_frame_list
from vlmtune.data.progress import Progress
from vlmtune.data.records import (
    NO_RECORDS,
    CollectionCheck,
    RawItem,
    Record,
    parse_item,
    probe_media,
    resolvers_for,
    scan,
)
from vlmtune.data.store_key import _record_hash, _stat
from vlmtune.errors import FileError, Problem
from vlmtune.families import Family

CHUNK = 2048
"""Records per measuring job: what one worker renders and tokenizes at a time (its ids are dropped after)."""
INLINE_LIMIT = 4 * CHUNK
"""Up to this many records to measure, the building process measures them itself (no worker processes)."""
_IMAGE, _VIDEO = 0, 1
_BOX_KEY = (b'"box_format"', '"box_format"')  # as bytes, as str


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
    resolvers, conversation = _WORKER["resolvers"], _WORKER["conversation"]
    data_format, stage = _WORKER["data_format"], _WORKER["stage"]
    with _no_gc():
        parsed = [parse_item(item, resolvers, stage, data_format=data_format) for item in items]
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

    def __init__(self, store):  # a DataStore
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


class Builder:
    """Writes one store into a new folder: records streamed from the file, measured in jobs, merged in order.
    ``source``: the group's latest store (a ``DataStore``) whose unchanged records and media results are reused."""

    def __init__(self, folder: Path, path: Path, source, processor, family: Family,
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
        _WORKER.update(resolvers=self.resolvers, conversation=self.conversation,
                       data_format=self.settings["data_format"], stage=self.stage)
        progress = Progress(f"data store: checking {self.path.name}")
        try:
            for chunk in _chunks(scan(self.path), CHUNK):
                self.count += len(chunk)
                progress.update(self.count)
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
            progress.close()
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
                        int(src.media_height[m]), is_frame_list(p))
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
