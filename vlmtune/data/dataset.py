"""The lazy torch Dataset: a record becomes model inputs only when it is read.

Each record's length (text plus vision tokens) is computed up front from the text and the media headers
that validation already read, so over-long records are reported before training and samplers can group
by length without decoding anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from vlmtune.data import media
from vlmtune.data.conversation import Conversation
from vlmtune.data.records import Record
from vlmtune.families import Family

logger = logging.getLogger(__name__)


class RecordError(RuntimeError):
    """A record that failed while being turned into model inputs (a file that only breaks when decoded).

    A DataLoader worker's exception comes back rebuilt from its whole traceback text; this keeps only the
    sentence that says which record and what went wrong, so the user reads one line.
    """

    def __init__(self, message: str):
        marker = f"{RecordError.__module__}.RecordError: "
        if marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


@dataclass
class LengthReport:
    total: int
    skipped: list[tuple[int, str, int]]  # (index, id, length)
    max_seq_length: int | None

    def __str__(self) -> str:
        if not self.skipped:
            return f"all {self.total:,} records fit in {self.max_seq_length} tokens"
        ids = ", ".join(repr(rid) for _, rid, _ in self.skipped[:10])
        more = f" and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
        return (f"{len(self.skipped):,} of {self.total:,} records over {self.max_seq_length:,} tokens "
                f"(vision tokens included), skipped: ids {ids}{more}")


def _vision_token_counts(record: Record, budget: media.MediaBudget, family: Family, processor) -> int:
    """Tokens the processor adds beyond the one pad per placeholder in the template text."""
    if len(record.image_sizes) != len(record.images) or len(record.video_infos) != len(record.videos):
        raise ValueError(f"record {record.index} (id {record.id!r}): media headers were not read; "
                         "load the records with check_media=True")
    extra = sum(media.image_tokens(w, h, budget) - 1 for w, h in record.image_sizes)
    tokenizer = processor.tokenizer
    for info in record.video_infos:
        extra += media.video_tokens(info, budget) - 1
        if family.video_timestamps:  # Qwen3-VL: "<t seconds><|vision_start|>pads<|vision_end|>" per group
            indices = media.sampled_frame_indices(info, budget)
            groups = -(-len(indices) // media.qvu.FRAME_FACTOR)
            stamps = processor._calculate_timestamps(indices, info.fps, processor.video_processor.temporal_patch_size)
            extra += sum(len(tokenizer.encode(f"<{t:.1f} seconds>", add_special_tokens=False)) + 2
                         for t in stamps[:groups])
    return extra


def record_lengths(records: list[Record], conversation: Conversation, budget, family: Family,
                   text_counts: list[int] | None = None) -> list[int]:
    """Sequence length of every record (text + vision tokens), without decoding any media.

    ``text_counts``: the records' ``conversation.token_counts`` when already measured (``conversation.measure``).
    """
    if text_counts is None:  # the text's tokens as encode() cuts them (reply by reply)
        text_counts = conversation.token_counts(records)
    return [n + _vision_token_counts(r, budget, family, conversation.processor) for r, n in zip(records, text_counts)]


class VisionLanguageDataset(Dataset):
    """Records -> items: ``input_ids``, ``labels``, ``attention_mask``, ``mm_token_type_ids`` and vision tensors."""

    def __init__(
        self,
        records: list[Record],
        processor,
        family: Family,
        budget: media.MediaBudget,
        conversation: Conversation,
        max_seq_length: int | None = None,
        strict_length: bool = False,
        lengths: list[int] | None = None,
        source: str | None = None,
    ):
        self.source = source  # the data file, for error messages
        self.processor = processor
        self.family = family
        self.budget = budget
        self.conversation = conversation
        if lengths is None:  # the data check usually measured them already
            lengths = record_lengths(records, conversation, budget, family)
        over = [(r.index, r.id, n) for r, n in zip(records, lengths) if max_seq_length and n > max_seq_length]
        self.length_report = LengthReport(len(records), over, max_seq_length)
        if over and strict_length:
            raise ValueError(str(self.length_report).replace("skipped", "stopping (--strict_length)"))
        if over:
            logger.warning(str(self.length_report))
        keep = {index for index, _, _ in over}
        pairs = [(r, n) for r, n in zip(records, lengths) if r.index not in keep]
        self.records = [r for r, _ in pairs]
        self.lengths = [n for _, n in pairs]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        record = self.records[i]
        try:
            return self.encode(record)
        except Exception as exc:
            message = f"record {record.index} (id {record.id!r}): {exc}"
            if self.source:  # a data file: name it, and say how to find every such record before training
                message = (f"{self.source}: {message}; `vlmtune check-data --deep` (or --deep_check True) decodes "
                           "every file and lists all such records")
            raise RecordError(message) from exc

    def encode(self, record: Record) -> dict[str, torch.Tensor]:
        """Decode the record's media and run the processor on the rendered conversation, cut at its replies."""
        images = [media.load_image(p, self.budget) for p in record.images]
        videos, metadata = [], []
        for path in record.videos:
            frames, meta = media.load_video(path, self.budget)
            videos.append(frames)
            metadata.append(meta)
        # the processor's tensors; ids tokenized reply by reply, labels, and their check (data/conversation.py)
        item = self.conversation.encode(record, images, videos, metadata, do_resize=False, do_sample_frames=False)
        if "second_per_grid_ts" in item:
            item["second_per_grid_ts"] = torch.as_tensor(item["second_per_grid_ts"], dtype=torch.float32)
        return item
