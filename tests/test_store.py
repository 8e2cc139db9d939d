"""The data store: the check runs once per file content and setting, once per node, and its results stay exact.

Lengths are compared with what the processor itself produces for the record (``dataset[i]["input_ids"]``, the
processor's output on the decoded media), problems with the in-memory check of ``read_records``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_JSON, EXAMPLES, FAMILIES, ROOT
from PIL import Image

import vlmtune
from vlmtune.data import media, store, store_build
from vlmtune.data.check import check_data
from vlmtune.data.conversation import Conversation
from vlmtune.data.dataset import VisionLanguageDataset
from vlmtune.data.records import read_records
from vlmtune.families import FAMILIES as FAMILY_TABLE
from vlmtune.model.load import load_family, load_processor

RED_CIRCLE = "images/red_circle.png"


def record(rid: str, answer: str = "A red circle.", image: str | None = RED_CIRCLE, **extra) -> dict:
    question = "<image>\nWhat is this?" if image else "What is a circle?"
    out = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image:
        out["image"] = image
    return {**out, **extra}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def setup(tiny_model_dir, tmp_path, monkeypatch):
    """A fresh processor of the tiny Qwen2-VL (tests change it), its family and budget; an empty data cache."""
    model_dir = tiny_model_dir("qwen2_vl")
    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path / "cache"))
    processor = load_processor(str(model_dir))
    family = load_family(str(model_dir))
    return processor, family, media.budget_from_processor(processor, family.factor)


def check(path, processor, family, budget, **kwargs):
    kwargs.setdefault("image_folder", EXAMPLES)
    return check_data(str(path), processor, family, budget, **kwargs)


def processor_lengths(result, processor, family, budget) -> list[int]:
    """Token counts of the processor's own output for each valid record (media decoded)."""
    dataset = VisionLanguageDataset(result.records, processor, family, budget, Conversation(processor),
                                    lengths=result.lengths)
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


@pytest.mark.parametrize("family_name", FAMILIES)
def test_lengths_are_the_processors_for_every_shape(tiny_model_dir, tmp_path, monkeypatch, family_name):
    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path / "cache"))
    model_dir = str(tiny_model_dir(family_name))
    processor, family = load_processor(model_dir), load_family(model_dir)
    budget = media.budget_from_processor(processor, family.factor)
    result = check_data(str(DATA_JSON), processor, family, budget)
    assert result.errors == [] and len(result.records) == 12
    assert result.lengths.tolist() == processor_lengths(result, processor, family, budget)
    records, _ = read_records(DATA_JSON, budget=budget, min_image_side=family.factor)
    assert list(result.records) == records  # messages, resolved paths, image sizes and video headers


def test_problems_and_records_are_those_of_the_in_memory_check(setup, tmp_path):
    processor, family, budget = setup
    rows = [
        record("a"),
        record("b", image="images/gone.png"),  # media error
        '{"id": "c", "conversations": [',  # invalid JSON line
        record("d", extra_key=1),  # unknown key (warning)
        record("a"),  # duplicate id (warning)
        {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "bot", "value": "Yo"}]},  # no id, bad role
        "",  # blank line, skipped
        record(None, image=None),  # no id: named by its index
        record("e", image=["images/red_circle.png", "images/blue_square.png"]),  # 1 placeholder, 2 images
        "[1, 2]",  # not an object
    ]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    result = check(path, processor, family, budget)
    expected_records, expected_problems = read_records(path, EXAMPLES, budget=budget, min_image_side=family.factor)
    assert result.problems == expected_problems
    assert [p.level for p in result.problems].count("error") == 5
    assert list(result.records) == expected_records
    assert [r.id for r in result.records] == ["a", "d", "a", "6"]  # blank lines are not records
    assert result.lengths.tolist() == processor_lengths(result, processor, family, budget)


def test_a_json_array_and_json_lines_give_the_same_store_contents(setup, tmp_path):
    processor, family, budget = setup
    rows = [record(f"r{i}", answer="A circle. " * (i % 7 + 1)) for i in range(30)]
    (tmp_path / "data.json").write_text(json.dumps(rows, indent=2))
    array = check(tmp_path / "data.json", processor, family, budget)
    lines = check(write_jsonl(tmp_path / "data.jsonl", rows), processor, family, budget)
    assert array.lengths.tolist() == lines.lengths.tolist() == processor_lengths(array, processor, family, budget)
    assert list(array.records) == list(lines.records)
    (tmp_path / "bad.json").write_text(json.dumps(rows)[:-1] + ",]")
    bad = check(tmp_path / "bad.json", processor, family, budget)
    assert [p.message for p in bad.problems] == [p.message for p in read_records(tmp_path / "bad.json", EXAMPLES)[1]]
    assert bad.problems[0].message.startswith("invalid JSON at line 1, column")


def test_a_second_run_opens_the_store_and_an_edit_remeasures_only_that_record(setup, tmp_path):
    processor, family, budget = setup
    rows = [record(f"r{i}", answer="A circle. " * (i % 5 + 1)) for i in range(40)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    first = check(path, processor, family, budget)
    assert first.store.built and first.store.meta["measured"] == 40 and first.store.meta["reused"] == 0

    second = check(path, processor, family, budget)
    assert not second.store.built and second.store.folder == first.store.folder
    assert second.lengths.tolist() == first.lengths.tolist()
    assert len(store.build_log(second.store)) == 1

    rows[17]["conversations"][1]["value"] = "A red circle on a white background, next to a blue square. " * 3
    write_jsonl(path, rows)
    edited = check(path, processor, family, budget)
    assert edited.store.built and edited.store.meta["measured"] == 1 and edited.store.meta["reused"] == 39
    assert edited.store.meta["media_probed"] == 0  # the image did not change
    expected = processor_lengths(edited, processor, family, budget)
    assert edited.lengths.tolist() == expected
    assert expected[17] > first.lengths[17]
    assert [n for i, n in enumerate(expected) if i != 17] == [n for i, n in enumerate(first.lengths) if i != 17]


def _change_tokenizer(processor, family, budget):
    processor.tokenizer.add_tokens(["circle on a white"])  # one token where there were several
    return processor, family, budget


def _change_template(processor, family, budget):
    processor.chat_template = processor.chat_template.replace("You are a helpful assistant.", "Be brief.")
    return processor, family, budget


def _change_budget(processor, family, budget):
    return processor, family, media.MediaBudget(**{**budget.__dict__, "image_min_pixels": 32 * family.factor ** 2})


def _change_family(processor, family, budget):
    return processor, FAMILY_TABLE["qwen2_5_vl"], budget  # same patch size: same lengths, another key


def _change_version(processor, family, budget, monkeypatch):
    monkeypatch.setattr(vlmtune, "__version__", vlmtune.__version__ + ".post1")
    return processor, family, budget


@pytest.mark.parametrize("change", [_change_tokenizer, _change_template, _change_budget, _change_family,
                                    _change_version], ids=lambda f: f.__name__[len("_change_"):])
def test_each_part_of_the_key_remeasures_every_record(setup, tmp_path, monkeypatch, change):
    processor, family, budget = setup
    rows = [record(f"r{i}", answer="A circle on a white background. " * (i % 3 + 1)) for i in range(12)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    before = check(path, processor, family, budget)
    assert before.store.built

    args = (processor, family, budget) + ((monkeypatch,) if change is _change_version else ())
    processor, family, budget = change(*args)
    after = check(path, processor, family, budget)
    assert after.store.built and after.store.meta["measured"] == 12 and after.store.meta["reused"] == 0
    assert after.store.folder.parent != before.store.folder.parent
    assert after.lengths.tolist() == processor_lengths(after, processor, family, budget)
    if change in (_change_tokenizer, _change_template, _change_budget):
        assert after.lengths.tolist() != before.lengths.tolist()
    again = check(path, processor, family, budget)
    assert not again.store.built


def test_a_changed_or_removed_media_file_is_checked_again(setup, tmp_path):
    processor, family, budget = setup
    shutil.copytree(EXAMPLES / "images", tmp_path / "images")
    rows = [record(f"r{i}") for i in range(6)] + [record("blue", image="images/blue_square.png")]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    first = check(path, processor, family, budget, image_folder=tmp_path)
    image = tmp_path / RED_CIRCLE
    Image.new("RGB", (300, 200), "red").save(image)
    os.utime(image, ns=(1, 1))  # an mtime that differs whatever the clock's resolution
    changed = check(path, processor, family, budget, image_folder=tmp_path)
    assert changed.store.built and changed.store.meta["measured"] == 0 and changed.store.meta["media_probed"] == 1
    assert changed.lengths.tolist() == processor_lengths(changed, processor, family, budget)
    assert changed.lengths[0] != first.lengths[0] and changed.lengths[6] == first.lengths[6]

    image.unlink()
    gone = check(path, processor, family, budget, image_folder=tmp_path)
    assert [r.id for r in gone.records] == ["blue"]
    assert [(p.index, p.id) for p in gone.errors] == [(i, f"r{i}") for i in range(6)]
    assert all(f"image file not found: {image}" in p.message for p in gone.errors)


def test_an_unchanged_file_opens_its_store_unread_and_an_edit_is_seen_under_an_old_mtime(setup, tmp_path,
                                                                                        monkeypatch):
    """The file's content digest is remembered under its stat (device, inode, size, mtime, ctime): a second open
    does not read the file; an edit of the same size whose mtime is set back is still seen (its ctime moved)."""
    from vlmtune.data import store_key

    processor, family, budget = setup
    read, real = [], store_key.file_digest
    monkeypatch.setattr(store_key, "file_digest", lambda p: read.append(p) or real(p))
    monkeypatch.setattr(store_key, "SETTLED_S", 0.0)  # the file was written just now: remember its digest anyway
    path = write_jsonl(tmp_path / "data.jsonl", [record("a", "A red circle."), record("b", image=None)])
    stat = os.stat(path)
    first = check(path, processor, family, budget)
    again = check(path, processor, family, budget)
    assert first.store.built and not again.store.built and len(read) == 1  # opened without reading the file
    write_jsonl(path, [record("a", "A big circle."), record("b", image=None)])  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    edited = check(path, processor, family, budget)
    assert len(read) == 2 and edited.store.built
    assert [m.text for m in edited.records[0].messages][-1] == "A big circle."


def test_worker_processes_build_the_same_store(setup, tmp_path, monkeypatch):
    """Jobs of a few records in two forked workers, merged in file order: the same store as one process."""
    processor, family, budget = setup
    rows = [record(f"r{i}", answer="A circle. " * (i % 9 + 1), image=None if i % 4 == 0 else RED_CIRCLE)
            for i in range(60)]
    rows[13]["conversations"][1]["from"] = "bot"
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    alone = check(path, processor, family, budget, processes=1)
    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setattr(store_build, "CHUNK", 4)
    monkeypatch.setattr(store_build, "INLINE_LIMIT", 8)
    pooled = check(path, processor, family, budget, processes=2)
    assert pooled.store.meta["processes"] == 2 and alone.store.meta["processes"] == 1
    assert pooled.problems == alone.problems and len(pooled.errors) == 1
    assert pooled.lengths.tolist() == alone.lengths.tolist()
    assert list(pooled.records) == list(alone.records)
    for name in ("offsets", "index", "hashes", "text_tokens", "lengths", "media_ids"):
        assert np.array_equal(getattr(pooled.store, name), getattr(alone.store, name)), name


def test_records_of_a_store_survive_pickling(setup, tmp_path):
    """DataLoader workers started by spawn get the dataset pickled: the store reopens by its folder."""
    processor, family, budget = setup
    path = write_jsonl(tmp_path / "data.jsonl", [record(f"r{i}") for i in range(5)])
    result = check(path, processor, family, budget)
    copy = pickle.loads(pickle.dumps(result.records.take([4, 1])))
    assert [r.id for r in copy] == ["r4", "r1"]
    assert copy[0] == result.records[4]


TWO_PROCESSES = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from vlmtune.data import media
    from vlmtune.data.check import check_data
    from vlmtune.model.load import load_family, load_processor

    model_dir, data, folder, me, other = sys.argv[1:]
    processor, family = load_processor(model_dir), load_family(model_dir)
    budget = media.budget_from_processor(processor, family.factor)
    Path(folder, me).touch()
    deadline = time.monotonic() + 600
    while not Path(folder, other).exists():  # start together: both ask for the store at once
        assert time.monotonic() < deadline, "the other process never started"
        time.sleep(0.05)
    result = check_data(data, processor, family, budget, image_folder=folder)
    print(json.dumps({"built": result.store.built, "lengths": result.lengths.tolist()}))
""")


@pytest.mark.slow
def test_two_processes_on_one_node_measure_once(tiny_model_dir, tmp_path):
    """As the ranks of a torchrun job do: both ask at once; one builds under the lock, the other waits and reads."""
    model_dir = str(tiny_model_dir("qwen2_vl"))
    shutil.copytree(EXAMPLES / "images", tmp_path / "images")
    path = write_jsonl(tmp_path / "data.jsonl", [record(f"r{i}", answer="A circle. " * (i % 6 + 1))
                                                 for i in range(300)])
    env = {**os.environ, "VLMTUNE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, model_dir, str(path), str(tmp_path), me, other],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for me, other in (("rank0", "rank1"), ("rank1", "rank0"))]
    outputs = []
    for run in runs:
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["built"] for o in outputs) == [False, True]
    assert outputs[0]["lengths"] == outputs[1]["lengths"] and len(outputs[0]["lengths"]) == 300
    logs = list((tmp_path / "cache" / "data").glob("*/builds.jsonl"))
    assert len(logs) == 1
    builds = [json.loads(line) for line in logs[0].read_text().splitlines()]
    assert len(builds) == 1 and builds[0]["measured"] == 300
