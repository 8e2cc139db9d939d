"""Record -> chat messages -> input ids and assistant-only labels, through the family's own chat template.

The text is rendered by ``processor.apply_chat_template`` and tokenized (with vision tokens expanded) by the
processor itself, so training sees exactly the ids the model sees at inference. Labels are found in those ids:
every assistant turn opens with ``<|im_start|>assistant\\n`` and closes with ``<|im_end|>`` in all Qwen-VL
templates; the reply and its closing token are labelled, nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch

from vlmtune.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Record
from vlmtune.families.base import ASSISTANT_HEADER, IM_END, IMAGE_PAD, VIDEO_PAD

IGNORE_INDEX = -100
LabelMode = Literal["assistant", "last_assistant", "all"]
LABEL_MODES = ("assistant", "last_assistant", "all")
_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


def content_parts(text: str) -> list[dict]:
    """Split text with placeholders into typed parts; the LLaVA newline right after a placeholder is dropped."""
    parts: list[dict] = []
    after_placeholder = False
    for piece in _PLACEHOLDER.split(text):
        if piece in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
            parts.append({"type": "image" if piece == IMAGE_PLACEHOLDER else "video"})
            after_placeholder = True
            continue
        if after_placeholder and piece.startswith("\n"):
            piece = piece[1:]
        after_placeholder = False
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def chat_messages(record: Record) -> list[dict]:
    """The record in the chat format processors take: ``[{"role", "content": [parts]}]``."""
    return [{"role": m.role, "content": content_parts(m.text)} for m in record.messages]


class Conversation:
    """Renders records with a processor's chat template and masks labels to the assistant's replies."""

    def __init__(self, processor, label_mode: LabelMode = "assistant"):
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        self.processor = processor
        self.label_mode = label_mode
        tok = processor.tokenizer
        self.header = tok.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.im_end = tok.convert_tokens_to_ids(IM_END)
        self.vision_pads = {tok.convert_tokens_to_ids(IMAGE_PAD), tok.convert_tokens_to_ids(VIDEO_PAD)}

    def text(self, record: Record) -> str:
        """The chat-template text of the whole conversation (one pad token per image / video)."""
        return self.processor.apply_chat_template(chat_messages(record), tokenize=False)

    def texts(self, records: Sequence[Record]) -> list[str]:
        """``text`` of several records in one call of the processor's template (less overhead per record)."""
        if not records:
            return []
        return list(self.processor.apply_chat_template([chat_messages(r) for r in records], tokenize=False))

    def assistant_spans(self, input_ids: list[int]) -> list[tuple[int, int]]:
        """[start, end) of each assistant reply, its ``<|im_end|>`` included."""
        spans, n, i = [], len(self.header), 0
        while i <= len(input_ids) - n:
            if input_ids[i : i + n] == self.header:
                start = end = i + n
                while end < len(input_ids) and input_ids[end] != self.im_end:
                    end += 1
                spans.append((start, min(end + 1, len(input_ids))))
                i = end
            else:
                i += 1
        return spans

    def labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Labels for one sequence: -100 outside the spans the label mode trains on."""
        ids = input_ids.tolist()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        if self.label_mode == "all":
            keep = torch.tensor([t not in self.vision_pads for t in ids], dtype=torch.bool)
            return torch.where(keep, input_ids, labels)
        spans = self.assistant_spans(ids)
        if self.label_mode == "last_assistant":
            spans = spans[-1:]
        for start, end in spans:
            labels[start:end] = input_ids[start:end]
        return labels
