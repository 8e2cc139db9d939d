"""Continued pre-training (CPT): a record's text as one document, no chat template, every text token trained.

A CPT record is a ``text`` with its media (``vlmtune.data.records``: one message of role ``document``, one
``<image>`` / ``<video>`` placeholder per medium where it goes). ``Document`` writes it as the base model read its
pre-training data: the tokenizer's BOS where it has one (Qwen tokenizers have none), the text with the family's
vision tokens at each placeholder (``<|vision_start|><|image_pad|><|vision_end|>``, as the chat templates write
them; the processor expands the pads, and Qwen3-VL's adds its ``<t seconds>`` stamps before each video frame
group), then ``<|endoftext|>``, the token that ends every document in Qwen's pre-training (the ``eos_token`` of
the base models' tokenizers; Instruct tokenizers name ``<|im_end|>`` instead, which ends a chat turn).

Labels: every token but the vision pads, which are the vision tower's outputs and never train. The text is kept as
written (the newline after a placeholder too: a document is not a chat turn).

``Document`` has ``Conversation``'s interface where the data path uses one (``measure``, ``token_counts``,
``fingerprint``, ``encode``), so the dataset, the data store, packing and the length checks are SFT's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

from vlmtune.data.conversation import _PER_TOKEN, IGNORE_INDEX, _token_ids
from vlmtune.data.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Record
from vlmtune.errors import Problem
from vlmtune.families.base import ENDOFTEXT, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

IMAGE_TOKENS = VISION_START + IMAGE_PAD + VISION_END
VIDEO_TOKENS = VISION_START + VIDEO_PAD + VISION_END


class Document:
    """Renders CPT records as documents and labels every token but the vision pads."""

    label_mode = "all"
    """What trains (the data store keys on it): all text."""

    def __init__(self, processor):
        self.processor = processor
        tok = processor.tokenizer
        self.vision_pads = {tok.convert_tokens_to_ids(IMAGE_PAD), tok.convert_tokens_to_ids(VIDEO_PAD)}
        self.bos = tok.bos_token or ""
        self.end = ENDOFTEXT

    def text(self, record: Record) -> str:
        """The document: BOS (if the tokenizer has one), the text with vision tokens at the placeholders, the end."""
        body = record.messages[0].text.replace(IMAGE_PLACEHOLDER, IMAGE_TOKENS).replace(VIDEO_PLACEHOLDER,
                                                                                        VIDEO_TOKENS)
        return self.bos + body + self.end

    def fingerprint(self) -> str:
        """What a record's tokens depend on besides the record and the tokenizer (the data store keys on it)."""
        facts = {"document": "v1", "bos": self.bos, "end": self.end}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]

    def labels(self, ids: Sequence[int]) -> list[int]:
        """Every token's own id, but -100 at the vision pads."""
        return [IGNORE_INDEX if t in self.vision_pads else t for t in ids]

    def measure(self, records: Sequence[Record], check: bool = True) -> tuple[list[int], list[Problem]]:
        """Token count of each record's document (one pad per image / video); no label problems can arise (every
        token but the pads trains), so the list of problems is empty."""
        return [len(ids) for ids in _token_ids(self.processor.tokenizer, [self.text(r) for r in records])], []

    def token_counts(self, records: Sequence[Record]) -> list[int]:
        return self.measure(records, check=False)[0]

    def label_problems(self, records: Sequence[Record]) -> list[Problem]:
        return []

    def encode(self, record: Record, images=None, videos=None, video_metadata=None, **processor_kwargs) -> dict:
        """Model inputs of a record with its decoded media: the processor's tensors for the document, ``labels``."""
        encoded = self.processor(text=[self.text(record)], images=images or None, videos=videos or None,
                                 video_metadata=video_metadata or None, add_special_tokens=False, return_tensors="pt",
                                 **processor_kwargs)
        item = {k: v for k, v in encoded.items() if k not in _PER_TOKEN}
        for key in _PER_TOKEN:
            if key in encoded:
                item[key] = encoded[key][0]
        item["labels"] = torch.tensor(self.labels(item["input_ids"].tolist()), dtype=item["input_ids"].dtype)
        return item
