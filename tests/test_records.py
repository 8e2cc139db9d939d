"""Malformed data files: every problem is found up front and named by file, record index, id and cause."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import sys
import threading
from pathlib import Path

import forkserver
import pytest
from conftest import DATA_JSON, EXAMPLES
from PIL import Image

from vlmtune.cli import main as cli_main
from vlmtune.data import media
from vlmtune.data.records import load_records, read_records
from vlmtune.errors import DataError

RED_CIRCLE = "images/red_circle.png"
BALL = "videos/ball_right.mp4"


def turns(question: str = "<image>\nWhat is this?", answer: str = "A circle.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def good(rid: str, image: str | None = RED_CIRCLE) -> dict:
    record = {"id": rid, "conversations": turns() if image else turns("What is a circle?")}
    if image:
        record["image"] = image
    return record


def write(tmp_path: Path, records, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(records if isinstance(records, str) else json.dumps(records, indent=1))
    return path


def problems(path: Path, level: str = "error", **kwargs) -> list[str]:
    kwargs.setdefault("image_folder", EXAMPLES)
    _, found = read_records(path, **kwargs)
    return [p.format(path) for p in found if p.level == level]


def only_error(path: Path, index: int | None, rid: str | None, *fragments: str, **kwargs) -> str:
    """The single error of the file; asserts it names the file, the record (index and id) and the cause."""
    errors = problems(path, **kwargs)
    assert len(errors) == 1, errors
    where = f"{path}"
    if index is not None:
        where += f": record {index}" + (f" (id {rid!r})" if rid is not None else "")
    assert errors[0].startswith(where + ": "), errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


# ---------------------------------------------------------------- the file


def test_invalid_json_names_line_and_column(tmp_path):
    text = '[\n  {"id": "a", "conversations": []},\n  {"id": "b" "conversations": []}\n]\n'
    path = write(tmp_path, text)
    only_error(path, None, None, "invalid JSON at line 3, column 14", "Expecting ',' delimiter")


def test_invalid_jsonl_line_names_line_and_keeps_the_other_records(tmp_path):
    lines = [json.dumps(good("a")), "", '{"id": "b", "conversations": [', json.dumps(good("c"))]
    path = write(tmp_path, "\n".join(lines) + "\n", "data.jsonl")
    only_error(path, 1, None, "line 3, column", "invalid JSON")
    records, _ = read_records(path, EXAMPLES)
    assert [(r.index, r.id) for r in records] == [(0, "a"), (2, "c")]  # indices count the bad line


def test_json_lines_in_a_json_file_with_unicode_line_separators(tmp_path):
    """One record per line under a .json name is read as JSON lines; U+2028 inside a string does not cut
    a line (str.splitlines would), and a UTF-8 byte order mark is accepted."""
    first = good("a")
    first["conversations"][1]["value"] = "A red\u2028circle."
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in (first, good("b")))
    path = tmp_path / "data.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    records, found = read_records(path, EXAMPLES)
    assert found == []
    assert [r.id for r in records] == ["a", "b"]
    assert records[0].messages[1].text == "A red\u2028circle."


def test_a_json_array_in_a_jsonl_file_and_the_examples_deep(tmp_path):
    path = write(tmp_path, (EXAMPLES / "data.json").read_text(), "data.jsonl")
    records, found = read_records(path, EXAMPLES, deep=True)
    assert found == [] and len(records) == 12
    assert records[0].images == [str(EXAMPLES / RED_CIRCLE)]


@pytest.mark.parametrize("top, got", [
    ({"data": [good("a")]}, "an object with keys ['data']"),
    (42, "int"),
    ("records", "str"),
])
def test_top_level_must_be_an_array(tmp_path, top, got):
    path = write(tmp_path, json.dumps(top))
    only_error(path, None, None, "the top level must be a JSON array of records", got)


def test_empty_array_is_an_error(tmp_path):
    only_error(write(tmp_path, []), None, None, "holds no records")


def test_missing_data_file(tmp_path):
    only_error(tmp_path / "nope.json", None, None, "data file not found")


# ---------------------------------------------------------------- records and turns


def test_record_that_is_not_an_object(tmp_path):
    path = write(tmp_path, [good("a"), "just a string", good("c")])
    only_error(path, 1, None, "a record must be a JSON object, got str")
    assert [r.id for r in read_records(path, EXAMPLES)[0]] == ["a", "c"]


@pytest.mark.parametrize("conversations, state", [
    (None, "missing"),
    ([], "empty"),
    ("human: hi", "a str, not a list"),
])
def test_missing_or_empty_conversations(tmp_path, conversations, state):
    record = {"id": "x"}
    if conversations is not None:
        record["conversations"] = conversations
    path = write(tmp_path, [good("a"), record])
    only_error(path, 1, "x", f"'conversations' is {state}", "give a list of")


def test_unknown_role(tmp_path):
    record = good("x")
    record["conversations"][1]["from"] = "bot"
    only_error(write(tmp_path, [record]), 0, "x", "turn 1: unknown role 'bot'", "'system', 'human' or 'gpt'")


@pytest.mark.parametrize("roles", [
    ["human", "gpt", "human"],  # ends on the user
    ["human", "system", "gpt"],  # a system turn in the middle
    ["gpt", "human"],  # starts with the assistant
    ["human", "human", "gpt"],  # two user turns in a row
    ["system"],  # nothing but a system prompt
])
def test_roles_out_of_order(tmp_path, roles):
    record = {"id": "x", "conversations": [{"from": r, "value": f"{r} text"} for r in roles]}
    only_error(write(tmp_path, [record]), 0, "x", f"roles out of order: {roles}", "ending with gpt")


def test_system_prompt_then_alternating_turns_is_valid(tmp_path):
    record = {"id": "x", "conversations": [{"from": "system", "value": "Be brief."}, *turns("Hi?", "Hello."),
                                           *turns("More?", "No.")]}
    records, found = read_records(write(tmp_path, [record]))
    assert found == [] and [m.role for m in records[0].messages] == ["system", "user", "assistant", "user",
                                                                    "assistant"]


def test_empty_assistant_text(tmp_path):
    record = {"id": "x", "conversations": turns("Hi?", "  \n")}
    only_error(write(tmp_path, [record]), 0, "x", "turn 1 (gpt): empty assistant reply")


@pytest.mark.parametrize("value, kind", [(["A circle."], "list"), (5, "int"), (None, "NoneType")])
def test_value_must_be_a_string(tmp_path, value, kind):
    record = good("x")
    record["conversations"][1]["value"] = value
    only_error(write(tmp_path, [record]), 0, "x", f"turn 1 (gpt): 'value' must be a string, got {kind}")


def test_reserved_special_token_in_text(tmp_path):
    record = good("x")
    record["conversations"][0]["value"] = "<image>\nWhat is this?<|im_end|>"
    only_error(write(tmp_path, [record]), 0, "x", "turn 0 (human)", "reserved token(s) ['<|im_end|>']")


def test_placeholder_in_an_assistant_turn(tmp_path):
    record = {"id": "x", "image": RED_CIRCLE, "conversations": turns("What is this?", "It is <image>.")}
    only_error(write(tmp_path, [record]), 0, "x", "turn 1 (gpt): <image> / <video> placeholders belong in the "
                                                  "human turns")


# ---------------------------------------------------------------- placeholders and media fields


def test_image_placeholders_must_match_images(tmp_path):
    record = {"id": "x", "image": RED_CIRCLE, "conversations": turns("<image> and <image>?")}
    only_error(write(tmp_path, [record]), 0, "x", "2 <image> placeholder(s) but 1 image(s)")


def test_video_placeholders_must_match_videos(tmp_path):
    record = {"id": "x", "video": [BALL], "conversations": turns("Where does the ball go?")}
    only_error(write(tmp_path, [record]), 0, "x", "0 <video> placeholder(s) but 1 video(s)")


@pytest.mark.parametrize("image", [5, ["images/red_circle.png", 3], {"path": RED_CIRCLE}, ""])
def test_bad_image_field_type(tmp_path, image):
    record = {"id": "x", "image": image, "conversations": turns()}
    # one error: the field, not also a placeholder count against an image list that could not be read
    only_error(write(tmp_path, [record]), 0, "x", "'image' must be a file name or a list of file names",
               json.dumps(image)[:20])


def test_missing_media_file(tmp_path):
    record = {"id": "x", "image": "images/no_such.png", "conversations": turns()}
    only_error(write(tmp_path, [record]), 0, "x", f"image file not found: {EXAMPLES / 'images/no_such.png'}",
               "--image_folder")


def test_corrupt_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"these bytes are not an image" * 10)
    record = {"id": "x", "image": "broken.png", "conversations": turns()}
    only_error(write(tmp_path, [record]), 0, "x", f"unreadable image {tmp_path / 'broken.png'}",
               image_folder=tmp_path)


def test_truncated_image_passes_the_header_check_and_fails_the_deep_one(tmp_path):
    Image.effect_noise((200, 200), 60).convert("RGB").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    path = write(tmp_path, [{"id": "x", "image": "cut.png", "conversations": turns()}])
    assert problems(path, image_folder=tmp_path) == []
    only_error(path, 0, "x", f"unreadable image {tmp_path / 'cut.png'}", image_folder=tmp_path, deep=True)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_file_that_breaks_only_when_decoded_stops_training_in_one_line(tmp_path, workers):
    """What the header check lets through fails at its first read, named, with the cure; from a DataLoader
    worker too, whose exception would otherwise carry the worker's whole traceback."""
    Image.effect_noise((200, 200), 60).convert("RGB").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    path = write(tmp_path, [{"id": "x", "image": "cut.png", "conversations": turns()}])
    result = forkserver.run([sys.executable, "-m", "vlmtune.cli", "train", "--data_path", str(path), "--image_folder",
                             str(tmp_path), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                             "--dataloader_num_workers", workers], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line.lower()]
    assert errors == [f"vlmtune train: error: {path}: record 0 (id 'x'): unreadable image {tmp_path / 'cut.png'}: "
                      "image file is truncated; `vlmtune check-data --deep` (or --deep_check True) decodes every "
                      "file and lists all such records"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content", [b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8, b"not a video"])
def test_unreadable_video(tmp_path, content):
    (tmp_path / "clip.mp4").write_bytes(content)
    record = {"id": "x", "video": "clip.mp4", "conversations": turns("<video>\nWhat happens?")}
    only_error(write(tmp_path, [record]), 0, "x", f"unreadable video {tmp_path / 'clip.mp4'}",
               image_folder=tmp_path)


def test_video_that_cannot_be_sampled_under_the_budget(tmp_path):
    record = {"id": "x", "video": BALL, "conversations": turns("<video>\nWhat happens?")}
    only_error(write(tmp_path, [record]), 0, "x", "(16 frames at 8 fps) cannot be sampled with nframes=32",
               budget=media.MediaBudget(nframes=32))


@pytest.mark.parametrize("size, expected", [
    ((20, 100), "is 20x100 px; the processor needs at least 28 px a side"),
    ((30, 6100), "is 30x6100 px, an aspect ratio over 200"),
])
def test_image_too_small_or_too_elongated(tmp_path, size, expected):
    Image.new("RGB", size, "red").save(tmp_path / "odd.png")
    record = {"id": "x", "image": "odd.png", "conversations": turns()}
    only_error(write(tmp_path, [record]), 0, "x", expected, image_folder=tmp_path)


def test_a_fixed_resize_accepts_small_and_elongated_images(tmp_path):
    Image.new("RGB", (20, 100), "red").save(tmp_path / "small.png")
    Image.new("RGB", (30, 6100), "red").save(tmp_path / "long.png")
    path = write(tmp_path, [{"id": n, "image": f"{n}.png", "conversations": turns()} for n in ("small", "long")])
    fixed = media.MediaBudget(image_resized_height=56, image_resized_width=56)
    records, found = read_records(path, tmp_path, budget=fixed, deep=True)
    assert found == [] and [r.image_sizes for r in records] == [[(20, 100)], [(30, 6100)]]
    assert len(problems(path, image_folder=tmp_path)) == 2  # without it, both are errors


def test_min_image_side_follows_the_family_factor(tmp_path):
    Image.new("RGB", (30, 30), "red").save(tmp_path / "small.png")
    path = write(tmp_path, [{"id": "x", "image": "small.png", "conversations": turns()}])
    assert problems(path, image_folder=tmp_path, min_image_side=28) == []
    only_error(path, 0, "x", "needs at least 32 px a side", image_folder=tmp_path, min_image_side=32)


@pytest.fixture
def http_examples():
    """data_examples/ served over HTTP on localhost."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(EXAMPLES))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_are_refused_unless_allowed_and_then_fetched_and_checked(tmp_path, monkeypatch, http_examples):
    monkeypatch.setenv("VLMTUNE_CACHE", str(tmp_path / "cache"))
    url = f"{http_examples}/images/red_triangle_rotated.jpg"
    video_url = f"{http_examples}/{BALL}"
    record = {"id": "x", "image": url, "video": video_url, "conversations": turns("<image> <video> Same?", "No.")}
    path = write(tmp_path, [record])
    errors = problems(path)
    assert len(errors) == 2 and all(e.startswith(f"{path}: record 0 (id 'x'): ") for e in errors)
    assert f"image {url!r} is a URL" in errors[0] and "--allow_urls" in errors[0]
    assert f"video {video_url!r} is a URL" in errors[1]

    records, found = read_records(path, allow_urls=True)
    assert found == []
    assert records[0].images == [url] and records[0].image_sizes == [(72, 96)]  # EXIF applied to the download
    assert records[0].video_infos == [media.video_info(EXAMPLES / BALL)]
    assert len(list((tmp_path / "cache" / "media").iterdir())) == 2  # fetched once each, kept for training
    budget = media.MediaBudget()
    assert media.load_image(url, budget).size == media.load_image(EXAMPLES / "images/red_triangle_rotated.jpg",
                                                                  budget).size

    missing = write(tmp_path, [{"id": "y", "image": f"{http_examples}/images/nope.png", "conversations": turns()}],
                    "missing.json")
    only_error(missing, 0, "y", "cannot download", "404", allow_urls=True)


def test_file_urls_and_absolute_paths_ignore_the_image_folder(tmp_path):
    absolute = str(EXAMPLES / RED_CIRCLE)
    path = write(tmp_path, [good("a", absolute), good("b", "file://" + absolute)])
    records, found = read_records(path, image_folder=tmp_path / "elsewhere")
    assert found == []
    assert [r.images for r in records] == [[absolute], [absolute]]


# ---------------------------------------------------------------- warnings, all at once, the API


def test_duplicate_ids_and_unknown_keys_are_warnings(tmp_path):
    extra = good("b")
    extra["source"] = "web"
    path = write(tmp_path, [good("a"), extra, good("a"), good("c")])
    records, found = read_records(path, EXAMPLES)
    assert [r.id for r in records] == ["a", "b", "a", "c"]  # warnings drop nothing
    assert [p.level for p in found] == ["warning", "warning"]
    messages = [p.format(path) for p in found]
    assert messages[0].startswith(f"{path}: record 1 (id 'b'): unknown key 'source' ignored (in 1 record(s): 1)")
    assert messages[1].startswith(f"{path}: record 2 (id 'a'): duplicate id: records 0, 2 all use it")


def test_plural_media_keys_get_a_hint(tmp_path):
    """In a LLaVA file (its first record LLaVA), 'images' is a slip for 'image'. A file that starts with such a
    record is ShareGPT (LLaMA-Factory writes `conversations` with an `images` list): tests/test_formats.py."""
    record = {"id": "x", "images": [RED_CIRCLE], "conversations": turns()}
    path = write(tmp_path, [good("first"), record])
    only_error(path, 1, "x", "1 <image> placeholder(s) but 0 image(s)")
    warning, = problems(path, level="warning")
    assert warning.startswith(f"{path}: record 1 (id 'x'): unknown key 'images' ignored")
    assert warning.endswith("did you mean 'image'?")


def test_every_problem_is_reported_at_once_and_valid_records_are_returned(tmp_path):
    bad_role = good("bad_role")
    bad_role["conversations"][0]["from"] = "robot"
    bad_count = {"id": "bad_count", "image": [RED_CIRCLE, RED_CIRCLE], "conversations": turns()}
    missing = {"id": "missing", "image": "images/gone.png", "conversations": turns()}
    path = write(tmp_path, [good("ok_1"), bad_role, bad_count, good("ok_2", None), missing])
    records, found = read_records(path, EXAMPLES)
    assert [r.id for r in records] == ["ok_1", "ok_2"]
    errors = [p.format(path) for p in found if p.level == "error"]
    assert len(errors) == 3
    assert errors[0].startswith(f"{path}: record 1 (id 'bad_role'): turn 0: unknown role 'robot'")
    assert errors[1].startswith(f"{path}: record 2 (id 'bad_count'): 1 <image> placeholder(s) but 2 image(s)")
    assert errors[2].startswith(f"{path}: record 4 (id 'missing'): image file not found")

    with pytest.raises(DataError) as info:
        load_records(path, EXAMPLES)
    text = str(info.value)
    assert text.startswith(f"3 error(s) in {path}:")
    assert all(e in text for e in errors)
    assert len(info.value.problems) == 3


def test_each_media_file_is_read_once_however_many_records_name_it(tmp_path, monkeypatch):
    calls: list[str] = []
    real = media.image_size
    monkeypatch.setattr(media, "image_size", lambda p: calls.append(p) or real(p))
    path = write(tmp_path, [good(f"r{i}", [RED_CIRCLE, "images/blue_square.png"][i % 2]) for i in range(50)])
    records, found = read_records(path, EXAMPLES)
    assert found == [] and len(records) == 50
    assert sorted(calls) == sorted({str(EXAMPLES / RED_CIRCLE), str(EXAMPLES / "images/blue_square.png")})
    assert records[1].image_sizes == [(96, 72)]


def test_the_examples_are_valid_and_hold_every_shape():
    records, found = read_records(DATA_JSON)
    assert found == []
    assert {r.shape for r in records} == {"text", "image", "multi_image", "video", "image+video"}
    two = next(r for r in records if r.id == "two_images")
    assert two.images == [str(EXAMPLES / RED_CIRCLE), str(EXAMPLES / "images/yellow_circle.png")]
    assert two.image_sizes == [(96, 72), (96, 72)]


# ---------------------------------------------------------------- vlmtune check-data


def test_check_data_cli_exits_1_and_prints_every_problem(tmp_path, capsys):
    bad = {"id": "b", "image": "images/gone.png", "conversations": turns()}
    late = {"id": "c", "conversations": turns("Hi?", "")}
    path = write(tmp_path, [good("a"), bad, late])
    assert cli_main(["check-data", str(path), "--image_folder", str(EXAMPLES)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: 1 valid records (2 error(s), 0 warning(s))" in out
    assert f"ERROR: {path}: record 1 (id 'b'): image file not found" in out
    assert f"ERROR: {path}: record 2 (id 'c'): turn 1 (gpt): empty assistant reply" in out


def test_train_stops_on_bad_data_naming_each_problem_once(tmp_path):
    """The trainer runs the same check first: one line per problem, before any model loads, no traceback."""
    bad = {"id": "b", "image": "images/gone.png", "conversations": turns()}
    late = {"id": "c", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gtp", "value": "Yo"}]}
    path = write(tmp_path, [good("a"), bad, late])
    result = forkserver.run([sys.executable, "-m", "vlmtune.cli", "train", "--data_path", str(path), "--image_folder",
                             str(EXAMPLES), "--output_dir", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert result.stderr.count(f"{path}: record 1 (id 'b'): image file not found") == 1
    assert result.stderr.count(f"{path}: record 2 (id 'c'): turn 1: unknown role 'gtp'") == 1
    assert f"vlmtune train: error: 2 error(s) in {path}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_check_data_cli_exits_0_and_summarises_the_examples(capsys):
    assert cli_main(["check-data", str(DATA_JSON)]) == 0
    out = capsys.readouterr().out
    assert f"{DATA_JSON}: 12 valid records (0 error(s), 0 warning(s))" in out
    assert "shapes: image 6, image+video 1, multi_image 1, text 2, video 2" in out
    assert "media: 9 images, 3 videos" in out
    assert "tokens (vision included): min " in out and "p95 " in out
    assert "over 4,096 tokens: 0" in out
    assert "ERROR" not in out


def test_check_data_cli_copies_are_resolved_against_image_folder(tmp_path, capsys):
    """The data file elsewhere, media found through --image_folder; without it, every record is named."""
    shutil.copy(DATA_JSON, tmp_path / "data.json")
    assert cli_main(["check-data", str(tmp_path / "data.json"), "--image_folder", str(EXAMPLES)]) == 0
    capsys.readouterr()
    assert cli_main(["check-data", str(tmp_path / "data.json")]) == 1
    out = capsys.readouterr().out
    assert out.count("ERROR: ") == 12  # one per missing file: 9 images and 3 videos in 10 records
    assert f"record 0 (id 'single_red_circle'): image file not found: {tmp_path / RED_CIRCLE}" in out
