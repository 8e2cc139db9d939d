"""The data view's answers: a data file's records (paged, searched, filtered) and one record as it trains.

Everything comes from the code paths training uses: ``check_data`` (the data store for SFT / CPT files, the
in-memory reader for DPO / GRPO and box records), the stage's dataset class for ids and labels
(``VisionLanguageDataset``, ``PreferenceDataset``, ``PromptDataset``), the ``Conversation`` for the template and
label switches, and the family's ``get_rope_index`` (``RopeIndex``, as packing computes positions) for the 3-D
positions. Nothing here labels or positions a token by itself.
"""

from __future__ import annotations

import mmap
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from vlmtune.data import boxes as box_math
from vlmtune.data import inline
from vlmtune.data.check import check_data
from vlmtune.data.conversation import IGNORE_INDEX, LABEL_MODES, Conversation
from vlmtune.data.dataset import VisionLanguageDataset, load_media
from vlmtune.data.packing import RopeIndex
from vlmtune.data.prompts import PreferenceDataset, PromptDataset
from vlmtune.data.store import RecordSequence
from vlmtune.errors import DataError, Problem
from vlmtune.families.base import IMAGE_PAD, VIDEO_PAD
from vlmtune.rewards import check_fields
from vlmtune.view.reward_pages import prompt_rewards

PAGE_SIZE = 50
SHAPES = ("text", "image", "multi_image", "video", "image+video")
PREVIEW_CHARS = 120
RECORDS_FILE = "records.bin"
"""The data store's file of records, one JSON array each (``vlmtune.data.store``)."""


def problem_line(problem: Problem, file: str) -> str:
    """A problem as ``check-data`` prints it."""
    return f"{problem.level.upper()}: {problem.format(file)}"


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of labels that are not IGNORE_INDEX."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


class DataView:
    """One data file under one model's processor, template switches and budgets, checked as ``check-data`` does."""

    def __init__(self, data_path: str, processor, family, config, budget, *, stage: str = "sft",
                 max_seq_length: int | None = None, label_mode: str = "assistant",
                 enable_thinking: bool | None = None, keep_earlier_reasoning: bool = False, rewards: list | None = None,
                 reward_settings: dict | None = None, **check_kwargs):
        """``rewards`` / ``reward_settings`` (GRPO): the loaded reward functions and ``reward_settings()`` of the
        flags, shown with every prompt."""
        self.file = str(data_path)
        self.rewards, self.reward_settings = rewards or [], reward_settings
        self.processor, self.family, self.budget, self.stage = processor, family, budget, stage
        self.max_seq_length = max_seq_length
        self.defaults = {"label_mode": label_mode, "enable_thinking": enable_thinking,
                         "keep_earlier_reasoning": keep_earlier_reasoning}
        self._conversations: dict[tuple, object] = {}
        result = check_data(data_path, processor, family, budget, conversation=self.conversation(**self.defaults),
                            max_seq_length=max_seq_length, stage=stage, **check_kwargs)
        self.result = result
        self.records = result.records
        self.rope = RopeIndex(config)
        if isinstance(self.records, RecordSequence):
            store = self.records.store
            valid_index = np.asarray(store.index)[self.records.positions]
            images, videos = self.records.media_counts()
            code = np.where(videos > 0, np.where(images > 0, 4, 3), np.where(images > 1, 2, np.where(images > 0, 1, 0)))
        else:
            valid_index = np.array([r.index for r in self.records], dtype=np.int64)
            code = np.array([SHAPES.index(r.shape) for r in self.records], dtype=np.int64)
        self.problems: dict[int | None, list[Problem]] = defaultdict(list)
        for p in [*result.problems, *self._reward_problems()]:
            self.problems[p.index].append(p)
        self.bad_ids = {p.index: p.id for p in result.problems if p.index is not None and p.level == "error"}
        bad_ids = np.fromiter(self.bad_ids, dtype=np.int64, count=len(self.bad_ids))
        bad = np.sort(bad_ids[~np.isin(bad_ids, valid_index, assume_unique=True)])  # not a Python set of 1M ints
        # every row of the list: valid records (position >= 0 in self.records) and records with errors (-1)
        index = np.concatenate([valid_index, bad])
        position = np.concatenate([np.arange(len(valid_index)), np.full(len(bad), -1)])
        lengths = np.concatenate([np.asarray(result.lengths, dtype=np.int64), np.full(len(bad), -1)])
        shape = np.concatenate([code, np.full(len(bad), -1)])
        order = np.argsort(index, kind="stable")
        self.index, self.position, self.lengths, self.shape = index[order], position[order], lengths[order], \
            shape[order]
        self.has_problem = np.isin(self.index, np.array([i for i in self.problems if i is not None], dtype=np.int64))
        self._allowed: set[str] | None = None
        self._summary: str | None = None
        self._decoded: tuple[int, object] | None = None  # the last record's decoded media (its frames are asked next)

    def _reward_problems(self) -> list[Problem]:
        """What ``vlmtune grpo`` checks before its first step: every prompt has the fields its rewards read."""
        if not self.rewards:  # (no reward: no pass over the records, which a large store would decode one by one)
            return []
        try:
            check_fields(self.rewards, self.records, self.file)
        except DataError as exc:
            return exc.problems
        return []

    # ------------------------------------------------------------------ switches

    def conversation(self, label_mode: str = "assistant", enable_thinking: bool | None = None,
                     keep_earlier_reasoning: bool = False):
        """The run's ``Conversation`` (a ``Document`` for CPT) under these switches, built once each."""
        key = (label_mode, enable_thinking, keep_earlier_reasoning)
        if key not in self._conversations:
            if self.stage == "cpt":
                from vlmtune.data.document import Document

                self._conversations[key] = Document(self.processor)
            else:
                self._conversations[key] = Conversation(self.processor, label_mode, enable_thinking=enable_thinking,
                                                        keep_earlier_reasoning=keep_earlier_reasoning)
        return self._conversations[key]

    def info(self) -> dict:
        """What the page shows at the top: the file, its summary as ``check-data`` prints it, the switches."""
        if self._summary is None:
            self._summary = self.result.summary(False)
        return {"mode": "data", "file": self.file, "stage": self.stage, "summary": self._summary,
                "max_seq_length": self.max_seq_length, "defaults": self.defaults, "label_modes": list(LABEL_MODES),
                "has_thinking_switch": "enable_thinking" in self.conversation(**self.defaults).template_source()
                if self.stage != "cpt" else False,
                "file_problems": [problem_line(p, self.file) for p in self.problems.get(None, [])],
                "shapes": list(SHAPES), "rows": int(len(self.index)), "rewards": self.reward_settings}

    # ------------------------------------------------------------------ the list

    def _record(self, row: int):
        pos = int(self.position[row])
        return self.records[pos] if pos >= 0 else None

    def _matches(self, row: int, query: str) -> bool:
        record = self._record(row)
        if record is None:
            rid = self.bad_ids.get(int(self.index[row])) or ""
            return query in str(rid).lower()
        texts = [str(record.id), *(m.text for m in record.messages), record.chosen or "", record.rejected or ""]
        return any(query in t.lower() for t in texts)

    def _candidates(self, query: str) -> np.ndarray | None:
        """Rows that may match ``query``: those whose stored JSON holds it (case-insensitive), found in one regex
        pass over the store's ``records.bin`` (its format: ``vlmtune.data.store``), so a search of a large file
        decodes only these. None: every row is a candidate (no store, or a query JSON would escape)."""
        if not isinstance(self.records, RecordSequence) or not (query.isascii() and query.isprintable()) \
                or any(c in query for c in '"\\/'):
            return None
        store = self.records.store
        with open(store.folder / RECORDS_FILE, "rb") as f:
            if not os.fstat(f.fileno()).st_size:
                return self.position < 0
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                starts = [m.start() for m in re.finditer(re.escape(query.encode()), blob, re.IGNORECASE)]
        hits = np.unique(np.searchsorted(np.asarray(store.offsets), starts, side="right") - 1)
        stored = self.records.positions[np.maximum(self.position, 0)]  # each row's position in the store
        return (self.position < 0) | np.isin(stored, hits)  # records with errors: matched by id

    def rows(self, *, page: int = 0, query: str = "", shape: str = "", min_length: int | None = None,
             max_length: int | None = None, problems: bool = False, over: bool = False) -> dict:
        """One page of the list, filtered (shape, length range, with problems, over ``--max_seq_length``) and
        searched (id and text, case-insensitive)."""
        keep = np.ones(len(self.index), dtype=bool)
        if shape:
            keep &= self.shape == (SHAPES.index(shape) if shape in SHAPES else -2)
        if min_length is not None:
            keep &= self.lengths >= min_length
        if max_length is not None:
            keep &= (self.lengths <= max_length) & (self.lengths >= 0)
        if problems:
            keep &= self.has_problem
        if over and self.max_seq_length:
            keep &= self.lengths > self.max_seq_length
        if query:
            query = query.lower()
            candidates = self._candidates(query)
            if candidates is not None:
                keep &= candidates
            rows = np.array([r for r in np.flatnonzero(keep) if self._matches(int(r), query)], dtype=np.int64)
        else:
            rows = np.flatnonzero(keep)
        start = max(page, 0) * PAGE_SIZE
        return {"total": int(len(rows)), "page": page, "page_size": PAGE_SIZE,
                "rows": [self._row(int(r)) for r in rows[start: start + PAGE_SIZE]]}

    def _row(self, row: int) -> dict:
        record, index = self._record(row), int(self.index[row])
        length = int(self.lengths[row])
        out = {"index": index, "length": length if length >= 0 else None,
               "over": bool(self.max_seq_length and length > self.max_seq_length),
               "problems": [problem_line(p, self.file) for p in self.problems.get(index, [])]}
        if record is None:
            return {**out, "id": self.bad_ids.get(index), "shape": None, "preview": ""}
        text = next((m.text for m in record.messages if m.role == "user"), record.messages[0].text if
                    record.messages else "")
        return {**out, "id": record.id, "shape": record.shape, "images": len(record.images),
                "videos": len(record.videos), "preview": text[:PREVIEW_CHARS]}

    # ------------------------------------------------------------------ one record

    def record(self, index: int, label_mode: str | None = None, enable_thinking: bool | None = None,
               keep_earlier_reasoning: bool | None = None) -> dict | None:
        """One record as it trains: its media, every token (id, text, label, 3-D position), the reply spans, the
        vision blocks, its length and problems. None: no record has this index."""
        rows = np.flatnonzero(self.index == index)
        if not len(rows):
            return None
        row = int(rows[0])
        switches = {k: v for k, v in (("label_mode", label_mode), ("enable_thinking", enable_thinking),
                                      ("keep_earlier_reasoning", keep_earlier_reasoning)) if v is not None}
        switches = {**self.defaults, **switches}
        out = {**self._row(row), "switches": switches, "max_seq_length": self.max_seq_length}
        record = self._record(row)
        if record is None:
            return out
        out["media"] = [{"kind": "image", "width": w, "height": h, "inline": inline.is_inline(p),
                         "url": f"/api/image?index={index}&image={k}" if inline.is_inline(p) else file_url(p)}
                        for k, (p, (w, h)) in enumerate(zip(record.images, record.image_sizes))]
        out["media"] += [{"kind": "video", "url": None if v.listed else file_url(p), "width": v.width,
                          "height": v.height, "frames": v.frames, "fps": v.fps, "listed": v.listed}
                         for p, v in zip(record.videos, record.video_infos)]  # a frame list: its frames below
        out["boxes"] = [self._box(b) for b in record.boxes]
        if record.videos:
            out["frames"] = self._frames(index, record)
        if record.fields:
            out["fields"] = {k: v for k, v in record.fields.items()}
        if self.reward_settings is not None:
            out["rewards"] = prompt_rewards(self.rewards, self.reward_settings, record)
        try:
            out["sequences"] = self._sequences(record, self.conversation(**switches))
        except Exception as exc:  # the same failure training would stop on: shown, not raised
            out["encode_error"] = f"{type(exc).__name__}: {exc}"
        return out

    def _decoded_media(self, index: int, record):
        if self._decoded is None or self._decoded[0] != index:
            self._decoded = (index, load_media(record, self.budget))
        return self._decoded[1]

    def _frames(self, index: int, record) -> list[dict]:
        """Each video's frames as training samples them: their index in the file, time, and resized size."""
        decoded = self._decoded_media(index, record)
        out = []
        for k, (frames, meta) in enumerate(zip(decoded.videos, decoded.metadata)):
            fps = float(meta.get("fps") or 0)
            out.append({"video": k, "height": int(frames.shape[-2]), "width": int(frames.shape[-1]),
                        "frames": [{"index": int(f), "time": round(f / fps, 3) if fps else None,
                                    "url": f"/api/frame?index={index}&video={k}&frame={j}"}
                                   for j, f in enumerate(meta.get("frames_indices", range(len(frames))))]})
        return out

    def frame_png(self, index: int, video: int, frame: int) -> bytes | None:
        """One sampled frame of a record's video as the model gets it (resized), as PNG; None: no such frame."""
        import io

        from PIL import Image

        rows = np.flatnonzero(self.index == index)
        record = self._record(int(rows[0])) if len(rows) else None
        if record is None or not 0 <= video < len(record.videos):
            return None
        frames = self._decoded_media(index, record).videos[video]
        if not 0 <= frame < len(frames):
            return None
        array = frames[frame].clamp(0, 255).byte().permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    def image_bytes(self, index: int, image: int) -> tuple[bytes, str] | None:
        """The bytes and media type of record ``index``'s image ``image`` when the record gives it as bytes (a
        ``data:`` URI, a Parquet / Arrow cell): decoded from the record's own name for it, in memory, as training
        reads it. None: no such record, image, or the image is a file (served by ``/file``)."""
        rows = np.flatnonzero(self.index == index)
        record = self._record(int(rows[0])) if len(rows) else None
        if record is None or not 0 <= image < len(record.images) or not inline.is_inline(record.images[image]):
            return None
        name = str(record.images[image])
        data = inline.inline_bytes(name)
        return data, inline.media_type(name, data) or "application/octet-stream"

    def _box(self, b) -> dict:
        fmt = self.family.box_format
        original = box_math.convert(b.converted, fmt, "pixel_original", b.geometry, rounded=False)
        return {"image": b.image, "source": list(b.source), "converted": list(b.converted), "format": fmt,
                "original": [float(v) for v in original], "width": b.geometry.width, "height": b.geometry.height,
                "resized": [b.geometry.resized_width, b.geometry.resized_height]}

    def _sequences(self, record, conversation) -> list[dict]:
        args = (self.processor, self.family, self.budget, conversation)
        if self.stage == "dpo":
            pair = PreferenceDataset([record], *args, lengths=[0]).encode(record)
            return [self._tokens(name, item) for name, item in pair.items()]
        if self.stage == "grpo":
            return [self._tokens("prompt", PromptDataset([record], *args, lengths=[0]).encode(record))]
        item = VisionLanguageDataset([record], *args, lengths=[0]).encode(record)
        replies = None
        if self.stage == "sft" and conversation.label_mode != "assistant":  # where every reply is
            every = self.conversation("assistant", conversation.template_kwargs.get("enable_thinking"),
                                      conversation.keep_earlier_reasoning)
            replies = _runs(VisionLanguageDataset([record], self.processor, self.family, self.budget, every,
                                                  lengths=[0]).encode(record)["labels"].tolist())
        return [self._tokens("record", item, replies)]

    def _tokens(self, name: str, item: dict, replies: list[tuple[int, int]] | None = None) -> dict:
        """A sequence as segments: text tokens one by one, each run of vision pads as one block."""
        ids = item["input_ids"].tolist()
        labels = item["labels"].tolist() if "labels" in item else [IGNORE_INDEX] * len(ids)
        positions = self.rope(item).tolist()  # (3, n)
        tok = self.processor.tokenizer
        pads = {tok.convert_tokens_to_ids(IMAGE_PAD): "image", tok.convert_tokens_to_ids(VIDEO_PAD): "video"}
        texts = tok.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        spans = _runs(labels) if replies is None else replies
        reply_of = {}
        for k, (start, end) in enumerate(spans):
            reply_of.update({i: k for i in range(start, end)})
        segments, i, seen = [], 0, {"image": 0, "video": 0}
        while i < len(ids):
            kind = pads.get(ids[i])
            if kind:
                end = i
                while end < len(ids) and ids[end] == ids[i]:
                    end += 1
                seen[kind] += 1
                segments.append({"vision": kind, "n": seen[kind], "count": end - i, "start": i, "id": ids[i],
                                 "first": [p[i] for p in positions], "last": [p[end - 1] for p in positions]})
                i = end
                continue
            segments.append({"i": i, "id": ids[i], "text": texts[i], "label": labels[i],
                             "pos": [p[i] for p in positions], "reply": reply_of.get(i)})
            i += 1
        grids = {k: item[k].tolist() for k in ("image_grid_thw", "video_grid_thw") if k in item}
        return {"name": name, "length": len(ids), "trained": sum(label != IGNORE_INDEX for label in labels),
                "replies": len(spans), "segments": segments, "grids": grids}

    # ------------------------------------------------------------------ files

    def allowed_files(self) -> set[str]:
        """Real paths of every medium the file's records refer to: the only files the server hands out."""
        if self._allowed is None:
            if isinstance(self.records, RecordSequence):
                paths = [row[1] for row in self.records.store.media_table()]
            else:
                paths = [p for r in self.records for p in (*r.images, *r.videos)]
            self._allowed = {os.path.realpath(p) for p in paths  # bytes (data: URIs, cells) go by /api/image
                             if not str(p).startswith(("http://", "https://")) and not inline.is_inline(p)}
        return self._allowed


def file_url(path: str | Path) -> str:
    """The page's address of a medium (the server checks it against ``allowed_files``)."""
    from urllib.parse import quote

    return "/file?path=" + quote(os.path.abspath(path))
