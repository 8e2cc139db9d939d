"""Task metrics on (prediction, reference) pairs: small functions, each tested on hand-made cases.

=================  =====================================================================================
name               what it computes
=================  =====================================================================================
``exact_match``    1 when prediction and reference are equal after ``normalize`` (Unicode NFKC, case
                   folded, whitespace collapsed, punctuation at either end dropped), else 0
``relaxed``        ChartQA's relaxed accuracy (Pix2Struct's ``relaxed_correctness``): both parse as numbers
                   (a trailing ``%`` divides by 100) and differ by at most 5% of the reference; otherwise
                   (or when the reference is 0) a case-insensitive string comparison
``anls``           DocVQA's ANLS: ``1 - NL`` when the normalised Levenshtein distance ``NL`` (lower-cased,
                   whitespace collapsed, distance over the longer length) is below 0.5, else 0. Distance
                   from ``rapidfuzz`` (exact Levenshtein over Unicode code points)
``rouge_l``        ROUGE-L F-measure from Google's ``rouge-score`` (the reference ROUGE-1.5.5 port), with a
                   Unicode tokenizer (its default drops every non-ASCII character): lower-cased word
                   characters, each CJK character a token of its own
``bleu``           BLEU from ``sacrebleu`` (its default ``13a`` tokenizer): per record ``sentence_bleu``,
                   over the split the corpus BLEU (not the mean of sentence scores), 0-100
``choice``         multiple-choice accuracy: the reference's letter (``B``, ``(B)``, ``B. text``) against the
                   letter parsed from the prediction (the same forms, ``answer is B``, ``Answer: (B)``);
                   applies only where the reference is a choice letter A-Z
``iou``            grounding: IoU of predicted and reference boxes in one frame (see ``grounding``)
``acc@0.5``        grounding: share of reference boxes found with IoU >= 0.5
=================  =====================================================================================

A metric that does not apply to a record (``choice`` on a free-text reference, ``iou`` without reference boxes)
gives None for it, and the split's score is the mean over the records where it applies.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vlmtune.data.boxes import box_iou

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05
IOU_THRESHOLD = 0.5


@dataclass
class Sample:
    """One record's prediction and reference, with their boxes (``x1, y1, x2, y2``, one frame) where parsed."""

    prediction: str
    reference: str
    pred_boxes: list[tuple[float, ...]] = field(default_factory=list)
    ref_boxes: list[tuple[float, ...]] = field(default_factory=list)
    ref_points: list[tuple[float, ...]] = field(default_factory=list)
    """Reference points make a grounding record too; no metric scores points yet."""


# ---------------------------------------------------------------- text


def normalize(text: str) -> str:
    """NFKC, case folded, whitespace collapsed, punctuation and symbols at either end dropped."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start, end = 0, len(text)
    while start < end and (unicodedata.category(text[start])[0] in "PS" or text[start].isspace()):
        start += 1
    while end > start and (unicodedata.category(text[end - 1])[0] in "PS" or text[end - 1].isspace()):
        end -= 1
    return text[start:end]


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, reference: str, tolerance: float = RELAXED_TOLERANCE) -> float:
    """ChartQA's relaxed accuracy, as Pix2Struct computes it (inputs stripped of surrounding whitespace)."""
    prediction, reference = prediction.strip(), reference.strip()
    pred, ref = _to_float(prediction), _to_float(reference)
    if pred is not None and ref:
        return float(abs(pred - ref) / abs(ref) <= tolerance)
    return float(prediction.lower() == reference.lower())


def _anls_normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, references: str | Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one prediction against its reference(s) (the best one)."""
    from rapidfuzz.distance import Levenshtein

    refs = [references] if isinstance(references, str) else list(references)
    pred = _anls_normalize(prediction)
    best = 0.0
    for ref in refs:
        ref = _anls_normalize(ref)
        longest = max(len(pred), len(ref))
        if longest == 0:
            return 1.0
        nl = Levenshtein.distance(pred, ref) / longest
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")


class UnicodeTokenizer:
    """Word tokens for rouge-score: lower-cased runs of word characters, each CJK character on its own."""

    def tokenize(self, text: str) -> list[str]:
        text = _CJK.sub(r" \1 ", unicodedata.normalize("NFKC", text).lower())
        return re.findall(r"\w+", text)


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score), 0-1."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def sentence_bleu(prediction: str, reference: str) -> float:
    """sacrebleu's sentence BLEU (0-100)."""
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, [reference]).score


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) over a split."""
    import sacrebleu

    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


# ---------------------------------------------------------------- choices

_LETTER_ONLY = re.compile(r"^\W*\(?([A-Z])\)?\W*$")
_LETTER_LEAD = re.compile(r"^\s*\(?([A-Z])(?:\)|\.|:|\s*$)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?([A-Z])\b(?!')", re.IGNORECASE)
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")


def reference_choice(reference: str) -> str | None:
    """The choice letter a reference gives: ``B``, ``(B)``, ``B.`` or ``B. some text``; None otherwise."""
    m = _LETTER_ONLY.match(reference) or _LETTER_LEAD.match(reference)
    return m.group(1) if m else None


def parse_choice(prediction: str) -> str | None:
    """The choice letter in a reply: the reference forms, ``the answer is (B)``, ``Answer: B``, or a lone
    ``(B)``; None when there is none."""
    m = _LETTER_ONLY.match(prediction) or _LETTER_LEAD.match(prediction)
    if m:
        return m.group(1)
    m = _ANSWER_IS.search(prediction)
    if m and m.group(1).isupper():
        return m.group(1)
    m = _PAREN_LETTER.search(prediction)
    return m.group(1) if m else None


def choice_accuracy(prediction: str, reference: str) -> float | None:
    ref = reference_choice(reference)
    if ref is None:
        return None
    return float(parse_choice(prediction) == ref)


# ---------------------------------------------------------------- boxes


def grounding(pred_boxes: Sequence[tuple[float, ...]], ref_boxes: Sequence[tuple[float, ...]],
              threshold: float = IOU_THRESHOLD) -> tuple[float, float] | None:
    """(IoU, share of reference boxes hit at ``threshold``) for one record; None without reference boxes.

    One reference box: the first predicted box is compared (the RefCOCO convention). Several: predicted and
    reference boxes are matched one to one, best IoU first; the IoU is the sum over matched pairs divided by
    the larger of the two counts (missing and extra boxes both cost), and the hit share counts matched pairs at
    ``threshold`` over the same count."""
    if not ref_boxes:
        return None
    if not pred_boxes:
        return 0.0, 0.0
    if len(ref_boxes) == 1:
        iou = box_iou(pred_boxes[0], ref_boxes[0])
        return iou, float(iou >= threshold)
    pairs = sorted(((box_iou(p, r), i, j) for i, p in enumerate(pred_boxes) for j, r in enumerate(ref_boxes)),
                   reverse=True)
    used_p, used_r, matched = set(), set(), []
    for iou, i, j in pairs:
        if i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
            matched.append(iou)
    n = max(len(pred_boxes), len(ref_boxes))
    return sum(matched) / n, sum(iou >= threshold for iou in matched) / n


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Metric:
    name: str
    per_record: Callable[[Sample], float | None]
    description: str
    scale: float = 1.0  # 100 for BLEU
    corpus: Callable[[list[Sample]], float] | None = None  # a split-level score other than the mean


def _iou(s: Sample) -> float | None:
    r = grounding(s.pred_boxes, s.ref_boxes)
    return None if r is None else r[0]


def _acc(s: Sample) -> float | None:
    r = grounding(s.pred_boxes, s.ref_boxes)
    return None if r is None else r[1]


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("exact_match", lambda s: exact_match(s.prediction, s.reference), "exact match after normalisation"),
    Metric("relaxed", lambda s: relaxed_accuracy(s.prediction, s.reference), "relaxed numeric accuracy (5%)"),
    Metric("anls", lambda s: anls(s.prediction, s.reference), "ANLS (threshold 0.5)"),
    Metric("rouge_l", lambda s: rouge_l(s.prediction, s.reference), "ROUGE-L F (rouge-score)"),
    Metric("bleu", lambda s: sentence_bleu(s.prediction, s.reference), "BLEU (sacrebleu, corpus)", 100.0,
           lambda ss: corpus_bleu([s.prediction for s in ss], [s.reference for s in ss])),
    Metric("choice", lambda s: choice_accuracy(s.prediction, s.reference), "multiple-choice accuracy"),
    Metric("iou", _iou, "box IoU"),
    Metric("acc@0.5", _acc, "boxes found at IoU >= 0.5"),
)}


def check_metrics(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def reference_kind(reference: str, has_boxes: bool) -> str:
    """'boxes', 'choice', 'number', 'short' (up to 5 words) or 'text'."""
    if has_boxes:
        return "boxes"
    if reference_choice(reference) is not None and len(reference.split()) == 1:
        return "choice"
    if _to_float(reference.strip()) is not None:
        return "number"
    return "short" if len(reference.split()) <= 5 else "text"


KIND_METRICS = {
    "boxes": ("iou", "acc@0.5"),
    "choice": ("choice",),
    "number": ("relaxed", "exact_match"),
    "short": ("exact_match", "anls"),
    "text": ("rouge_l", "bleu"),
}


def default_metrics(samples: Sequence[Sample]) -> list[str]:
    """The metrics that fit the references: the union over the kinds present, in a fixed order."""
    kinds = {reference_kind(s.reference, bool(s.ref_boxes or s.ref_points)) for s in samples}
    chosen = {name for kind in kinds for name in KIND_METRICS[kind]}
    return [name for name in METRICS if name in chosen]


def score_records(samples: Sequence[Sample], names: Sequence[str]) -> list[dict[str, float | None]]:
    """Per-record values of each metric (None where it does not apply)."""
    return [{name: METRICS[name].per_record(s) for name in names} for s in samples]


def summarize(samples: Sequence[Sample], per_record: Sequence[dict[str, float | None]],
              names: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    """``{metric: {"score", "n"}}``: mean over the records where it applies (a corpus score where the metric
    has one), and how many records that is."""
    out = {}
    for name in names:
        metric = METRICS[name]
        applies = [(s, r[name]) for s, r in zip(samples, per_record) if r[name] is not None]
        if not applies:
            out[name] = {"score": None, "n": 0}
            continue
        if metric.corpus is not None:
            score = metric.corpus([s for s, _ in applies])
        else:
            score = sum(v for _, v in applies) / len(applies)
        out[name] = {"score": score, "n": len(applies)}
    return out
