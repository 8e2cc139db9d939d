"""A video given as a list of frame files (as ``qwen_vl_utils.process_vision_info`` takes it): the same inputs as the
model's own recipe, the same batches from every shape, one-line errors, and a convert round trip.

The reference is qwen-vl-utils' ``process_vision_info`` on the frame files' paths fed to the model's processor, and
the labels are written by hand; tiny frames are written here at test time.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from qwen_vl_utils import process_vision_info

from vlmtune.cli import main as cli_main
from vlmtune.data import media
from vlmtune.data.check import check_data
from vlmtune.data.conversation import IGNORE_INDEX, Conversation
from vlmtune.data.dataset import VisionLanguageDataset
from vlmtune.data.records import read_records
from vlmtune.model.load import load_family, load_processor

QUESTION, ANSWER = "What moves?", "The noise."


def _frames(folder: Path, name: str, count: int, size=(90, 60), seed: int = 0) -> list[str]:
    """``count`` PNG frames of random noise under ``folder/name/``: their names relative to ``folder``."""
    rng = np.random.default_rng(seed)
    (folder / name).mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name / f"{i:04d}.png")
        names.append(f"{name}/{i:04d}.png")
    return names


def _messages(videos: list[dict], answer: str = ANSWER) -> list[dict]:
    return [{"role": "user", "content": [*videos, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def _write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_frame_list_gives_the_inputs_of_the_model_recipe(tiny_model_dir, tmp_path, family):
    """Five frames (an odd count: qwen-vl-utils pads with the last) at sample_fps 4 (Qwen3-VL's timestamps and
    Qwen2.5-VL's second_per_grid_ts read it), and a one-frame video (accepted: qwen-vl-utils and the processor both
    repeat it to fill the temporal patch): ids, token types, pixels, grids as process_vision_info + the processor
    give them; labels on the reply only (by hand); the length planned from the frames' headers is the real one."""
    model_dir = tiny_model_dir(family)
    processor, fam = load_processor(str(model_dir)), load_family(str(model_dir))
    budget = media.budget_from_processor(processor, fam.factor)
    five, one = _frames(tmp_path, "a", 5), _frames(tmp_path, "b", 1, size=(50, 70), seed=1)
    data = _write(tmp_path / "m.json", [{"id": "clip", "messages": _messages(
        [{"type": "video", "video": five, "sample_fps": 4}, {"type": "video", "video": one}])}])
    records, problems = read_records(data, budget=budget)
    assert not problems
    dataset = VisionLanguageDataset(records, processor, fam, budget, Conversation(processor))
    item = dataset[0]

    bounds = {"min_pixels": budget.video_min_pixels, "max_pixels": budget.video_max_pixels}
    reference = _messages([{"type": "video", "video": [str(tmp_path / f) for f in five], "sample_fps": 4, **bounds},
                           {"type": "video", "video": [str(tmp_path / f) for f in one], **bounds}])
    text = processor.apply_chat_template(reference, tokenize=False)
    _, videos, kwargs = process_vision_info(reference, return_video_kwargs=True, return_video_metadata=True,
                                            image_patch_size=fam.patch_size)
    videos, metadata = map(list, zip(*videos))
    assert [len(v) for v in videos] == [6, 2]  # padded to the temporal patch
    expected = processor(text=[text], videos=videos, video_metadata=metadata, return_tensors="pt", **kwargs)

    ids = expected["input_ids"][0].tolist()
    assert item["input_ids"].tolist() == ids
    assert dataset.lengths == [len(ids)]
    for key in ("mm_token_type_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert (key in item) == (key in expected), key
        if key in item:
            torch.testing.assert_close(item[key], torch.as_tensor(expected[key]).reshape(item[key].shape), msg=key)
    tok = processor.tokenizer
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    reply = tok.encode(ANSWER + "<|im_end|>", add_special_tokens=False)
    start = max(i for i in range(len(ids)) if ids[i - len(header):i] == header)
    labels = [IGNORE_INDEX] * len(ids)
    labels[start:start + len(reply)] = reply
    assert item["labels"].tolist() == labels


@pytest.fixture(scope="module")
def qwen2_vl(pipeline):
    """The tiny Qwen2-VL's processor, family and budgets (conftest's shared pipeline)."""
    tiny = pipeline("qwen2_vl")
    return tiny.processor, tiny.family, tiny.budget


def test_frame_list_in_every_shape_gives_the_same_batches(qwen2_vl, tmp_path, monkeypatch, capsys):
    """One record with a frame-list video as typed messages (frame files, or data: URIs), ShareGPT (``videos:
    [[...]]``), LLaVA, Parquet with the frames' paths, Parquet and a save_to_disk folder with the frames' bytes:
    through the data store, the same ids, lengths and tensors. check-data accepts it; a frame rewritten after the
    check is noticed."""
    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path / "cache"))
    processor, family, budget = qwen2_vl
    frames = _frames(tmp_path, "f", 4)
    typed = {"id": "clip", "messages": _messages([{"type": "video", "video": frames}])}
    shared = {"id": "clip", "messages": [{"role": "user", "content": "<video>" + QUESTION},
                                         {"role": "assistant", "content": ANSWER}], "videos": [frames]}
    llava = {"id": "clip", "video": [frames], "conversations": [{"from": "human", "value": "<video>" + QUESTION},
                                                                {"from": "gpt", "value": ANSWER}]}
    as_bytes = {"id": "clip", "messages": _messages([{"type": "video", "video": [
        {"bytes": (tmp_path / f).read_bytes(), "path": Path(f).name} for f in frames]}])}
    uris = {"id": "clip", "messages": _messages([{"type": "video", "video": [
        "data:image/png;base64," + base64.b64encode((tmp_path / f).read_bytes()).decode() for f in frames]}])}
    files = {"messages": _write(tmp_path / "m.json", [typed]), "sharegpt": _write(tmp_path / "s.json", [shared]),
             "llava": _write(tmp_path / "l.json", [llava]), "data_uris": _write(tmp_path / "u.json", [uris])}
    for name, row in (("parquet_paths", typed), ("parquet_bytes", as_bytes)):
        pq.write_table(pa.Table.from_pylist([row]), tmp_path / f"{name}.parquet")
        files[name] = tmp_path / f"{name}.parquet"
    datasets.Dataset.from_list([as_bytes]).save_to_disk(str(tmp_path / "saved"))
    files["save_to_disk"] = tmp_path / "saved"

    conversation = Conversation(processor)
    got = {}
    for name, path in files.items():
        result = check_data(str(path), processor, family, budget, conversation=conversation)
        assert not result.problems and result.store is not None, (name, result.problems)
        assert [v.frames for v in result.records[0].video_infos] == [4], name
        item = VisionLanguageDataset(result.records, processor, family, budget, conversation)[0]
        got[name] = ([r.id for r in result.records], result.lengths.tolist(), item)
    ids, lengths, want = got.pop("messages")
    # 90x60 frames: resized one by one at twice the factor (56x112), as qwen-vl-utils does, not to 56x84
    assert want["video_grid_thw"].tolist() == [[2, 4, 8]]
    for name, (other_ids, other_lengths, item) in got.items():
        assert (other_ids, other_lengths) == (ids, lengths), name
        assert item.keys() == want.keys(), name
        for key in want:
            assert torch.equal(item[key], want[key]), (name, key)

    assert cli_main(["check-data", str(files["messages"])]) == 0
    assert "1 videos" in capsys.readouterr().out
    store = check_data(str(files["messages"]), processor, family, budget, conversation=conversation).store
    assert store.is_current()
    _frames(tmp_path, "f", 4, seed=7)  # the same names, other pixels
    assert not store.is_current()


def test_bad_frame_lists_are_one_line_errors(qwen2_vl, tmp_path):
    """A missing frame, frames of two sizes, an empty list, a non-string frame, a bad sample_fps (typed messages),
    a bad entry in ShareGPT's videos, corrupt frame bytes in a Parquet cell: one line each, naming the record and
    the field or frame."""
    _, _, budget = qwen2_vl
    frames = _frames(tmp_path, "f", 3)
    _frames(tmp_path, "big", 1, size=(120, 60))
    bad = [
        ([*frames, "f/0099.png"], f"frame list [{tmp_path}/f/0000.png .. {tmp_path}/f/0099.png] (4 frames), "
                                  f"frame 3: image file not found: {tmp_path}/f/0099.png; check the name and "
                                  "--video_folder"),
        ([*frames, "big/0000.png"], f"frame 3 ({tmp_path}/big/0000.png) is 120x60 px, frame 0 90x60 px: the frames "
                                    "of a video must have one size"),
        ([], "turn 0 (user), part 0: an empty list of frames"),
        ([frames[0], 5], "turn 0 (user), part 0: frame 1 of the video must be an image file name, got 5"),
    ]
    records = [{"id": f"bad{i}", "messages": _messages([{"type": "video", "video": video}])}
               for i, (video, _) in enumerate(bad)]
    records.append({"id": "fps", "messages": _messages([{"type": "video", "video": frames, "sample_fps": -1}])})
    records.append({"id": "ok", "messages": _messages([{"type": "video", "video": frames}])})
    path = _write(tmp_path / "bad.json", records)
    good, problems = read_records(path, tmp_path, budget=budget)
    assert [r.id for r in good] == ["ok"]
    assert [(p.index, p.id) for p in problems] == [(i, r["id"]) for i, r in enumerate(records[:-1])]
    for problem, (_, expected) in zip(problems, bad):
        assert expected in problem.message, (expected, problem.message)
    assert "'sample_fps' of a frame list must be a positive number" in problems[4].message
    line = problems[0].format(path)
    assert line.startswith(f"{path}: record 0 (id 'bad0'): ") and "\n" not in line
    assert all("\n" not in p.message for p in problems)

    shared = {"id": "s", "messages": [{"role": "user", "content": "<video>?"}, {"role": "assistant", "content": "x"}],
              "videos": [[frames[0], None]]}
    _, problems = read_records(_write(tmp_path / "s.json", [shared]), tmp_path)
    assert [(p.index, p.id, p.message) for p in problems] == [(0, "s", "'videos' entry 0: frame 1 of the video must "
                                                              "be an image file name, got null; a frame list holds "
                                                              "one image name per frame")]

    data = [(tmp_path / f).read_bytes() for f in frames]
    row = {"id": "t", "messages": _messages([{"type": "video", "video": [
        {"bytes": data[0], "path": "a.png"}, {"bytes": data[1][:30], "path": "b.png"}]}])}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "t.parquet")
    _, problems = read_records(tmp_path / "t.parquet", budget=budget)
    assert [(p.index, p.id) for p in problems] == [(0, "t")]
    assert ("frame 1: unreadable image t.parquet row 0, column messages[0]['content'][0]['video'][1]: "
            in problems[0].message)


def test_convert_round_trip_keeps_the_frames(tmp_path):
    """Typed messages with a frame-list video (sample_fps 4) -> Parquet (frames embedded) -> LLaVA JSON (frames
    written as files) -> Parquet: the same id, turns, frame bytes and sample_fps at every step (read here with
    pyarrow and json)."""
    frames = _frames(tmp_path, "f", 3)
    data = [(tmp_path / f).read_bytes() for f in frames]
    src = _write(tmp_path / "m.json", [{"id": "clip", "messages": _messages(
        [{"type": "video", "video": frames, "sample_fps": 4}])}])
    turns = [("human", "<video>" + QUESTION), ("gpt", ANSWER)]

    assert cli_main(["convert", str(src), str(tmp_path / "a.parquet")]) == 0
    (row,) = pq.read_table(tmp_path / "a.parquet").to_pylist()
    (video,) = row["video"]
    assert row["id"] == "clip" and [(t["from"], t["value"]) for t in row["conversations"]] == turns
    assert [f["bytes"] for f in video["frames"]] == data and video["sample_fps"] == 4

    assert cli_main(["convert", str(tmp_path / "a.parquet"), str(tmp_path / "out" / "b.json")]) == 0
    (row,) = json.loads((tmp_path / "out" / "b.json").read_text())
    (video,) = row["video"]
    assert row["id"] == "clip" and [(t["from"], t["value"]) for t in row["conversations"]] == turns
    assert [(tmp_path / "out" / f).read_bytes() for f in video["frames"]] == data and video["sample_fps"] == 4

    assert cli_main(["convert", str(tmp_path / "out" / "b.json"), str(tmp_path / "c.parquet")]) == 0
    (row,) = pq.read_table(tmp_path / "c.parquet").to_pylist()
    assert [f["bytes"] for f in row["video"][0]["frames"]] == data and row["video"][0]["sample_fps"] == 4


def test_view_shows_a_frame_list_video(tiny_model_dir, tmp_path, monkeypatch):
    """`vlmtune view` on a frame-list record: the medium says it is a list (no video file to play), and each frame
    is served as the model gets it (resized one by one, then together: 112x56 for 90x60 frames)."""
    import io

    from vlmtune.view import build_parser, open_site

    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path / "cache"))
    frames = _frames(tmp_path, "f", 3)
    data = _write(tmp_path / "m.json", [{"id": "clip", "messages": _messages([{"type": "video", "video": frames}])}])
    site = open_site(build_parser().parse_args([str(data), "--model", str(tiny_model_dir("qwen2_vl"))]))
    page = site.record(0)
    assert page["media"] == [{"kind": "video", "url": None, "width": 90, "height": 60, "frames": 3, "fps": 2.0,
                              "listed": True}]
    assert [f["index"] for f in page["frames"][0]["frames"]] == [0, 1, 2, 3]  # the last repeated
    assert "encode_error" not in page and page["sequences"][0]["grids"]["video_grid_thw"] == [[2, 4, 8]]
    first = Image.open(io.BytesIO(site.frame_png(0, 0, 0)))
    assert first.size == (112, 56)


def test_sample_writes_a_frame_list_as_its_frames(tmp_path):
    """`vlmtune sample`'s record writer keeps a frame-list video as a list of its frames (relative to the output),
    which reads back as the same video."""
    from vlmtune.sample import write_records

    frames = _frames(tmp_path, "f", 2)
    records, _ = read_records(_write(tmp_path / "m.json", [{"id": "clip", "messages": _messages(
        [{"type": "video", "video": frames, "sample_fps": 3}])}]), check_media=False)
    write_records(records, tmp_path / "out.jsonl")
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["video"] == [{"frames": frames, "sample_fps": 3.0}]
    again, problems = read_records(tmp_path / "out.jsonl", check_media=False)
    assert not problems and again[0].videos == records[0].videos


def test_the_length_check_reads_only_the_frames_headers(qwen2_vl, tmp_path, monkeypatch):
    """Checking a frame list decodes no pixel (PIL's decoder is made to fail): its size comes from the image headers,
    its frame count from the list, and the planned length is what the decoded record then gives."""
    from PIL import ImageFile

    processor, family, budget = qwen2_vl
    frames = _frames(tmp_path, "f", 7)
    data = _write(tmp_path / "m.json", [{"id": "clip", "messages": _messages([{"type": "video", "video": frames}])}])
    real_load = ImageFile.ImageFile.load
    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("a frame was decoded"))
        records, problems = read_records(data, budget=budget)
        assert not problems and records[0].video_infos[0].frames == 7
        dataset = VisionLanguageDataset(records, processor, family, budget, Conversation(processor))
    assert ImageFile.ImageFile.load is real_load
    assert len(dataset[0]["input_ids"]) == dataset.lengths[0]
