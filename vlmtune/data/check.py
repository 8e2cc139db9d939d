"""``vlmtune check-data``: validate a data file and summarise it, as the trainer does before it starts."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass

from vlmtune.data import media
from vlmtune.data.conversation import Conversation
from vlmtune.data.dataset import record_lengths
from vlmtune.data.records import Problem, Record, read_records
from vlmtune.families import Family

BOXES_SHOWN = 10


@dataclass
class CheckResult:
    file: str
    records: list[Record]
    problems: list[Problem]
    lengths: list[int]
    max_seq_length: int | None
    seconds: float

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    def summary(self, with_problems: bool = True) -> str:
        shapes = Counter(r.shape for r in self.records)
        n_images = sum(len(r.images) for r in self.records)
        n_videos = sum(len(r.videos) for r in self.records)
        lines = [
            f"{self.file}: {len(self.records):,} valid records ({len(self.errors)} error(s), "
            f"{len(self.problems) - len(self.errors)} warning(s)) in {self.seconds:.1f}s",
            "  shapes: " + (", ".join(f"{k} {v:,}" for k, v in sorted(shapes.items())) or "none"),
            f"  media: {n_images:,} images, {n_videos:,} videos",
        ]
        if self.lengths:
            ordered = sorted(self.lengths)
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            lines.append(f"  tokens (vision included): min {ordered[0]:,}, median {int(statistics.median(ordered)):,}, "
                         f"p95 {p95:,}, max {ordered[-1]:,}")
            if self.max_seq_length:
                over = [r.id for r, n in zip(self.records, self.lengths) if n > self.max_seq_length]
                shown = ", ".join(map(repr, over[:10])) + (" ..." if len(over) > 10 else "")
                ids = f" (ids {shown})" if over else ""
                lines.append(f"  over {self.max_seq_length:,} tokens: {len(over):,}{ids}")
        with_boxes = [r for r in self.records if r.boxes]
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
    box_format: str | None = None,
) -> CheckResult:
    """Validate every record, check its labels (with ``conversation``: the run's label mode and template switches),
    then measure token lengths (text + vision) of the valid ones."""
    start = time.perf_counter()
    records, problems = read_records(
        data_path, image_folder, video_folder, allow_urls=allow_urls, deep=deep,
        min_image_side=family.factor, budget=budget, box_target=family.box_format, box_format=box_format,
    )
    conversation = conversation or Conversation(processor)
    # one pass over the texts: token counts and the label check (data/conversation.py)
    text_counts, label_problems = conversation.measure(records) if records else ([], [])
    if label_problems:  # such records are errors, not valid records
        bad = {p.index for p in label_problems}
        kept = [(r, n) for r, n in zip(records, text_counts) if r.index not in bad]
        records, text_counts = [r for r, _ in kept], [n for _, n in kept]
        problems = sorted(problems + label_problems, key=lambda p: -1 if p.index is None else p.index)
    lengths = record_lengths(records, conversation, budget, family, text_counts) if records else []
    return CheckResult(str(data_path), records, problems, lengths, max_seq_length, time.perf_counter() - start)

