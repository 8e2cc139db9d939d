"""Data where users keep it: ShareGPT and typed-part messages files read into the same records and batches as LLaVA.

The reference is the LLaVA path (checked against the processor in test_dataset.py); the other formats are written
from data_examples/ by hand here, not by vlmtune.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DATA_JSON, EXAMPLES, ROOT

from vlmtune.cli import main as cli_main
from vlmtune.data import media
from vlmtune.data.check import check_data
from vlmtune.data.conversation import Conversation
from vlmtune.data.dataset import VisionLanguageDataset
from vlmtune.data.records import read_records

FIXTURES = ROOT / "tests" / "fixtures"
ROLE = {"human": "user", "gpt": "assistant", "system": "system"}
RED_CIRCLE_PATH = "images/red_circle.png"


def _media(raw: dict, key: str) -> list[str]:
    value = raw.get(key) or []
    return [value] if isinstance(value, str) else list(value)


def as_sharegpt(raw: dict) -> dict:
    out = {"id": raw["id"], "messages": [{"role": ROLE[t["from"]], "content": t["value"]}
                                         for t in raw["conversations"]]}
    for key in ("image", "video"):
        if raw.get(key):
            out[key + "s"] = _media(raw, key)
    return {**out, **{k: v for k, v in raw.items() if k not in ("id", "conversations", "image", "video")}}


def _data_uri(name: str) -> str:
    data = (EXAMPLES / name).read_bytes()
    kind = "jpeg" if name.endswith(".jpg") else "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _parts(text: str, images: list, videos: list, inline: bool) -> list[dict]:
    parts = []
    for piece in re.split(r"(<image>|<video>)", text):
        if piece == "<image>":
            name = images.pop(0)
            # alternate the two ways OpenAI and Hugging Face write an image
            parts.append({"type": "image_url", "image_url": {"url": _data_uri(name)}} if inline and len(parts) % 2
                         else {"type": "image", "image": _data_uri(name) if inline else name})
        elif piece == "<video>":
            parts.append({"type": "video", "video": videos.pop(0)})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def as_messages(raw: dict, inline: bool = False) -> dict:
    images, videos = _media(raw, "image"), _media(raw, "video")
    turns = [{"role": ROLE[t["from"]], "content": _parts(t["value"], images, videos, inline)}
             for t in raw["conversations"]]
    out = {"id": raw["id"], "messages": turns}
    return {**out, **{k: v for k, v in raw.items() if k not in ("id", "conversations", "image", "video")}}


def as_table_row(raw: dict) -> dict:
    """A row as Hugging Face datasets hold it: typed parts without sources, the images' bytes in an Image column."""
    images = _media(raw, "image")
    row = as_messages(raw)
    for turn in row["messages"]:
        for part in turn["content"]:
            if part["type"] == "image":
                del part["image"]
    row["images"] = [{"bytes": (EXAMPLES / name).read_bytes(), "path": Path(name).name} for name in images]
    return row


def write(path: Path, records: list, lines: bool = False) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if lines else json.dumps(records, indent=1))
    return path


@pytest.fixture(scope="module")
def qwen2_vl(pipeline):
    """The tiny Qwen2-VL's processor, family and budgets (conftest's shared pipeline)."""
    tiny = pipeline("qwen2_vl")
    return tiny.processor, tiny.family, tiny.budget


@pytest.mark.slow
def test_every_format_gives_the_same_batches(qwen2_vl, tmp_path, monkeypatch):
    """data_examples/ as LLaVA, ShareGPT, typed messages (paths), typed messages with the images as data: URIs
    (image and image_url parts), Parquet and a save_to_disk folder with the images' bytes in an Image column, each
    checked through the data store: same ids, lengths, input ids, labels, pixels."""
    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path / "cache"))
    processor, family, budget = qwen2_vl
    raw = json.loads(DATA_JSON.read_text())
    files = {
        "llava": DATA_JSON,
        "sharegpt": write(tmp_path / "sharegpt.jsonl", [as_sharegpt(r) for r in raw], lines=True),
        "messages": write(tmp_path / "messages.json", [as_messages(r) for r in raw]),
        "messages_bytes": write(tmp_path / "bytes.jsonl", [as_messages(r, inline=True) for r in raw], lines=True),
    }
    rows = [as_table_row(r) for r in raw]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet", row_group_size=5)
    files["parquet"] = tmp_path / "rows.parquet"
    dataset = datasets.Dataset.from_list(rows)
    dataset = dataset.cast_column("images", datasets.List(datasets.Image()))
    dataset.save_to_disk(str(tmp_path / "saved"))
    files["save_to_disk"] = tmp_path / "saved"
    conversation = Conversation(processor)
    items = {}
    for name, path in files.items():
        result = check_data(str(path), processor, family, budget, image_folder=EXAMPLES, conversation=conversation)
        assert not result.problems, (name, result.problems)
        assert result.store is not None  # read through the data store, as training reads it
        dataset = VisionLanguageDataset(result.records, processor, family, budget, conversation)
        batch = [dataset[i] for i in range(len(dataset))]
        items[name] = ([r.id for r in result.records], result.lengths.tolist(), batch)
    ids, lengths, reference = items.pop("llava")
    assert len(ids) == len(raw)
    for name, (other_ids, other_lengths, batch) in items.items():
        assert other_ids == ids and other_lengths == lengths, name
        for want, got in zip(reference, batch):
            assert want.keys() == got.keys(), name
            for key in want:
                assert torch.equal(want[key], got[key]), (name, key)
    inline = json.loads((tmp_path / "bytes.jsonl").read_text().splitlines()[0])["messages"][0]["content"]
    assert inline[0]["image"].startswith("data:image/png;base64,")  # the bytes came from the record itself


def test_public_demo_files_load_as_published():
    """LLaMA-Factory's mllm_demo.json (no <image> tag in its text at the stored commit: the image goes before the
    first question) and ms-swift's documented multimodal records (system key in the turns, two images, a video)."""
    records, problems = read_records(FIXTURES / "llamafactory" / "mllm_demo.json")
    assert problems == [] and len(records) == 6
    demo = json.loads((FIXTURES / "llamafactory" / "mllm_demo.json").read_text())
    for record, raw in zip(records, demo):
        assert [m.role for m in record.messages] == [t["role"] for t in raw["messages"]]
        assert record.messages[0].text == "<image>" + raw["messages"][0]["content"]
        assert [m.text for m in record.messages[1:]] == [t["content"] for t in raw["messages"][1:]]
        assert record.images == [str(FIXTURES / "llamafactory" / p) for p in raw["images"]]
    records, problems = read_records(FIXTURES / "ms_swift" / "multimodal.jsonl")
    assert problems == [] and [r.shape for r in records] == ["text", "image", "multi_image", "image+video"]
    assert records[1].messages[0].role == "system" and records[3].videos[0].endswith("xxx/x.mp4")


def _fields(records):
    return [(r.id, [(m.role, m.text) for m in r.messages], r.images, r.chosen, r.rejected, r.fields) for r in records]


def test_preference_and_prompt_records_in_each_shape(tmp_path):
    """DPO pairs as LLaMA-Factory (chosen / rejected turns), ms-swift (rejected_response after the chosen reply)
    and TRL (prompt / chosen / rejected messages) write them, and GRPO prompts as typed messages: the same records
    as data_examples' LLaVA files."""
    pairs = json.loads((EXAMPLES / "preference.json").read_text())
    for r in pairs:  # replies written as turns there: their text
        r.update({k: r[k]["value"] if isinstance(r[k], dict) else r[k] for k in ("chosen", "rejected")})
    want, problems = read_records(EXAMPLES / "preference.json", check_media=False, stage="dpo")
    assert not [p for p in problems if p.level == "error"]
    llama_factory = [{**as_sharegpt({k: v for k, v in r.items() if k not in ("chosen", "rejected")}),
                      "chosen": {"from": "gpt", "value": r["chosen"]},
                      "rejected": {"from": "gpt", "value": r["rejected"]}} for r in pairs]
    swift = [{**as_sharegpt({**{k: v for k, v in r.items() if k not in ("chosen", "rejected")},
                             "conversations": [*r["conversations"], {"from": "gpt", "value": r["chosen"]}]}),
              "rejected_response": r["rejected"]} for r in pairs]
    trl = []
    for r in pairs:
        m = as_messages({k: v for k, v in r.items() if k not in ("chosen", "rejected")})
        trl.append({"id": m["id"], "prompt": m["messages"],
                    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    for name, records in (("llama_factory", llama_factory), ("swift", swift), ("trl", trl)):
        path = write(tmp_path / f"{name}.jsonl", records, lines=True)
        got, problems = read_records(path, EXAMPLES, check_media=False, stage="dpo")
        assert not [p for p in problems if p.level == "error"], (name, problems)
        assert _fields(got) == _fields(want), name

    prompts = json.loads((EXAMPLES / "grpo.json").read_text())
    want, _ = read_records(EXAMPLES / "grpo.json", check_media=False, stage="grpo")
    path = write(tmp_path / "grpo.json", [as_messages(r) for r in prompts])
    got, problems = read_records(path, EXAMPLES, check_media=False, stage="grpo")
    assert not [p for p in problems if p.level == "error"] and _fields(got) == _fields(want)


BAD = [
    # (record of a messages file, what the one-line error says)
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "data:image/png;base64,@@@"},
                                                 {"type": "text", "text": "?"}]},
                   {"role": "assistant", "content": "x"}]}, "does not hold base64 data"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "data:image/png,abc"}]},
                   {"role": "assistant", "content": "x"}]}, "is not a base64 data: URI"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]},
                   {"role": "assistant", "content": "x"}]}, "pass --allow_urls"),
    ({"messages": [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "x"}],
      "images": ["images/red_circle.png"]}, "written in the sharegpt format"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "<image> what?"}]},
                   {"role": "assistant", "content": "x"}]}, "tag in a text part"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                   {"role": "assistant", "content": "x"}]}, "expected {\"type\": \"text\""),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]},
     "without a source"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                   {"role": "assistant", "content": "x"}], "images": ["a.png", "b.png"]}, "left over"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": []}]},
                   {"role": "assistant", "content": "x"}]}, "part 0: an empty list of frames"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": 7}]},
                   {"role": "assistant", "content": "x"}]}, "must be a path, a URL or a data: URI"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "data:image/png;base64,AAAA"}]},
                   {"role": "assistant", "content": "x"}]}, "unreadable image data:image/png;base64,..."),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}, "must be a string"),
    ({"messages": "hello"}, "'messages' is a str, not a list"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "?"}]},
                   {"role": "assistant", "content": "x"}], "images": "a.png"}, "left over"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "data:video/mp4;base64,AAAA"}]},
                   {"role": "assistant", "content": "x"}]}, "video given as a data: URI is not read"),
    ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "?"}]}],
      "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "rejected": "c"},
     "must be one assistant message"),
]


@pytest.mark.slow
def test_bad_records_are_one_line_errors_naming_file_record_and_field(tmp_path, capsys):
    question = [{"type": "image", "image": "images/red_circle.png"}, {"type": "text", "text": "What is it?"}]
    first = {"id": "fine", "messages": [{"role": "user", "content": question},
                                        {"role": "assistant", "content": "A red circle."}]}
    path = write(tmp_path / "bad.jsonl", [first] + [dict(r, id=f"bad{i}") for i, (r, _) in enumerate(BAD)], lines=True)
    records, problems = read_records(path, EXAMPLES)
    assert [r.id for r in records] == ["fine"]
    errors = [p for p in problems if p.level == "error"]
    for i, (_, expected) in enumerate(BAD):
        mine = [p.message for p in errors if p.index == i + 1]
        assert mine and any(expected in m for m in mine), (i, expected, mine)
    assert all("\n" not in p.message and len(p.message) < 400 for p in problems)  # one short line each

    assert cli_main(["check-data", str(path), "--image_folder", str(EXAMPLES), "--stage", "sft"]) == 1
    out = capsys.readouterr().out
    assert f"{path}: record 1 (id 'bad0'): " in out and "does not hold base64 data" in out
    sharegpt = write(tmp_path / "mixed.json", [as_sharegpt(json.loads(DATA_JSON.read_text())[0]), first])
    _, problems = read_records(sharegpt, EXAMPLES)
    assert [(p.index, "written in the messages format" in p.message) for p in problems] == [(1, True)]


def _by_hand(rows: list, folder: Path) -> list:
    """(id, turns, image bytes, video bytes) of LLaVA records, read without vlmtune."""
    out = []
    for r in rows:
        images, videos = _media(r, "image"), _media(r, "video")
        out.append((r["id"], [(t["from"], t["value"]) for t in r["conversations"]],
                    [(folder / p).read_bytes() for p in images], [(folder / p).read_bytes() for p in videos]))
    return out


def _parquet_by_hand(path: Path) -> list:
    return [(r["id"], [(t["from"], t["value"]) for t in r["conversations"]], [i["bytes"] for i in r["image"]],
             [(path.parent / v).read_bytes() for v in r["video"] or []]) for r in pq.read_table(path).to_pylist()]


def test_convert_round_trip_keeps_ids_turns_and_media_bytes(tmp_path):
    """LLaVA with image files -> Parquet with the images embedded -> LLaVA JSON plus an image folder -> Parquet:
    every step holds the same ids, turns and media bytes (read here with pyarrow and json, not vlmtune); and
    LLaMA-Factory's ShareGPT demo converts to LLaVA."""
    want = _by_hand(json.loads(DATA_JSON.read_text()), EXAMPLES)
    assert cli_main(["convert", str(DATA_JSON), str(tmp_path / "a.parquet")]) == 0
    assert _parquet_by_hand(tmp_path / "a.parquet") == want
    assert cli_main(["convert", str(tmp_path / "a.parquet"), str(tmp_path / "out" / "b.json")]) == 0
    assert _by_hand(json.loads((tmp_path / "out" / "b.json").read_text()), tmp_path / "out") == want
    assert cli_main(["convert", str(tmp_path / "out" / "b.json"), str(tmp_path / "c.parquet")]) == 0
    assert _parquet_by_hand(tmp_path / "c.parquet") == want

    demo = FIXTURES / "llamafactory" / "mllm_demo.json"
    assert cli_main(["convert", str(demo), str(tmp_path / "demo.json")]) == 0
    rows = json.loads((tmp_path / "demo.json").read_text())
    published = json.loads(demo.read_text())
    assert [[t["value"] for t in r["conversations"]] for r in rows] == [
        ["<image>" + m["messages"][0]["content"]] + [t["content"] for t in m["messages"][1:]] for m in published]
    assert [(tmp_path / r["image"]).read_bytes() for r in rows] == [
        (demo.parent / m["images"][0]).read_bytes() for m in published]


def test_convert_refuses_a_file_with_errors(tmp_path, capsys):
    bad = write(tmp_path / "bad.json", [{"id": "a", "messages": [{"role": "user", "content": "hi"}]}])
    assert cli_main(["convert", str(bad), str(tmp_path / "out.parquet")]) != 0
    assert not (tmp_path / "out.parquet").exists()
    assert f"{bad}: record 0 (id 'a'): roles out of order" in capsys.readouterr().err


def test_bad_tables_name_the_file_row_and_column(tmp_path):
    """A column of the wrong type, a corrupt image byte string, a video's bytes, a file that is not Parquet: one
    line each."""
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]}]
    good = (EXAMPLES / RED_CIRCLE_PATH).read_bytes()
    rows = [{"id": "ok", "messages": turns, "images": [{"bytes": good, "path": "a.png"}]},
            {"id": "corrupt", "messages": turns, "images": [{"bytes": good[:40], "path": "b.png"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bytes.parquet")
    records, problems = read_records(tmp_path / "bytes.parquet")
    assert [r.id for r in records] == ["ok"] and records[0].image_sizes == [(96, 72)]
    assert [(p.index, p.id) for p in problems] == [(1, "corrupt")]
    assert problems[0].message.startswith("unreadable image bytes.parquet row 1, column images[0]: ")

    pq.write_table(pa.Table.from_pylist([{"id": "n", "messages": turns, "images": [5]}]), tmp_path / "ints.parquet")
    _, problems = read_records(tmp_path / "ints.parquet")
    assert [(p.index, p.message) for p in problems] == [(0, "'images' must be a list of file names, got [5]")]

    clip = [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "It rolls."}]
    pq.write_table(pa.Table.from_pylist([{"id": "v", "messages": clip, "videos": [b"\x00\x00\x00\x18ftypmp42"]}]),
                   tmp_path / "clip.parquet")
    _, problems = read_records(tmp_path / "clip.parquet")
    assert [(p.index, p.message) for p in problems] == [
        (0, "a video given as bytes in a table is not read (only images and frames are); write it to a file")]

    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    _, problems = read_records(tmp_path / "broken.parquet")
    assert len(problems) == 1 and problems[0].index is None and "cannot read broken.parquet" in problems[0].message


def test_table_images_stay_in_the_file(qwen2_vl, tmp_path, monkeypatch):
    """A Parquet file's image bytes are not copied into the data store: each distinct image is checked once and
    read back from its cell (the bytes the processor gets are the file's; an Arrow file's too); a file rewritten
    with other bytes under the same row is noticed, not read as the image that was checked."""
    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path / "cache"))
    processor, family, budget = qwen2_vl
    circle, square = ((EXAMPLES / "images" / n).read_bytes() for n in ("red_circle.png", "blue_square.png"))
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A shape."}]}]
    rows = [{"id": f"r{i}", "messages": turns, "images": [{"bytes": [circle, square][i % 3 == 2], "path": None}]}
            for i in range(12)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    result = check_data(str(path), processor, family, budget)
    assert not result.problems and len(result.records) == 12
    store = result.store.folder
    for file in store.iterdir():  # neither the bytes nor their base64 are in any file of the store
        data = file.read_bytes()
        assert circle[16:80] not in data and base64.b64encode(circle)[:64] not in data, file.name
    assert len(result.store.media_table()) == 2  # two distinct images: two header checks
    got = [media.inline_bytes(r.images[0]) for r in result.records]
    assert got == [[circle, square][i % 3 == 2] for i in range(12)]
    want = media.load_image(EXAMPLES / "images" / "blue_square.png", budget)
    assert list(media.load_image(result.records[2].images[0], budget).getdata()) == list(want.getdata())

    arrow = tmp_path / "rows.arrow"  # the Arrow IPC file format, two record batches: cells read the same way
    with pa.ipc.new_file(arrow, pa.Table.from_pylist(rows).schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows), max_chunksize=7)
    records, problems = read_records(arrow)
    assert not problems and [media.inline_bytes(r.images[0]) for r in records] == got

    rows[2]["images"] = [{"bytes": circle, "path": None}]  # row 2 rewritten after the check
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    with pytest.raises(media.MediaError, match=r"rows.parquet row 2, column images\[0\] is not the image that was"):
        media.inline_bytes(result.records[2].images[0])
