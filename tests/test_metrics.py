"""Task metrics on hand-made cases: every expected value below is computed by hand in the comment beside it."""

from __future__ import annotations

import math

import pytest

from vlmtune import metrics as M


@pytest.mark.parametrize("pred, ref, expected", [
    ("Yes.", "yes", 1.0),
    ("  The   Cat ", "the cat", 1.0),
    ("ｃａｔ", "cat", 1.0),  # NFKC folds full-width letters
    ("Straße", "STRASSE", 1.0),  # case folding: ß -> ss
    ("«Paris»", "Paris", 1.0),  # Unicode punctuation at the ends
    ("3.14", "314", 0.0),  # punctuation inside is kept
    ("cats", "cat", 0.0),
    ("", "a", 0.0),
    ("", "", 1.0),
])
def test_exact_match(pred, ref, expected):
    assert M.exact_match(pred, ref) == expected


@pytest.mark.parametrize("pred, ref, expected", [
    ("10.4", "10", 1.0),  # |10.4 - 10| / 10 = 0.04
    ("10.5", "10", 1.0),  # 0.05: the bound is inclusive
    ("10.6", "10", 0.0),  # 0.06
    ("9.5", "10", 1.0),
    ("12%", "0.12", 1.0),  # a trailing % divides by 100
    ("12", "12%", 0.0),  # 12 against 0.12
    ("0", "0", 1.0),  # a zero reference falls back to the string comparison (Pix2Struct)
    ("0.0", "0", 0.0),
    ("Paris", "paris", 1.0),
    ("", "5", 0.0),
    (" 7 ", "7", 1.0),
])
def test_relaxed_accuracy(pred, ref, expected):
    assert M.relaxed_accuracy(pred, ref) == expected


@pytest.mark.parametrize("pred, ref, expected", [
    ("hello", "hello", 1.0),
    ("helo", "hello", 0.8),  # distance 1 over 5
    ("abcd", "abce", 0.75),  # 1 / 4
    ("ab", "ax", 0.0),  # NL = 0.5 exactly: not below the threshold
    ("abcde", "abxyz", 0.0),  # 3 / 5 = 0.6
    ("", "hello", 0.0),  # empty prediction
    ("", "", 1.0),
    ("  Hello   World ", "hello world", 1.0),  # lower-cased, whitespace collapsed
    ("日本語", "日本人", 1 - 1 / 3),  # code points, not bytes
])
def test_anls(pred, ref, expected):
    assert M.anls(pred, ref) == pytest.approx(expected)


def test_anls_takes_the_best_reference():
    assert M.anls("helo", ["world", "hello"]) == pytest.approx(0.8)


def test_rouge_l():
    # tokens: the cat sat on the mat / the cat is on the mat; LCS = the cat on the mat = 5; P = R = 5/6
    assert M.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert M.rouge_l("The Cat.", "the cat") == pytest.approx(1.0)
    assert M.rouge_l("", "the cat") == 0.0
    # each CJK / kana character is a token: 猫 が 座 っ た against 猫 が 立 っ た, LCS 4 of 5
    assert M.rouge_l("猫が座った", "猫が立った") == pytest.approx(0.8)
    # rouge-score's own tokenizer drops non-ASCII text entirely; ours does not
    assert M.rouge_l("café au lait", "café noir") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_bleu():
    assert M.sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    # every n-gram precision is 1; brevity penalty exp(1 - 7/6) for a 6-token hypothesis and 7-token reference
    assert M.sentence_bleu("the cat sat on the mat", "the cat sat on the mat today") == pytest.approx(
        100 * math.exp(1 - 7 / 6), abs=1e-3)
    # corpus BLEU pools the n-gram counts: two identical pairs give 100, not a mean of sentence scores
    assert M.corpus_bleu(["a b c d", "e f g h"], ["a b c d", "e f g h"]) == pytest.approx(100.0)


@pytest.mark.parametrize("pred, ref, expected", [
    ("B", "B", 1.0),
    ("(B)", "B", 1.0),
    ("B. a dog", "B", 1.0),
    ("The answer is B.", "(B)", 1.0),
    ("Answer: (C)", "B", 0.0),
    ("I think it is (B) because...", "B. a dog", 1.0),
    ("A cat", "A", 0.0),  # an article is not a choice
    ("the answer is a dog", "A", 0.0),
    ("", "B", 0.0),
    ("B", "The cat", None),  # not a choice reference: does not apply
])
def test_choice_accuracy(pred, ref, expected):
    assert M.choice_accuracy(pred, ref) == expected


def test_grounding():
    box = (0.0, 0.0, 10.0, 10.0)
    assert M.grounding([box], [box]) == (1.0, 1.0)
    # half overlap: intersection 50, union 150
    iou, hit = M.grounding([(5.0, 0.0, 15.0, 10.0)], [box])
    assert iou == pytest.approx(1 / 3) and hit == 0.0
    assert M.grounding([], [box]) == (0.0, 0.0)
    assert M.grounding([box], []) is None
    # one reference: the first predicted box counts
    assert M.grounding([(50, 50, 60, 60), box], [box]) == (0.0, 0.0)
    # two references, one found exactly: (1 + 0) / 2
    assert M.grounding([(20, 20, 30, 30)], [box, (20, 20, 30, 30)]) == (0.5, 0.5)
    # an extra box costs too: two predictions for one matched reference among two -> / max(3, 2)
    iou, hit = M.grounding([(20, 20, 30, 30), box, (90, 90, 99, 99)], [box, (20, 20, 30, 30)])
    assert iou == pytest.approx(2 / 3) and hit == pytest.approx(2 / 3)


def test_default_metrics_fit_the_references():
    def samples(*refs):
        return [M.Sample("x", r) for r in refs]

    assert M.default_metrics(samples("B", "(C)")) == ["choice"]
    assert M.default_metrics(samples("12", "3.5%")) == ["exact_match", "relaxed"]
    assert M.default_metrics(samples("a red circle", "yes")) == ["exact_match", "anls"]
    assert M.default_metrics(samples("A long free-text answer about the picture and more")) == ["rouge_l", "bleu"]
    assert M.default_metrics([M.Sample("x", '{"bbox_2d": [1, 2, 3, 4]}', [], [(1, 2, 3, 4)])]) == ["iou", "acc@0.5"]


def test_summary_is_the_mean_where_a_metric_applies_and_corpus_bleu():
    samples = [M.Sample("B", "B"), M.Sample("C", "B"), M.Sample("x", "free text")]
    names = ["choice", "exact_match", "bleu"]
    per = M.score_records(samples, names)
    assert [r["choice"] for r in per] == [1.0, 0.0, None]
    summary = M.summarize(samples, per, names)
    assert summary["choice"] == {"score": 0.5, "n": 2}
    assert summary["exact_match"] == {"score": pytest.approx(1 / 3), "n": 3}
    assert summary["bleu"]["score"] == pytest.approx(M.corpus_bleu(["B", "C", "x"], ["B", "B", "free text"]))
    with pytest.raises(ValueError, match="unknown metric"):
        M.check_metrics(["exact", "anls"])
