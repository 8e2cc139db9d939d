"""A fast tokenizer's own batch calls, where they give what the transformers wrapper gives (without its per-call
and per-sequence work): what the data check of a large file spends most of its time in.

ASCII text on a Qwen tokenizer (``AsciiWords``): a byte-level BPE cuts its text at its added tokens, then into
words by one regular expression, and encodes each word alone, so the ids of a text are the ids of its words, in
order. The words of ASCII text are found here by the same expression written for ASCII (where Python's ``re`` and
the tokenizer's Oniguruma agree: explicit character classes), and each distinct word is encoded once by the
tokenizer's own BPE model and remembered: the same ids at a sixth of the cost on ordinary records (a dataset
repeats its words). Any other text, or a tokenizer configured otherwise, goes through the tokenizer's batch call.
"""

from __future__ import annotations

import json
import re
import weakref

_WS = r"\t\n\x0b\x0c\r "
"""Oniguruma's ``\\s`` on ASCII: tab to carriage return and space (not ``\\x1c``-``\\x1f``, which Python's is)."""
_ASCII_WORDS = re.compile(
    rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]| ?[^{_WS}A-Za-z0-9]+[\r\n]*|[{_WS}]*[\r\n]+"
    rf"|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
"""The Qwen pre-tokenizers' expressions below on ASCII text: ``\\p{L}`` is A-Z a-z, ``\\p{N}`` 0-9, ``\\p{M}`` none."""
_QWEN_PATTERNS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",  # Qwen3.5
)
_CACHE_LIMIT = 1 << 20
"""Distinct words remembered per tokenizer (then forgotten at once and remembered anew)."""
_words: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its size, AsciiWords or None)


class AsciiWords:
    """Ids of ASCII texts, word by word (module docstring), for a tokenizer whose backend is the Qwen kind: an
    NFC normalizer (or none), the Qwen split expression then byte-level bytes without a regex of its own, a BPE
    model, added tokens without strip or single-word rules."""

    def __init__(self, backend):
        from tokenizers.pre_tokenizers import ByteLevel

        self.model = backend.model
        decoder = backend.get_added_tokens_decoder()  # id -> AddedToken
        self.added = {token.content: i for i, token in decoder.items()}
        added = decoder.values()
        # added tokens as the backend matches them: those written as they are in the text, then those written as
        # normalized in the pieces between (the same text, for ASCII), each the leftmost, the longest at one place
        self.splits = [_alternatives([t.content for t in added if t.normalized == normalized])
                       for normalized in (False, True)]
        to_bytes = ByteLevel(add_prefix_space=False, use_regex=False)
        self.bytes = str.maketrans({chr(b): to_bytes.pre_tokenize_str(chr(b))[0][0] for b in range(128)})
        self.cache: dict[str, list[int]] = {}

    @staticmethod
    def of(tokenizer) -> AsciiWords | None:
        """The word encoder of a transformers fast tokenizer, or None where its backend is not of that kind (built
        once per tokenizer, and again if tokens were added to it since)."""
        size = tokenizer._tokenizer.get_vocab_size(with_added_tokens=True)
        try:
            kept = _words.get(tokenizer)
        except TypeError:  # not weakly referenceable: not kept
            return AsciiWords._build(tokenizer)
        if kept is None or kept[0] != size:
            kept = _words[tokenizer] = (size, AsciiWords._build(tokenizer))
        return kept[1]

    @staticmethod
    def _build(tokenizer) -> AsciiWords | None:
        backend = getattr(tokenizer, "_tokenizer", None)

        def config(part) -> dict:  # a component's own JSON (not the whole tokenizer's: no vocabulary)
            return {} if part is None else json.loads(part.__getstate__())

        try:
            normalizer, pre, post = (config(part) for part in (backend.normalizer, backend.pre_tokenizer,
                                                                backend.post_processor))
            model, added = backend.model, backend.get_added_tokens_decoder().values()
        except Exception:  # noqa: BLE001 (not a tokenizers backend)
            return None
        steps = pre.get("pretokenizers", [])
        qwen = (
            normalizer.get("type", "NFC") in ("NFC", "NFKC")
            and pre.get("type") == "Sequence" and len(steps) == 2
            and steps[0] == {"type": "Split", "pattern": {"Regex": steps[0].get("pattern", {}).get("Regex")},
                             "behavior": "Isolated", "invert": False}
            and steps[0]["pattern"]["Regex"] in _QWEN_PATTERNS
            and steps[1].get("type") == "ByteLevel" and steps[1].get("add_prefix_space") is False
            and steps[1].get("use_regex") is False
            and type(model).__name__ == "BPE" and model.dropout is None
            and post.get("type", "ByteLevel") in ("ByteLevel", "TemplateProcessing")
            and all(t.content and not (t.lstrip or t.rstrip or t.single_word) for t in added)
        )
        return AsciiWords(backend) if qwen else None

    def __call__(self, text: str) -> list[int]:
        """The ids of an ASCII text: its added tokens, and the BPE ids of each of its words."""
        ids: list[int] = []
        for k, piece in enumerate(self.splits[0].split(text) if self.splits[0] is not None else (text,)):
            if k % 2:
                ids.append(self.added[piece])
                continue
            for j, segment in enumerate(self.splits[1].split(piece) if self.splits[1] is not None else (piece,)):
                if j % 2:
                    ids.append(self.added[segment])
                elif segment:
                    self._words(segment, ids)
        return ids

    def _words(self, segment: str, ids: list[int]) -> None:
        cache = self.cache
        for word in _ASCII_WORDS.findall(segment):
            found = cache.get(word)
            if found is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                found = cache[word] = [token.id for token in self.model.tokenize(word.translate(self.bytes))]
            ids += found


def _alternatives(contents: list[str]):
    """A pattern matching any of ``contents`` (the longest first), captured, or None for none."""
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(contents, key=len, reverse=True)) + ")") \
        if contents else None


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``: ASCII texts word by word on a Qwen tokenizer
    (``AsciiWords``), the others through a fast tokenizer's own batch call without offsets where it has one (the
    same ids, built in Rust at a third of the cost)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "_tokenizer", None)
    if hasattr(backend, "encode_batch_fast") and not getattr(tokenizer, "split_special_tokens", False):
        words = AsciiWords.of(tokenizer)
        out: list = [words(text) if text.isascii() else None for text in texts] if words is not None \
            else [None] * len(texts)
        rest = [k for k, ids in enumerate(out) if ids is None]
        if rest:
            # an earlier call of the tokenizer may have left padding or truncation on in the backend (the wrapper
            # sets both before each of its own calls, so clearing them here changes nothing it does)
            if backend.padding is not None:
                backend.no_padding()
            if backend.truncation is not None:
                backend.no_truncation()
            encoded = backend.encode_batch_fast([texts[k] for k in rest], add_special_tokens=False)
            for k, encoding in zip(rest, encoded):
                out[k] = encoding.ids
        return out
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def decoded(tokenizer, spans: list[list[int]]) -> list[str]:
    """``tokenizer.decode(span, skip_special_tokens=False, clean_up_tokenization_spaces=False)`` of every span: one
    call of a fast tokenizer's own batch decode where the wrapper's decode is that call (the same strings, without
    the wrapper's conversions of each span: the label check of a large file was a third this)."""
    if not spans:
        return []
    backend = getattr(tokenizer, "_tokenizer", None)
    if hasattr(backend, "decode_batch") and _plain_decode(type(tokenizer)):
        return backend.decode_batch(spans, skip_special_tokens=False)
    return [tokenizer.decode(span, skip_special_tokens=False, clean_up_tokenization_spaces=False) for span in spans]


def _plain_decode(cls) -> bool:
    """Whether ``cls.decode`` (without clean-up) is ``cls._tokenizer.decode``: transformers' fast tokenizer, not
    overridden."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    return (issubclass(cls, TokenizersBackend) and cls.decode is PreTrainedTokenizerBase.decode
            and cls._decode is TokenizersBackend._decode)


def normalizer(tokenizer):
    """A function giving a text as the tokenizer normalizes it (e.g. NFC): its backend's normalizer (none: the text
    as it is), not called on ASCII text where it is a Unicode normal form, which keeps ASCII text as it is (the
    backend's call builds a mapping of every character: the label check of a large file was a tenth this)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    found = getattr(backend, "normalizer", None)
    if found is None:
        return lambda text: text
    keeps_ascii = json.loads(found.__getstate__()).get("type") in ("NFC", "NFD", "NFKC", "NFKD")
    return lambda text: text if keeps_ascii and text.isascii() else found.normalize_str(text)
