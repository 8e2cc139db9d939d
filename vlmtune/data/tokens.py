"""A fast tokenizer's own batch calls, where they give what the transformers wrapper gives (without its per-call
and per-sequence work): what the data check of a large file spends most of its time in."""

from __future__ import annotations


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``: through a fast tokenizer's own batch call
    without offsets where it has one (the same ids, built in Rust at a third of the cost: the data check of a large
    file is mostly this call)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "_tokenizer", None)
    if hasattr(backend, "encode_batch_fast") and not getattr(tokenizer, "split_special_tokens", False):
        # an earlier call of the tokenizer may have left padding or truncation on in the backend (the wrapper sets
        # both before each of its own calls, so clearing them here changes nothing it does)
        if backend.padding is not None:
            backend.no_padding()
        if backend.truncation is not None:
            backend.no_truncation()
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
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
