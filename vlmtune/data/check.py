"""``vlmtune check-data``: validate a data file and summarise it, as the trainer does before it starts."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vlmtune.data import media
from vlmtune.data.conversation import Conversation
from vlmtune.data.dataset import record_lengths
from vlmtune.data.prompts import stage_lengths
from vlmtune.data.records import Record, read_records
from vlmtune.data.store import DataStore, RecordSequence, open_store
from vlmtune.errors import FileError, Problem
from vlmtune.families import Family

BOXES_SHOWN = 10


@dataclass
class CheckResult:
    file: str
    records: Sequence[Record]
    """The valid records, in file order (from the store: decoded when read)."""
    problems: list[Problem]
    lengths: Sequence[int]
    """Token length (text and vision) of each valid record."""
    max_seq_length: int | None
    seconds: float
    store: DataStore | None = None
    parts: dict[str, list[int]] = field(default_factory=dict)
    """DPO / GRPO: token lengths of the prompt and of the prompt plus each reply, per record."""

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    def _media_counts(self) -> tuple[Counter, int, int]:
        if isinstance(self.records, RecordSequence):
            images, videos = self.records.media_counts()
            return self.records.shape_counts(), int(images.sum()), int(videos.sum())
        return (Counter(r.shape for r in self.records), sum(len(r.images) for r in self.records),
                sum(len(r.videos) for r in self.records))

    def summary(self, with_problems: bool = True) -> str:
        shapes, n_images, n_videos = self._media_counts()
        lines = [
            f"{self.file}: {len(self.records):,} valid records ({len(self.errors)} error(s), "
            f"{len(self.problems) - len(self.errors)} warning(s)) in {self.seconds:.1f}s",
            "  shapes: " + (", ".join(f"{k} {v:,}" for k, v in sorted(shapes.items())) or "none"),
            f"  media: {n_images:,} images, {n_videos:,} videos",
        ]
        if len(self.lengths):
            ordered = np.sort(np.asarray(self.lengths))
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            lines.append(f"  tokens (vision included): min {ordered[0]:,}, median {int(np.median(ordered)):,}, "
                         f"p95 {p95:,}, max {ordered[-1]:,}")
            for part, values in self.parts.items():
                part_sorted = sorted(values)
                lines.append(f"    {part}: min {part_sorted[0]:,}, median {int(np.median(part_sorted)):,}, "
                             f"max {part_sorted[-1]:,}")
            if self.max_seq_length:
                over = np.flatnonzero(np.asarray(self.lengths) > self.max_seq_length)
                shown = ", ".join(repr(self.records[int(i)].id) for i in over[:10]) + (" ..." if len(over) > 10 else "")
                ids = f" (ids {shown})" if len(over) else ""
                lines.append(f"  over {self.max_seq_length:,} tokens: {len(over):,}{ids}")
        # boxes are converted on the in-memory path only (the store holds no box records: see check_data)
        with_boxes = [] if isinstance(self.records, RecordSequence) else [r for r in self.records if r.boxes]
        if with_boxes:
            n = sum(len(r.boxes) for r in with_boxes)
            lines.append(f"  boxes: {n:,} in {len(with_boxes):,} record(s), converted to {with_boxes[0].box_format} "
                         "for the images as the model sees them:")
            shown = [(r, c) for r in with_boxes for c in r.boxes][:BOXES_SHOWN]
            for record, c in shown:
                source = ", ".join(f"{v:g}" for v in c.source)
                converted = ", ".join(f"{v:g}" for v in c.converted)
                g = c.geometry
                lines.append(f"    {record.id}: [{source}] -> [{converted}] (image {c.image + 1}: {g.width}x{g.height} "
                             f"px, seen as {g.resized_width}x{g.resized_height})")
            if n > len(shown):
                lines.append(f"    ... and {n - len(shown):,} more")
        for p in self.problems if with_problems else []:
            lines.append(f"{p.level.upper()}: {p.format(self.file)}")
        return "\n".join(lines)


def check_data(
    data_path: str,
    processor,
    family: Family,
    budget: media.MediaBudget,
    *,
    image_folder: str | None = None,
    video_folder: str | None = None,
    allow_urls: bool = False,
    deep: bool = False,
    max_seq_length: int | None = None,
    conversation: Conversation | None = None,
    processes: int | None = None,
    stage: str = "sft",
    box_format: str | None = None,
    data_format: str | None = None,
) -> CheckResult:
    """Validate every record, check its labels (with ``conversation``: the run's label mode and template switches),
    then measure token lengths (text + vision) of the valid ones.

    The results of SFT files live in the data store (``vlmtune.data.store``): built once per node and file
    content, with ``processes`` worker processes (default: every core), and opened in seconds on later runs.

    ``stage`` "cpt" reads documents (``conversation``: a ``vlmtune.data.document.Document``), stored as SFT's are.
    ``stage`` "dpo" / "grpo" reads preference / prompt records (in memory, not stored); the lengths are then those
    of each record's longest training sequence, with the prompt and each reply reported apart
    (``CheckResult.parts``), and the labels of each reply are checked as the last turn of its conversation.
    """
    start = time.perf_counter()
    conversation = conversation or Conversation(processor)
    stored = stage in ("sft", "cpt")  # one sequence per record: its text tokens and lengths go in the store
    if stored and box_format is None:
        try:
            store = open_store(data_path, processor, family, budget, conversation, image_folder=image_folder,
                               video_folder=video_folder, allow_urls=allow_urls, deep=deep,
                               min_image_side=family.factor, processes=processes, data_format=data_format,
                               stage=stage)
        except FileError as exc:
            return CheckResult(str(data_path), [], [exc.problem], np.zeros(0, np.int64), max_seq_length,
                               time.perf_counter() - start)
        if not store.meta.get("box_records"):
            return CheckResult(str(data_path), store.records(), store.problems, store.valid_lengths(),
                               max_seq_length, time.perf_counter() - start, store)
        # Records that declare a box convention: their boxes are rewritten for the images as the model sees them,
        # which changes their text; that happens in memory, below.
    records, problems = read_records(
        data_path, image_folder, video_folder, allow_urls=allow_urls, deep=deep,
        min_image_side=family.factor, budget=budget, stage=stage, box_target=family.box_format, box_format=box_format,
        data_format=data_format,
    )
    parts: dict[str, list[int]] = {}
    if stored:  # one pass over the texts: token counts and the label check (data/conversation.py)
        counts, label_problems = conversation.measure(records) if records else ([], [])
    else:  # the longest sequence of each record, text and vision
        counts, parts, label_problems = stage_lengths(records, conversation, budget, family, stage)
    if label_problems:  # such records are errors, not valid records
        bad = {p.index for p in label_problems}
        keep = [i for i, r in enumerate(records) if r.index not in bad]
        records, counts = [records[i] for i in keep], [counts[i] for i in keep]
        parts = {k: [v[i] for i in keep] for k, v in parts.items()}
        problems = sorted(problems + label_problems, key=lambda p: -1 if p.index is None else p.index)
    lengths = record_lengths(records, conversation, budget, family, counts) if stored else counts
    return CheckResult(str(data_path), records, problems, lengths, max_seq_length, time.perf_counter() - start,
                       parts=parts)
