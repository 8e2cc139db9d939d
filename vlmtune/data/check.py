"""``vlmtune check-data``: validate a data file and summarise it, as the trainer does before it starts."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from vlmtune.data import media
from vlmtune.data.conversation import Conversation
from vlmtune.data.dataset import record_lengths
from vlmtune.data.prompts import stage_lengths
from vlmtune.data.records import Problem, Record, read_records
from vlmtune.families import Family


@dataclass
class CheckResult:
    file: str
    records: list[Record]
    problems: list[Problem]
    lengths: list[int]
    max_seq_length: int | None
    seconds: float
    parts: dict[str, list[int]] = field(default_factory=dict)
    """DPO / GRPO: token lengths of the prompt and of the prompt plus each reply, per record."""

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
            for part, values in self.parts.items():
                part_sorted = sorted(values)
                lines.append(f"    {part}: min {part_sorted[0]:,}, median {int(statistics.median(part_sorted)):,}, "
                             f"max {part_sorted[-1]:,}")
            if self.max_seq_length:
                over = [r.id for r, n in zip(self.records, self.lengths) if n > self.max_seq_length]
                shown = ", ".join(map(repr, over[:10])) + (" ..." if len(over) > 10 else "")
                ids = f" (ids {shown})" if over else ""
                lines.append(f"  over {self.max_seq_length:,} tokens: {len(over):,}{ids}")
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
    stage: str = "sft",
) -> CheckResult:
    """Validate every record, check its labels (with ``conversation``: the run's label mode and template switches),
    then measure token lengths (text + vision) of the valid ones.

    ``stage`` "dpo" / "grpo" reads preference / prompt records; the lengths are then those of each record's longest
    training sequence, with the prompt and each reply reported apart (``CheckResult.parts``), and the labels of
    each reply are checked as the last turn of its conversation."""
    start = time.perf_counter()
    records, problems = read_records(
        data_path, image_folder, video_folder, allow_urls=allow_urls, deep=deep,
        min_image_side=family.factor, budget=budget, stage=stage,
    )
    conversation = conversation or Conversation(processor)
    parts: dict[str, list[int]] = {}
    if stage == "sft":  # one pass over the texts: token counts and the label check (data/conversation.py)
        text_counts, label_problems = conversation.measure(records) if records else ([], [])
    else:
        text_counts, parts, label_problems = stage_lengths(records, conversation, budget, family, stage)
    if label_problems:  # such records are errors, not valid records
        bad = {p.index for p in label_problems}
        keep = [i for i, r in enumerate(records) if r.index not in bad]
        records, text_counts = [records[i] for i in keep], [text_counts[i] for i in keep]
        parts = {k: [v[i] for i in keep] for k, v in parts.items()}
        problems = sorted(problems + label_problems, key=lambda p: -1 if p.index is None else p.index)
    if stage == "sft":
        lengths = record_lengths(records, conversation, budget, family, text_counts) if records else []
    else:
        lengths = text_counts
    return CheckResult(str(data_path), records, problems, lengths, max_seq_length, time.perf_counter() - start,
                       parts)
