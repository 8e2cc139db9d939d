"""Record -> chat messages -> input ids and assistant-only labels, through the family's own chat template.

How a record becomes ids and labels
===================================

1. **Render.** ``processor.apply_chat_template`` writes the whole conversation with the checkpoint's own template
   (and its switches, e.g. ``enable_thinking``). That text is exact ground truth for what trains: validation refuses
   ``<|im_start|>`` and ``<|im_end|>`` inside records, so every ``<|im_start|>assistant\\n`` in it opens an assistant
   turn the template wrote, and the next ``<|im_end|>`` closes it.
2. **Find each reply in the text.** A turn's *reply* is what the model generates at inference: it starts right after
   the template's generation prompt and ends with ``<|im_end|>`` (included). The generation prompt is
   ``<|im_start|>assistant\\n`` plus whatever the template adds after it (``generation_prompt``: nothing for the
   Qwen2-VL / Qwen2.5-VL / Qwen3-VL Instruct templates, ``<think>\\n`` for Qwen3-VL-Thinking and Qwen3.5,
   ``<think>\\n\\n</think>\\n\\n`` for Qwen3.5 with ``enable_thinking=False``); where a turn does not start with that
   addition (an earlier turn whose reasoning the template stripped), the reply starts after the header.
3. **Tokenize piece by piece.** The text is cut at the start and the end of every reply (``Rendered.pieces``:
   prompt, reply, prompt, ..., prompt) and the processor tokenizes the pieces (expanding the vision pads) as one
   batch; their ids are joined. The reply pieces are the labels (as the label mode says). Nothing is searched for in
   the ids.

   Why pieces: a byte-level BPE may merge across the cut. The header ends with ``\\n``; a reply that starts with
   ``\\n`` (or a thinking reply ``\\n</think>...`` after ``<think>\\n``) makes one ``\\n\\n`` token with it when the
   whole text is tokenized at once, and the reply has no first token of its own. At inference the prompt ends with
   the header's own ``\\n`` and the model generates the reply's tokens after it; the pieces give exactly those
   tokens, so the labelled span decodes exactly to the reply and its ``<|im_end|>``. Where no token crosses a cut
   (the normal case: ``<|im_end|>`` is a special token, and replies rarely start with a newline), the joined ids are
   the processor's ids for the whole text, token for token.
4. **Check every record**, always (``problem``; ``encode`` raises ``LabelError``): the labelled spans (runs of labels
   that are not -100) are as many as the replies the label mode trains, and each decodes to its reply (after the
   tokenizer's normalization, e.g. NFC) with its ``<|im_end|>``; in ``all`` mode every reply is labelled.
   ``check-data`` runs the same check on the text of every record of a file (``measure`` / ``label_problems``).

Counting tokens before training (``token_counts``, or ``measure`` with the check) tokenizes the same pieces, so the
up-front lengths are the lengths of the ids that train.

Thinking templates (Qwen3-VL-Thinking, Qwen3.5)
===============================================

These templates take the reasoning of an assistant turn from ``<think>...</think>`` at the start of its text and
write ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` in the turns after the last user message (the last turn, in
LLaVA data), and the answer alone in earlier turns. What trains:

- **Last turn, data with reasoning**: the reasoning stays in the labelled span. The span starts after the generation
  prompt's ``<think>\\n`` and holds ``{reasoning}\\n</think>\\n\\n{answer}<|im_end|>``.
- **Last turn, data without reasoning**: the template writes an empty block ``<think>\\n\\n</think>\\n\\n`` before the
  answer. With thinking on (Qwen3-VL-Thinking; Qwen3.5 unless ``enable_thinking=False``) ``<think>\\n`` is prompt
  and ``\\n</think>\\n\\n{answer}<|im_end|>`` is labelled: the model learns to close its reasoning at once and
  answer. With ``enable_thinking=False`` (Qwen3.5; the default of the 0.8B / 2B template) the whole empty block is
  prompt and only ``{answer}<|im_end|>`` is labelled.
- **Earlier turns**: the template drops their reasoning; the answer is labelled as the template writes it.
  ``keep_earlier_reasoning=True`` (``--keep_earlier_reasoning``) writes every earlier turn as the template writes a
  last turn (the one ``render(messages[: turn + 1])`` ends with), so its reasoning stays in the text and in the
  labelled span.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from vlmtune.data.processor_call import ProcessorCall, mm_token_types
from vlmtune.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Record
from vlmtune.data.template_fill import Skeleton, shape_of, texts_of, writes_text_verbatim
from vlmtune.data.tokens import decoded as _decoded
from vlmtune.data.tokens import normalizer as _normalizer_of
from vlmtune.data.tokens import token_ids as _token_ids
from vlmtune.errors import LabelError, Problem
from vlmtune.families.base import ASSISTANT_HEADER, IM_END, IMAGE_PAD, VIDEO_PAD

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LabelMode = Literal["assistant", "last_assistant", "all"]
LABEL_MODES = ("assistant", "last_assistant", "all")
_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")


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


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation, cut at the start and end of every assistant reply."""

    pieces: tuple[str, ...]
    """Prompt, reply, prompt, reply, ..., prompt: ``pieces[2 * i + 1]`` is reply i, its ``<|im_end|>`` included."""
    turns: tuple[int, ...]
    """Index in the record's messages (= in its ``conversations``) of every assistant message, in order."""

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def replies(self) -> tuple[str, ...]:
        return self.pieces[1::2]


def _turn_bounds(text: str, generation_prompt: str) -> list[tuple[int, int, int]]:
    """(body start, reply start, reply end) of every closed assistant turn in a rendered text.

    The body starts after ``<|im_start|>assistant\\n``; the reply after the generation prompt's addition where the
    body starts with it; the reply ends after its ``<|im_end|>``. An open turn at the end (a generation prompt) is
    not a reply.
    """
    bounds, search = [], 0
    while (header := text.find(ASSISTANT_HEADER, search)) >= 0:
        body = header + len(ASSISTANT_HEADER)
        end = text.find(IM_END, body)
        if end < 0:
            break
        start = body + len(generation_prompt) if generation_prompt and text.startswith(generation_prompt, body) \
            else body
        search = end + len(IM_END)
        bounds.append((body, start, search))
    return bounds


def _runs(labels: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of labels that are not IGNORE_INDEX."""
    trained = np.zeros(len(labels) + 2, dtype=bool)
    trained[1:-1] = np.asarray(labels) != IGNORE_INDEX
    edges = np.flatnonzero(trained[1:] != trained[:-1]).tolist()
    return list(zip(edges[::2], edges[1::2]))


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


class Conversation:
    """Renders records with a processor's chat template, tokenizes them reply by reply, labels the replies.

    ``enable_thinking``: passed to the template (None: the template's default); ignored, with one log line, where
    the template has no such switch. ``keep_earlier_reasoning``: earlier turns keep their reasoning (see the module
    docstring).
    """

    add_generation_prompt = False
    """True: the text ends with the generation prompt (``predict``), so it has no reply of its own."""

    def __init__(self, processor, label_mode: LabelMode = "assistant", *, enable_thinking: bool | None = None,
                 keep_earlier_reasoning: bool = False):
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        self.processor = processor
        self.label_mode = label_mode
        self.keep_earlier_reasoning = keep_earlier_reasoning
        tok = processor.tokenizer
        self.vision_pads = {tok.convert_tokens_to_ids(IMAGE_PAD), tok.convert_tokens_to_ids(VIDEO_PAD)}
        self.template_kwargs: dict = {}
        if enable_thinking is not None:
            if "enable_thinking" in self.template_source():
                self.template_kwargs["enable_thinking"] = enable_thinking
            else:
                logger.warning("the chat template has no enable_thinking switch: enable_thinking=%s changes nothing",
                               enable_thinking)
        self._generation_prompt: str | None = None
        self._mm_types = "mm_token_type_ids" in getattr(processor, "model_input_names", ())
        """Whether the processor returns ``mm_token_type_ids`` (Qwen-VL processors: by default)."""
        self._fills: bool | None = None  # whether the template may be filled per shape (data/template_fill.py)
        self._skeletons: dict[tuple, Skeleton | None] = {}
        self._normalizer = None  # text -> as the tokenizer normalizes it (data/tokens.py)
        self._calls: dict[tuple, ProcessorCall] = {}  # the processor's call per set of switches (processor_call.py)

    # ------------------------------------------------------------------ rendering

    def template_source(self) -> str:
        """The processor's chat template (its "default" one where it has several)."""
        template = getattr(self.processor, "chat_template", None) or ""
        return template.get("default", "") if isinstance(template, dict) else template

    def _apply_template(self, messages: list, add_generation_prompt: bool = False):
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **self.template_kwargs)

    @property
    def generation_prompt(self) -> str:
        """What the template's generation prompt writes after ``<|im_start|>assistant\\n`` (often nothing)."""
        if self._generation_prompt is None:
            messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
            without = self._apply_template(messages)
            with_prompt = self._apply_template(messages, add_generation_prompt=True)
            added = with_prompt[len(without):]
            if not (with_prompt.startswith(without) and added.startswith(ASSISTANT_HEADER)):
                raise LabelError(f"the chat template's generation prompt is {_short(added)}, not "
                                 f"{ASSISTANT_HEADER!r} (ChatML, as every Qwen-VL template writes it): vlmtune cannot "
                                 "tell where replies start with this template")
            self._generation_prompt = added[len(ASSISTANT_HEADER):]
        return self._generation_prompt

    def render(self, record: Record) -> Rendered:
        """The record rendered by the chat template and cut at its replies."""
        return self.render_many([record])[0]

    def render_many(self, records: Sequence[Record]) -> list[Rendered]:
        """``render`` of each record, through one call of the template for all (the processor renders each
        conversation of a batch on its own, as it renders one: the same texts, without its per-call work)."""
        if not records:
            return []
        conversations = [chat_messages(record) for record in records]
        texts = self._texts(conversations)
        generation_prompt = self.generation_prompt
        out = []
        for record, messages, text in zip(records, conversations, texts):
            turns = tuple(i for i, m in enumerate(record.messages) if m.role == "assistant")
            if self.keep_earlier_reasoning:
                text = self._with_earlier_reasoning(text, messages, turns)
            pieces, pos = [], 0
            for _, start, end in _turn_bounds(text, generation_prompt):
                pieces += [text[pos:start], text[start:end]]
                pos = end
            pieces.append(text[pos:])
            out.append(Rendered(tuple(pieces), turns))
        return out

    def _texts(self, conversations: list[list[dict]]) -> list[str]:
        """The template's text of each conversation: filled into its shape's skeleton where the template allows it
        (``vlmtune.data.template_fill``), else rendered, all in one call of the processor's method (which takes a
        list of conversations and renders each alone)."""
        if self._fills is None:
            try:
                from transformers.utils.chat_template_utils import _compile_jinja_template

                source = self.template_source()
                self._fills = writes_text_verbatim(_compile_jinja_template(source).environment, source)
            except Exception:  # noqa: BLE001 (no such helper, or a template it cannot compile: render each)
                self._fills = False
        out: list[str | None] = [None] * len(conversations)
        todo = list(range(len(conversations)))
        if self._fills:
            todo = []
            for k, conversation in enumerate(conversations):
                shape = shape_of(conversation)
                if shape is not None and shape not in self._skeletons:
                    self._skeletons[shape] = Skeleton.build(
                        shape, lambda messages: self._apply_template(messages, self.add_generation_prompt))
                skeleton = self._skeletons.get(shape) if shape is not None else None
                if skeleton is None:
                    todo.append(k)
                else:
                    out[k] = skeleton.fill(texts_of(conversation))
        if todo:
            rendered = self._apply_template([conversations[k] for k in todo], self.add_generation_prompt)
            for k, text in zip(todo, rendered):
                out[k] = text
        return out

    def _with_earlier_reasoning(self, text: str, messages: list[dict], turns: tuple[int, ...]) -> str:
        """``text`` with the body of every assistant turn but the last as the template writes a last turn."""
        bounds = _turn_bounds(text, self.generation_prompt)
        if len(bounds) != len(turns):
            return text  # the check reports it
        out, pos = [], 0
        for (body, _, end), turn in zip(bounds[:-1], turns[:-1]):
            alone = self._apply_template(messages[: turn + 1])
            last_body, _, last_end = _turn_bounds(alone, self.generation_prompt)[-1]
            out += [text[pos:body], alone[last_body:last_end]]
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def text(self, record: Record) -> str:
        """The chat-template text of the whole conversation (one pad token per image / video)."""
        return self.render(record).text

    def fingerprint(self) -> str:
        """What a record's text tokens depend on besides the record and the tokenizer: the template, its switches
        and how replies are cut. A cache of ``token_counts`` keys on it (the label check also on ``label_mode``)."""
        import hashlib
        import json

        facts = {"template": self.template_source(), "template_kwargs": self.template_kwargs,
                 "keep_earlier_reasoning": self.keep_earlier_reasoning,
                 "add_generation_prompt": self.add_generation_prompt, "cut": "reply pieces v1"}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ labels and their check

    def trained(self, rendered: Rendered) -> list[int]:
        """Indices of the replies the label mode trains."""
        n = len(rendered.replies)
        return [n - 1] if self.label_mode == "last_assistant" and n else list(range(n))

    def labels(self, ids: Sequence[int], piece_lengths: Sequence[int], rendered: Rendered) -> list[int]:
        """Labels of a sequence tokenized piece by piece: -100 outside what the label mode trains."""
        if self.label_mode == "all":
            return [IGNORE_INDEX if t in self.vision_pads else t for t in ids]
        labels = [IGNORE_INDEX] * len(ids)
        spans = self._reply_spans(piece_lengths)
        for i in self.trained(rendered):
            start, end = spans[i]
            labels[start:end] = ids[start:end]
        return labels

    @staticmethod
    def _reply_spans(piece_lengths: Sequence[int]) -> list[tuple[int, int]]:
        spans, pos = [], 0
        for k, n in enumerate(piece_lengths):
            if k % 2:
                spans.append((pos, pos + n))
            pos += n
        return spans

    def problem(self, ids: Sequence[int], labels: Sequence[int], piece_lengths: Sequence[int],
                rendered: Rendered) -> str | None:
        """What is wrong with a record's labels, naming the turn (None: the labels are exactly the replies)."""
        found = self._spans_to_decode(ids, labels, piece_lengths, rendered)
        if isinstance(found, str):
            return found
        return self._decode_problem(found, _decoded(self.processor.tokenizer, [span for span, _ in found]), rendered)

    def _spans_to_decode(self, ids: Sequence[int], labels: Sequence[int], piece_lengths: Sequence[int],
                         rendered: Rendered) -> str | list[tuple[list[int], int]]:
        """The structural part of ``problem``: its message, or the (labelled ids, reply index) whose decoding must
        be the reply."""
        replies = rendered.replies
        if len(replies) != len(rendered.turns):
            return (f"the chat template wrote {len(replies)} assistant turn(s) between {ASSISTANT_HEADER!r} and "
                    f"{IM_END!r} for the record's {len(rendered.turns)} assistant repl(ies) (turns "
                    f"{list(rendered.turns)}); its labels cannot be found")
        trained = self.trained(rendered)
        if self.label_mode == "all":
            spans = self._reply_spans(piece_lengths)
            for i, (start, end) in enumerate(spans):
                if list(labels[start:end]) != list(ids[start:end]):
                    return f"turn {rendered.turns[i]}: its reply is not labelled (label_mode all)"
        else:
            spans = _runs(labels)
            if len(spans) != len(trained):
                return (f"{len(spans)} labelled span(s) for the {len(trained)} repl(ies) that train (label_mode "
                        f"{self.label_mode}: turns {[rendered.turns[i] for i in trained]})")
        return [(list(ids[start:end]), i) for (start, end), i in zip(spans, trained)]

    def _decode_problem(self, spans: list[tuple[list[int], int]], decoded: list[str], rendered: Rendered) -> str | None:
        """The first labelled span whose decoding is not its reply as the tokenizer normalizes it (e.g. NFC)."""
        normalize = self._normalizer = self._normalizer or _normalizer_of(self.processor.tokenizer)
        for (_, i), got in zip(spans, decoded):
            want = normalize(rendered.replies[i])
            if got != want:
                return f"turn {rendered.turns[i]}: the labelled tokens decode to {_short(got)}, not to the reply " \
                       f"{_short(want)}"
        return None

    # ------------------------------------------------------------------ text only: lengths and the data check

    def measure(self, records: Sequence[Record], check: bool = True) -> tuple[list[int], list[Problem]]:
        """Token count of each record's text (one pad per image / video: vision tokens not expanded), tokenized
        piece by piece exactly as ``encode`` does, and (``check``) the label problems of the records (``problem``
        of each, its spans decoded in one batch)."""
        rendered = self.render_many(records)
        flat = [piece for rd in rendered for piece in rd.pieces]
        tokenized = _token_ids(self.processor.tokenizer, flat)
        counts, problems, pending, pos = [], [], [], 0  # problems: (position of the record, the problem)
        for at, (record, rd) in enumerate(zip(records, rendered)):
            pieces = tokenized[pos: pos + len(rd.pieces)]
            pos += len(rd.pieces)
            lengths = [len(p) for p in pieces]
            counts.append(sum(lengths))
            if check:
                found = self._spans_of_pieces(pieces, lengths, rd)
                if isinstance(found, str):
                    problems.append((at, Problem("error", found, record.index, record.id)))
                else:
                    pending.append((at, record, rd, found))
        decoded = iter(_decoded(self.processor.tokenizer, [span for *_, found in pending for span, _ in found]))
        for at, record, rd, found in pending:
            message = self._decode_problem(found, [next(decoded) for _ in found], rd)
            if message:
                problems.append((at, Problem("error", message, record.index, record.id)))
        return counts, [problem for _, problem in sorted(problems, key=lambda found: found[0])]

    def _spans_of_pieces(self, pieces: list[list[int]], lengths: list[int], rendered: Rendered):
        """``_spans_to_decode`` of pieces; no labels built where each trained reply is a run (not empty, then prompt)"""
        trained = self.trained(rendered)
        ends = [2 * j + 1 for j in trained[1:]] + [len(lengths)]
        if self.label_mode == "all" or len(rendered.replies) != len(rendered.turns) or not all(
                lengths[2 * i + 1] and any(lengths[2 * i + 2: end]) for i, end in zip(trained, ends)):
            ids = [t for p in pieces for t in p]
            return self._spans_to_decode(ids, self.labels(ids, lengths, rendered), lengths, rendered)
        return [(pieces[2 * i + 1], i) for i in trained]

    def token_counts(self, records: Sequence[Record]) -> list[int]:
        """Text tokens of each record (one pad per image / video), exactly as ``encode`` tokenizes them."""
        return self.measure(records, check=False)[0]

    def label_problems(self, records: Sequence[Record]) -> list[Problem]:
        """The label check of every record (errors naming record and turn), from its text alone."""
        return self.measure(records)[1]

    # ------------------------------------------------------------------ model inputs

    def encode(self, record: Record, images=None, videos=None, video_metadata=None, **processor_kwargs) -> dict:
        """Model inputs of a record with its decoded media: the processor's tensors, ids tokenized piece by piece,
        ``labels``; raises ``LabelError`` when the labels are not exactly the replies that train."""
        rendered = self.render(record)
        # the per-token lists come one row per piece (no padding, no tensors), joined here; the vision tensors come as
        # tensors either way; the modality of each token is found once, on the joined ids
        types = processor_kwargs.pop("return_mm_token_type_ids", None)
        key = tuple(sorted(processor_kwargs.items()))
        if key not in self._calls:
            self._calls[key] = ProcessorCall(self.processor, return_mm_token_type_ids=False, **processor_kwargs)
        encoded = self._calls[key](list(rendered.pieces), images or None, videos or None, video_metadata or None)
        rows = encoded["input_ids"]
        item = {k: v if isinstance(v, torch.Tensor) else torch.tensor(v) for k, v in encoded.items()
                if k not in _PER_TOKEN}
        ids, lengths = [t for row in rows for t in row], [len(row) for row in rows]
        item["input_ids"] = input_ids = torch.tensor(ids, dtype=torch.long)
        item["attention_mask"] = torch.ones_like(input_ids)
        if self._mm_types if types is None else types:
            item["mm_token_type_ids"] = mm_token_types(self.processor, input_ids)
        labels = self.labels(ids, lengths, rendered)
        message = self.problem(ids, labels, lengths, rendered)
        if message:
            raise LabelError(message)
        item["labels"] = torch.tensor(labels, dtype=input_ids.dtype)
        return item


class PromptConversation(Conversation):
    """The training rendering (same template switches, e.g. ``enable_thinking``), ending with the template's
    generation prompt: the text a model answers from (GRPO prompts, predict, eval)."""

    add_generation_prompt = True
