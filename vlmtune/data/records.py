"""LLaVA-style JSON / JSONL -> validated ``Record``s. Every format error of a data file is found here.

Validation runs over the whole file before a model is loaded and reports every problem at once, each
naming the file, the record (index and id) and what to do. Media are checked from their headers (fast on
100k records); ``deep=True`` decodes every file, in parallel.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.data import boxes, media
from vlmtune.errors import DataError, FileError, MediaError, Problem
from vlmtune.families.base import SPECIAL_TOKENS

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
KNOWN_KEYS = {"id", "image", "video", "conversations", "box_format", "box_image"}
STAGES = ("sft", "dpo", "grpo", "cpt")
"""What a data file is for: supervised replies, preference pairs, prompts with fields for reward functions, or
documents (continued pre-training: ``text`` with media, no chat)."""
DOCUMENT_ROLE = "document"
"""The role of a CPT record's one message: its whole text, placeholders where the media go."""
MAX_ASPECT_RATIO = 200  # the processors' limit
URL_PREFIXES = media.URL_PREFIXES
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    text: str  # with <image> / <video> placeholders where the media go


@dataclass
class Record:
    """One validated sample: messages plus resolved media paths in placeholder order."""

    index: int
    id: str
    messages: list[Message]
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    """(width, height) of each image after EXIF orientation, read from its header."""
    video_infos: list[media.VideoInfo] = field(default_factory=list)
    chosen: str | None = None
    """Preference records (DPO): the better reply to the last prompt; ``messages`` end with that prompt."""
    rejected: str | None = None
    """Preference records (DPO): the worse reply to the last prompt."""
    fields: dict = field(default_factory=dict)
    """Prompt records (GRPO): the record's other keys (a gold ``answer``, a ``box``, ...), for reward functions."""
    box_format: str | None = None
    """Convention of the boxes in this record's text (the record's ``box_format``, else ``--box_format``)."""
    box_image: int | list[int] | None = None
    """1-based image each box refers to, in multi-image records (one for all, or one per box)."""
    boxes: list[boxes.Converted] = field(default_factory=list)
    """The boxes found and converted to the family's convention (``vlmtune.data.boxes``)."""

    @property
    def shape(self) -> str:
        """'text', 'image', 'multi_image', 'video' or 'image+video' (for summaries)."""
        if self.images and self.videos:
            return "image+video"
        if self.videos:
            return "video"
        if len(self.images) > 1:
            return "multi_image"
        return "image" if self.images else "text"


RawItem = tuple[int, "int | None", "bytes | str"]
"""(record index, line number in a JSON lines file or None, the record's JSON text)."""

_JSON_WS = re.compile(r"[ \t\n\r]*")
_BLOCK = 1 << 22  # bytes read at a time from a JSON lines file


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileError("data file not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FileError(f"cannot read the data file: {exc}") from None


def _invalid_json(exc: json.JSONDecodeError) -> FileError:
    return FileError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                     "fix the file (a JSON array of records, or one record per line)")


def _blank(line: bytes) -> bool:
    if not line.strip():
        return True
    return not line.isascii() and not line.decode("utf-8", "replace").strip()  # Unicode spaces only


def _lines(path: Path) -> Iterator[RawItem]:
    """The non-blank lines of a JSON lines file, read in blocks (the file is never held whole)."""
    index = lineno = 0
    rest = b""
    with open(path, "rb") as f:
        first = True
        while True:
            block = f.read(_BLOCK)
            if first and block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
            first = False
            if not block:
                break
            lines = (rest + block).split(b"\n")  # not splitlines(): U+2028 may sit inside a string
            rest = lines.pop()
            for line in lines:
                lineno += 1
                if not _blank(line):
                    yield index, lineno, line
                    index += 1
    if not _blank(rest):
        yield index, lineno + 1, rest


def _array(text: str) -> Iterator[RawItem]:
    """The elements of a JSON array, each as its own text, parsed one at a time (in file order)."""
    decode = json.JSONDecoder().raw_decode
    index = pos = 0
    try:
        pos = _JSON_WS.match(text).end()
        if text[pos : pos + 1] != "[":
            raise ValueError("not an array")
        pos = _JSON_WS.match(text, pos + 1).end()
        if text[pos : pos + 1] != "]":
            while True:
                _, end = decode(text, pos)
                yield index, None, text[pos:end]
                index += 1
                pos = _JSON_WS.match(text, end).end()
                sep = text[pos : pos + 1]
                pos = _JSON_WS.match(text, pos + 1).end()
                if sep == "]":
                    break
                if sep != ",":
                    raise ValueError("not an array")
        else:
            pos = _JSON_WS.match(text, pos + 1).end()
        if pos != len(text):
            raise ValueError("data after the array")
    except ValueError:
        try:  # the whole-file parse names the first error exactly as json reports it
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _invalid_json(exc) from None
        raise FileError(f"unexpected layout of a valid JSON array (at character {pos}); "
                        f"please report it: {type(data).__name__}") from None


def scan(path: str | Path) -> Iterator[RawItem]:
    """Every record of a data file as ``(index, line number, JSON text)``, in file order, lazily.

    A JSON array, JSON lines (``.jsonl`` / ``.ndjson``, or one record per line under another name) and a single
    record are read. Records are not parsed here; a JSON lines file is read in blocks, never whole. Raises
    ``FileError`` for a file that holds no readable records (possibly after yielding some: discard them).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_BLOCK).decode("utf-8-sig", "replace").lstrip()
    except FileNotFoundError:
        raise FileError("data file not found; check the path") from None
    except OSError as exc:
        raise FileError(f"cannot read the data file: {exc}") from None
    if head.startswith("["):
        return _array(_read_text(path))
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _lines(path)
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # Several JSON objects one per line in a .json file: JSON lines under another name.
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _lines(path)
        raise _invalid_json(exc) from None
    if isinstance(data, dict) and ("conversations" in data or "text" in data):
        return iter([(0, None, text)])  # a single record (one-line JSON lines file)
    got = f"an object with keys {sorted(data)[:5]}" if isinstance(data, dict) else type(data).__name__
    raise FileError(f"the top level must be a JSON array of records ([{{...}}, ...]) or "
                    f"one record per line (JSON lines), got {got}")


def _as_list(value, key: str, err) -> list[str] | None:
    """The file names of an ``image`` / ``video`` field, or None (and an error) when its type is wrong."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        err(f"'{key}' must be a file name or a list of file names, got {json.dumps(value)[:80]}")
        return None
    return values


class _Resolver:
    """Media names -> paths (relative to a folder, or absolute), memoised: datasets repeat file names."""

    def __init__(self, folder: Path, allow_urls: bool, kind: str):
        self.folder = str(folder)
        self.allow_urls = allow_urls
        self.kind = kind
        self.cache: dict[str, str] = {}

    def __call__(self, name: str, err) -> str | None:
        if name.startswith(URL_PREFIXES):
            if not self.allow_urls:
                err(f"{self.kind} {name!r} is a URL; download it, or pass --allow_urls to fetch it")
                return None
            return name
        path = self.cache.get(name)
        if path is None:
            local = name[len(media.FILE_PREFIX):] if name.startswith(media.FILE_PREFIX) else name
            path = self.cache[name] = os.path.normpath(os.path.join(self.folder, os.path.expanduser(local)))
        return path


def _parse_record(index: int, raw, resolvers: tuple[_Resolver, _Resolver], stage: str = "sft"):
    """One raw value -> (Record or None, problems). ``stage`` "dpo" / "grpo": a prompt-only conversation plus
    the stage's own keys (see ``_stage_parts``)."""
    problems: list[Problem] = []
    if not isinstance(raw, dict):
        return None, [Problem("error", f"a record must be a JSON object, got {type(raw).__name__}: "
                                       f"{json.dumps(raw)[:60]}", index)]
    rid = str(raw["id"]) if raw.get("id") is not None else None

    def err(msg: str) -> None:
        problems.append(Problem("error", msg, index, rid))

    images = _as_list(raw.get("image"), "image", err)
    videos = _as_list(raw.get("video"), "video", err)
    if stage == "cpt":
        text = _document_text(raw, images, videos, err)
        image_paths = [resolvers[0](f, err) for f in images or []]
        video_paths = [resolvers[1](f, err) for f in videos or []]
        if problems:
            return None, problems
        return Record(index, rid if rid is not None else str(index), [Message(DOCUMENT_ROLE, text)], image_paths,
                      video_paths), problems

    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        state = "missing" if "conversations" not in raw else "empty" if turns in ([], None, "") else (
            f"a {type(turns).__name__}, not a list")
        err(f"'conversations' is {state}; give a list of {{\"from\": \"human\"|\"gpt\", \"value\": ...}} turns")
        return None, problems

    messages: list[Message] = []
    names: list[str] = []
    placeholders: Counter[str] = Counter()
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            err(f"turn {t} must be an object with 'from' and 'value', got {type(turn).__name__}")
            continue
        role_name = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = ROLES.get(role_name) if isinstance(role_name, str) else None
        if role is None:
            err(f"turn {t}: unknown role {role_name!r}; use 'system', 'human' or 'gpt'")
            continue
        if not isinstance(value, str):
            err(f"turn {t} ({role_name}): 'value' must be a string, got {type(value).__name__}; "
                "write the text, with <image> / <video> where the media go")
            continue
        reserved = [tok for tok in SPECIAL_TOKENS if tok in value] if "<|" in value else None
        if reserved:
            err(f"turn {t} ({role_name}): text contains the reserved token(s) {reserved}; remove them "
                "(write <image> / <video> where the media go)")
        if role == "assistant" and not value.strip():
            err(f"turn {t} ({role_name}): empty assistant reply; write the answer or drop the turn")
        if "<" in value:
            found = {p: value.count(p) for p in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)}
            placeholders.update(found)
            if role != "user" and any(found.values()):
                err(f"turn {t} ({role_name}): <image> / <video> placeholders belong in the human turns; move them")
        messages.append(Message(role, value))
        names.append(role_name)

    stage_parts = _stage_parts(raw, stage, messages, names, err) if len(messages) == len(turns) else {}
    if len(messages) == len(turns) and stage != "sft":
        _check_prompt_turns(messages, names, stage, err)
    elif len(messages) == len(turns):
        roles = [m.role for m in messages]
        body = roles[1:] if roles[0] == "system" else roles
        expected = ["user", "assistant"] * (len(body) // 2 + 1)
        if not body or body != expected[: len(body)] or body[-1] != "assistant":
            err(f"roles out of order: {names}; after an optional system turn, human and gpt alternate, "
                "starting with human and ending with gpt")

    for kind, placeholder, files in (("image", IMAGE_PLACEHOLDER, images), ("video", VIDEO_PLACEHOLDER, videos)):
        if files is None or len(messages) < len(turns):  # a wrong field or a skipped turn: counts would mislead
            continue
        n = placeholders[placeholder]
        if n != len(files):
            err(f"{n} {placeholder} placeholder(s) but {len(files)} {kind}(s); "
                f"put one {placeholder} in the text where each {kind} goes")

    box_format = raw.get("box_format")
    if box_format is not None and box_format not in boxes.FORMATS:
        err(f"'box_format' {box_format!r} is not one of {', '.join(boxes.FORMATS)}")
    box_image = raw.get("box_image")
    if box_image is not None and not (
            (isinstance(box_image, int) and not isinstance(box_image, bool))
            or (isinstance(box_image, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                    for i in box_image))):
        err(f"'box_image' must be an image number (1-based) or a list of them, one per box, got "
            f"{json.dumps(box_image)[:40]}")

    image_paths = [resolvers[0](f, err) for f in images or []]
    video_paths = [resolvers[1](f, err) for f in videos or []]
    if problems:  # only errors so far
        return None, problems
    record = Record(index, rid if rid is not None else str(index), messages, image_paths, video_paths,
                    box_format=box_format, box_image=box_image, **stage_parts)
    return record, problems


def _advice(exc: MediaError, path: str, folder_flag: str) -> str:
    if media.is_url(path) or os.path.exists(path):
        return f"{exc}; replace the file or drop the record"
    return f"{exc}; check the name and {folder_flag} (relative paths are resolved against it)"


def _probe_image(path: str, min_side: int, deep: bool, budget: media.MediaBudget | None):
    """(width, height) of an image, or the message of what is wrong with it."""
    try:
        width, height = media.image_size(path)
        # under a fixed size every image is resized to it: its own size and shape do not matter
        fixed = budget is not None and budget.image_resized_height and budget.image_resized_width
        if not fixed and min(width, height) < min_side:
            return (f"image {path} is {width}x{height} px; the processor needs at least {min_side} px a side: "
                    "upscale it or drop the record")
        if not fixed and max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            return (f"image {path} is {width}x{height} px, an aspect ratio over {MAX_ASPECT_RATIO}: crop or pad "
                    "it, or drop the record")
        if deep:
            media.load_image(path, budget or media.MediaBudget())
    except MediaError as exc:
        return _advice(exc, path, "--image_folder")
    return width, height


def _probe_video(path: str, deep: bool, budget: media.MediaBudget | None):
    """The ``VideoInfo`` of a video, or the message of what is wrong with it."""
    try:
        info = media.video_info(path)
        if max(info.width, info.height) / min(info.width, info.height) > MAX_ASPECT_RATIO:
            return (f"video {path} is {info.width}x{info.height} px, an aspect ratio over {MAX_ASPECT_RATIO}: "
                    "crop it or drop the record")
        if budget is not None:
            try:
                media.video_grid(info, budget)
            except ValueError as exc:
                sampling = f"nframes={budget.nframes}" if budget.nframes else f"fps={budget.fps:g}"
                return (f"video {path} ({info.frames} frames at {info.fps:g} fps) cannot be sampled with "
                        f"{sampling}: {exc}; lower --nframes or drop the record")
        if deep:
            media.load_video(path, budget or media.MediaBudget())
    except MediaError as exc:
        return _advice(exc, path, "--video_folder")
    return info


def probe_media(images: Iterable[str], videos: Iterable[str], min_side: int, deep: bool,
                budget: media.MediaBudget | None, workers: int = 16) -> tuple[dict, dict]:
    """Header checks (existence, size, frame count) of each listed file; ``deep`` decodes too. Returns
    ({image: (width, height) or error message}, {video: VideoInfo or error message})."""
    images, videos = list(images), list(videos)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        image_results = dict(zip(images, pool.map(lambda p: _probe_image(p, min_side, deep, budget), images)))
        video_results = dict(zip(videos, pool.map(lambda p: _probe_video(p, deep, budget), videos)))
    return image_results, video_results


def check_media_files(records: list[Record], min_side: int, deep: bool, budget: media.MediaBudget | None,
                      workers: int = 16) -> list[Problem]:
    """Header checks (existence, size, frame count) of every distinct file once, then per record; ``deep``
    decodes too. Fills the records' ``image_sizes`` and ``video_infos``."""
    image_results, video_results = probe_media(
        dict.fromkeys(p for r in records for p in r.images), dict.fromkeys(p for r in records for p in r.videos),
        min_side, deep, budget, workers)
    problems = []
    for record in records:
        record.image_sizes = [image_results[p] for p in record.images]
        record.video_infos = [video_results[p] for p in record.videos]
        for result in (*record.image_sizes, *record.video_infos):
            if isinstance(result, str):
                problems.append(Problem("error", result, record.index, record.id))
    return problems


def _shown(count: int, first: list[int]) -> str:
    return ", ".join(map(str, first)) + (f" and {count - len(first):,} more" if count > len(first) else "")


class CollectionCheck:
    """Duplicate ids and unknown keys over a whole file, one warning each (not one per record: a dataset
    repeats them). Fed record by record, in file order; holds one entry per distinct id."""

    SHOWN = 10

    def __init__(self, stage: str = "sft"):
        self.known = known_keys(stage)
        self.stage = stage
        self.first: dict[str, int] = {}
        self.dups: dict[str, list] = {}  # id -> [count, first indices]
        self.unknown: dict[str, list] = {}  # key -> [count, first indices, id of the first record]

    def add(self, index: int, rid: str | None, keys: list[str]) -> None:
        if rid is not None:
            first = self.first.setdefault(rid, index)
            if first != index:
                entry = self.dups.setdefault(rid, [1, [first]])
                entry[0] += 1
                if len(entry[1]) < self.SHOWN:
                    entry[1].append(index)
        for key in keys:
            entry = self.unknown.setdefault(key, [0, [], rid])
            entry[0] += 1
            if len(entry[1]) < self.SHOWN:
                entry[1].append(index)

    def warnings(self) -> list[Problem]:
        problems = []
        for rid, (count, first) in self.dups.items():
            problems.append(Problem("warning", f"duplicate id: records {_shown(count, first)} all use it; give each "
                                               "record its own id, so that reports name one record", first[1], rid))
        for key, (count, first, rid) in sorted(self.unknown.items()):
            hint = f"; did you mean {key[:-1]!r}?" if key in ("images", "videos") else _stage_hint(key, self.stage)
            problems.append(Problem("warning", f"unknown key {key!r} ignored (in {count:,} record(s): "
                                               f"{_shown(count, first)}); known keys: {sorted(self.known)}{hint}",
                                    first[0], rid))
        return problems


Parsed = tuple[int, "Record | None", list[Problem], "str | None", "list[str] | None"]
"""(index, the record or None, its problems, its raw id or None, its unknown keys or None if not an object)."""


def parse_item(item: RawItem, resolvers: tuple[_Resolver, _Resolver], stage: str = "sft") -> Parsed:
    """One raw record -> validated ``Record`` (or None) and its problems, with what the file-wide check needs."""
    index, lineno, text = item
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        return index, None, [Problem("error", f"line {lineno}, column {exc.colno}: invalid JSON: {exc.msg}; "
                                              "fix or remove the line", index)], None, None
    except UnicodeDecodeError as exc:
        return index, None, [Problem("error", f"line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                              "fix or remove the line", index)], None, None
    record, problems = _parse_record(index, raw, resolvers, stage)
    if not isinstance(raw, dict):
        return index, record, problems, None, None
    rid = str(raw["id"]) if raw.get("id") is not None else None
    known = known_keys(stage)
    return index, record, problems, rid, sorted(raw.keys() - known) if known is not None else []


def media_folders(path: str | Path, image_folder: str | Path | None, video_folder: str | Path | None
                  ) -> tuple[Path, Path]:
    """The folders relative image and video names are resolved against (default: the data file's)."""
    images = Path(image_folder) if image_folder else Path(path).parent
    return images, Path(video_folder) if video_folder else images


def resolvers_for(path: str | Path, image_folder: str | Path | None, video_folder: str | Path | None,
                  allow_urls: bool) -> tuple[_Resolver, _Resolver]:
    images, videos = media_folders(path, image_folder, video_folder)
    return _Resolver(images, allow_urls, "image"), _Resolver(videos, allow_urls, "video")


NO_RECORDS = "the data file holds no records; add a JSON array of records"


def read_records(
    path: str | Path,
    image_folder: str | Path | None = None,
    video_folder: str | Path | None = None,
    *,
    allow_urls: bool = False,
    check_media: bool = True,
    deep: bool = False,
    min_image_side: int = 28,
    budget: media.MediaBudget | None = None,
    workers: int = 16,
    stage: str = "sft",
    box_target: str | None = None,
    box_format: str | None = None,
) -> tuple[list[Record], list[Problem]]:
    """Parse and validate a data file: (valid records, every problem found, sorted by record).

    ``stage``: "sft" (conversations end with the reply), "dpo" (preference records) or "grpo" (prompt records).

    Records with errors are left out; the others are returned, so a caller may report and go on.
    With ``check_media`` each distinct media file is checked once from its header (existence, size, aspect
    ratio, frame count, and frame sampling under ``budget``); ``deep`` decodes every file, in parallel.
    With ``box_target`` (the family's box convention) the boxes of records that declare a convention (their
    ``box_format``, else ``box_format``) are checked and rewritten in the target convention for the image as the
    model sees it (``convert_boxes``).
    """
    path = Path(path)
    resolvers = resolvers_for(path, image_folder, video_folder, allow_urls)
    records: list[Record] = []
    problems: list[Problem] = []
    collection = CollectionCheck(stage)
    count = 0
    try:
        for item in scan(path):
            index, record, found, rid, keys = parse_item(item, resolvers, stage)
            count += 1
            problems += found
            if keys is not None:
                collection.add(index, rid, keys)
            if record is not None:
                records.append(record)
    except FileError as exc:
        return [], [exc.problem]
    if not count:
        return [], [Problem("error", NO_RECORDS)]
    problems += collection.warnings()

    if check_media and records:
        problems += check_media_files(records, min_image_side, deep, budget, workers)
        if box_target is not None:
            problems += convert_boxes(records, box_target, budget or media.MediaBudget(min_image_side), box_format)
    problems.sort(key=lambda p: -1 if p.index is None else p.index)
    bad = {p.index for p in problems if p.level == "error"}
    return [r for r in records if r.index not in bad], problems


def convert_boxes(records: list[Record], target: str, budget: media.MediaBudget,
                  default_format: str | None = None) -> list[Problem]:
    """Rewrite the boxes of every record that declares a convention into ``target`` on its images as the model
    sees them (EXIF applied, resized under ``budget``); fills ``Record.boxes``. A bad box is an error naming the
    record; boxes in records that declare no convention are left as written (one warning says how many)."""
    problems: list[Problem] = []
    undeclared: list[Record] = []
    for record in records:
        if any(isinstance(size, str) for size in record.image_sizes):
            continue  # its media failed their checks; that error is reported already
        fmt = record.box_format or default_format
        texts = [m.text for m in record.messages]
        if fmt is None:
            if any(boxes.has_box_markers(t) for t in texts):
                undeclared.append(record)
            continue
        geometries = []
        for width, height in record.image_sizes:
            rh, rw = media.resized_image_size(width, height, budget)
            geometries.append(boxes.Geometry(width, height, rw, rh))
        new_texts, found, bad = boxes.convert_texts(texts, fmt, target, geometries, record.box_image)
        problems += [Problem("error", f"{message} (--box_format {fmt})", record.index, record.id) for message in bad]
        if not bad:
            for message, text in zip(record.messages, new_texts):
                message.text = text
            record.box_format = target  # what the text now holds
            record.boxes = found
    if undeclared:
        first = undeclared[0]
        problems.append(Problem("warning", f"{len(undeclared):,} record(s) hold boxes but declare no box format: "
                                           f"they are used as written, which must be the model's own convention "
                                           f"({target}); pass --box_format (or \"box_format\" in the record) to "
                                           "have them checked and converted", first.index, first.id))
    return problems


def load_records(path: str | Path, *args, **kwargs) -> list[Record]:
    """``read_records`` that raises ``DataError`` listing every error, and logs warnings."""
    records, problems = read_records(path, *args, **kwargs)
    for p in problems:
        if p.level == "warning":
            logger.warning(p.format(path))
    if any(p.level == "error" for p in problems):
        raise DataError(path, problems)
    return records


# ---------------------------------------------------------------- preference (DPO) and prompt (GRPO) records

STAGE_KEYS = {"sft": frozenset(), "dpo": frozenset({"chosen", "rejected"})}
DOCUMENT_KEYS = frozenset({"id", "image", "video", "text"})
"""The keys of a CPT record."""
"""Keys each stage reads beside ``KNOWN_KEYS``; GRPO reads every other key (as reward fields)."""
_REPLY_KEYS = ("chosen", "rejected")


def known_keys(stage: str) -> set[str] | None:
    """The keys a record of ``stage`` may have, or None when any key is accepted (GRPO: reward fields)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "cpt":
        return set(DOCUMENT_KEYS)
    return None if stage == "grpo" else KNOWN_KEYS | STAGE_KEYS[stage]


def _stage_hint(key: str, stage: str) -> str:
    if stage == "sft" and key in _REPLY_KEYS:
        return "; preference data (chosen / rejected) trains with `vlmtune dpo`"
    if stage == "sft" and key == "text":
        return "; documents ('text', no chat) train with `vlmtune train --stage cpt`"
    return ""


def _document_text(raw: dict, images: list | None, videos: list | None, err) -> str | None:
    """A CPT record's text with one placeholder per medium: as written where it places its media with <image> /
    <video> tags, else with every image, then every video, before the text (an image and its caption)."""
    text = raw.get("text")
    if text is None:
        hint = (" (this is chat data: train it with `vlmtune train`, --stage sft)" if "conversations" in raw
                else "")
        err(f"'text' is missing; a CPT record holds its document in 'text', with <image> / <video> where the media "
            f"go{hint}")
        return None
    if not isinstance(text, str):
        err(f"'text' must be a string (the document), got {type(text).__name__}")
        return None
    if not text.strip():
        err("'text' is empty; write the document or drop the record")
        return None
    reserved = [tok for tok in SPECIAL_TOKENS if tok in text] if "<|" in text else None
    if reserved:
        err(f"'text' contains the reserved token(s) {reserved}; remove them (write <image> / <video> where the "
            "media go)")
        return None
    counts = {kind: text.count(tag) for kind, tag in (("image", IMAGE_PLACEHOLDER), ("video", VIDEO_PLACEHOLDER))}
    if images is None or videos is None:
        return None
    if not any(counts.values()):
        return IMAGE_PLACEHOLDER * len(images) + VIDEO_PLACEHOLDER * len(videos) + text
    for kind, files in (("image", images), ("video", videos)):
        if counts[kind] != len(files):
            err(f"{counts[kind]} <{kind}> tag(s) in 'text' but {len(files)} {kind}(s); put one <{kind}> where each "
                f"{kind} goes (or none at all: the media then come before the text)")
            return None
    return text


def _reply_text(key: str, value, err) -> str | None:
    """A preference reply: a string, or a turn object ``{"from": "gpt", "value": ...}``; None (and an error)."""
    if isinstance(value, dict):
        role_name = value.get("from", value.get("role"))
        if role_name is not None and ROLES.get(role_name) != "assistant":
            err(f"'{key}' is a turn from {role_name!r}; a reply comes from 'gpt' (or give the text as a string)")
            return None
        value = value.get("value", value.get("content"))
        if not isinstance(value, str):
            err(f"'{key}' turn: 'value' must be a string, got {type(value).__name__}")
            return None
    if not isinstance(value, str):
        err(f"'{key}' must be the reply as a string (or a {{\"from\": \"gpt\", \"value\": ...}} turn), "
            f"got {type(value).__name__}")
        return None
    if not value.strip():
        err(f"'{key}' is an empty reply; write the reply or drop the record")
        return None
    reserved = [tok for tok in SPECIAL_TOKENS if tok in value] if "<|" in value else None
    if reserved:
        err(f"'{key}' contains the reserved token(s) {reserved}; remove them")
        return None
    if IMAGE_PLACEHOLDER in value or VIDEO_PLACEHOLDER in value:
        err(f"'{key}' contains an <image> / <video> placeholder; media belong in the human turns")
        return None
    return value


def _stage_parts(raw: dict, stage: str, messages: list[Message], names: list, err) -> dict:
    """The ``Record`` fields a stage adds: ``chosen`` and ``rejected`` (DPO), ``fields`` (GRPO).

    A GRPO record whose conversation ends with a gpt turn (as in Qwen2-VL-Finetune's GRPO data) has that turn
    taken out of the prompt as its ``answer`` field.
    """
    if stage == "dpo":
        parts = {}
        for key in _REPLY_KEYS:
            if key not in raw:
                err(f"'{key}' is missing; a preference record gives the better reply in 'chosen' and the worse "
                    "in 'rejected'")
            else:
                parts[key] = _reply_text(key, raw[key], err)
        if len(parts) == 2 and None not in parts.values() and parts["chosen"].strip() == parts["rejected"].strip():
            err("'chosen' and 'rejected' are the same reply; a preference pair needs two different replies")
        return parts
    if stage != "grpo":
        return {}
    fields = {k: v for k, v in raw.items() if k not in KNOWN_KEYS}
    if len(messages) >= 2 and messages[-1].role == "assistant":
        if "answer" in fields:
            err("the conversation ends with a gpt turn and the record has an 'answer': a GRPO record's "
                "conversation ends with the prompt; keep the gold answer in 'answer' only")
        names.pop()
        fields.setdefault("answer", messages.pop().text)
    answer = fields.get("answer")
    if "answer" in fields and (isinstance(answer, bool) or not isinstance(answer, str | int | float)):
        err(f"'answer' must be a string or a number, got {json.dumps(fields['answer'])[:60]}")
    box = fields.get("box")
    if box is not None and not (isinstance(box, list) and len(box) == 4
                                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)):
        err(f"'box' must be [x1, y1, x2, y2] (four numbers), got {json.dumps(box)[:60]}")
    return {"fields": fields}


def _check_prompt_turns(messages: list[Message], names: list, stage: str, err) -> None:
    """A DPO / GRPO conversation: an optional system turn, then human and gpt alternating, ending with the human
    prompt that the replies answer."""
    roles = [m.role for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body:
        err(f"empty prompt: no human turn in {names}; add the question the replies answer")
    elif body != expected[: len(body)]:
        err(f"roles out of order: {names}; after an optional system turn, human and gpt alternate, "
            "starting with human and ending with human (the prompt)")
    elif body[-1] != "user":
        where = ("the replies go in 'chosen' and 'rejected'" if stage == "dpo"
                 else "the gold answer goes in 'answer'")
        err(f"the conversation ends with a gpt turn; a {stage.upper()} record's conversation ends with the "
            f"prompt (a human turn), and {where}")
    elif not messages[-1].text.strip():
        err("empty prompt: the last human turn has no text or media; write the question")
