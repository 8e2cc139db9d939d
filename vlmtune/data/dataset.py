"""The lazy torch Dataset: a record becomes model inputs only when it is read.

Each record's length (text plus vision tokens) is computed up front from the text and the media headers
that validation already read, so over-long records are reported before training and samplers can group
by length without decoding anything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from vlmtune.data import media
from vlmtune.data.conversation import Conversation
from vlmtune.data.records import Record
from vlmtune.errors import ConfigError, RecordError
from vlmtune.families import Family

logger = logging.getLogger(__name__)


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


LENGTH_CHUNK = 1024
"""Records rendered and tokenized together when measuring lengths: the ids of one chunk are held at a time."""


def image_extra_tokens(width: int, height: int, budget: media.MediaBudget) -> int:
    """Tokens an image adds beyond the one pad its placeholder has in the template text."""
    return media.image_tokens(width, height, budget) - 1


def video_extra_tokens(info: media.VideoInfo, budget: media.MediaBudget, family: Family, processor) -> int:
    """Tokens a video adds beyond the one pad its placeholder has in the template text."""
    extra = media.video_tokens(info, budget) - 1
    if family.video_timestamps:  # Qwen3-VL: "<t seconds><|vision_start|>pads<|vision_end|>" per group
        indices = media.sampled_frame_indices(info, budget)
        groups = -(-len(indices) // media.qvu.FRAME_FACTOR)
        stamps = processor._calculate_timestamps(indices, info.fps, processor.video_processor.temporal_patch_size)
        extra += sum(len(processor.tokenizer.encode(f"<{t:.1f} seconds>", add_special_tokens=False)) + 2
                     for t in stamps[:groups])
    return extra


def _vision_token_counts(record: Record, budget: media.MediaBudget, family: Family, processor) -> int:
    """Tokens the processor adds beyond the one pad per placeholder in the template text."""
    if len(record.image_sizes) != len(record.images) or len(record.video_infos) != len(record.videos):
        raise ValueError(f"record {record.index} (id {record.id!r}): media headers were not read; "
                         "load the records with check_media=True")
    return (sum(image_extra_tokens(w, h, budget) for w, h in record.image_sizes)
            + sum(video_extra_tokens(info, budget, family, processor) for info in record.video_infos))


def record_lengths(records: Sequence[Record], conversation: Conversation, budget, family: Family,
                   text_counts: Sequence[int] | None = None) -> list[int]:
    """Sequence length of every record (text + vision tokens), without decoding any media.

    The text's tokens are counted as ``encode`` cuts them (reply by reply), ``LENGTH_CHUNK`` records at a time, so
    only the lengths are kept; ``text_counts``: the records' ``conversation.token_counts`` when already measured
    (``conversation.measure``)."""
    processor = conversation.processor
    if text_counts is not None:
        return [n + _vision_token_counts(r, budget, family, processor) for r, n in zip(records, text_counts)]
    lengths: list[int] = []
    for start in range(0, len(records), LENGTH_CHUNK):
        chunk = [records[i] for i in range(start, min(start + LENGTH_CHUNK, len(records)))]
        lengths += [n + _vision_token_counts(r, budget, family, processor)
                    for r, n in zip(chunk, conversation.token_counts(chunk))]
    return lengths


def take(records: Sequence[Record], positions) -> Sequence[Record]:
    """The records at ``positions``: a list stays a list, a lazy sequence stays lazy (nothing is decoded)."""
    if hasattr(records, "take"):
        return records.take(positions)
    return [records[int(i)] for i in positions]


class VisionLanguageDataset(Dataset):
    """Records -> items: ``input_ids``, ``labels``, ``attention_mask``, ``mm_token_type_ids`` and vision tensors."""

    def __init__(
        self,
        records: Sequence[Record],
        processor,
        family: Family,
        budget: media.MediaBudget,
        conversation: Conversation,
        max_seq_length: int | None = None,
        strict_length: bool = False,
        lengths: Sequence[int] | None = None,
        source: str | None = None,
    ):
        self.source = source  # the data file, for error messages
        self.processor = processor
        self.family = family
        self.budget = budget
        self.conversation = conversation
        if lengths is None:  # the data check usually measured them already
            lengths = record_lengths(records, conversation, budget, family)
        lengths = np.asarray(lengths, dtype=np.int64)
        over_at = np.flatnonzero(lengths > max_seq_length) if max_seq_length else np.zeros(0, dtype=np.int64)
        over = [(records[int(i)].index, records[int(i)].id, int(lengths[i])) for i in over_at]
        self.length_report = LengthReport(len(records), over, max_seq_length)
        if over and strict_length:
            raise ConfigError(str(self.length_report).replace("skipped", "stopping (--strict_length)") +
                              "; raise --max_seq_length, or drop --strict_length to skip them")
        if over:
            logger.warning(str(self.length_report))
            keep = np.setdiff1d(np.arange(len(records)), over_at)
            records, lengths = take(records, keep), lengths[keep]
        self.records = records
        """The records kept, in order: a list, or a lazy sequence that decodes a record from the store when read."""
        self.lengths: list[int] = lengths.tolist()

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
        # the processor's tensors; ids tokenized reply by reply, labels, and their check (data/conversation.py)
        return encode_with(self.conversation, record, load_media(record, self.budget))


@dataclass
class Media:
    """A record's decoded media, in placeholder order, as the processor takes them."""

    images: list
    videos: list
    metadata: list


def load_media(record: Record, budget: media.MediaBudget) -> Media:
    """Decode a record's images and videos under the budgets (DPO decodes a pair's media once for both halves)."""
    images = [media.load_image(p, budget) for p in record.images]
    videos, metadata = [], []
    for path in record.videos:
        frames, meta = media.load_video(path, budget)
        videos.append(frames)
        metadata.append(meta)
    return Media(images, videos, metadata)


def encode_with(conversation: Conversation, record: Record, decoded: Media) -> dict[str, torch.Tensor]:
    """A record's model inputs from its decoded media (already resized and sampled): ``conversation.encode``."""
    item = conversation.encode(record, decoded.images, decoded.videos, decoded.metadata, do_resize=False,
                               do_sample_frames=False)
    if "second_per_grid_ts" in item:
        item["second_per_grid_ts"] = torch.as_tensor(item["second_per_grid_ts"], dtype=torch.float32)
    return item
