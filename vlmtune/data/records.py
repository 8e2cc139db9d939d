"""LLaVA-style JSON / JSONL -> validated ``Record``s. Every format error of a data file is found here.

Validation runs over the whole file before a model is loaded and reports every problem at once, each
naming the file, the record (index and id) and what to do. Media are checked from their headers (fast on
100k records); ``deep=True`` decodes every file, in parallel.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.data import boxes, media
from vlmtune.families.base import SPECIAL_TOKENS

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
KNOWN_KEYS = {"id", "image", "video", "conversations", "box_format", "box_image"}
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


@dataclass(frozen=True)
class Problem:
    level: str  # "error" | "warning"
    message: str
    index: int | None = None
    id: str | None = None

    def format(self, file: str | Path) -> str:
        where = f"{file}"
        if self.index is not None:
            where += f": record {self.index}"
            if self.id is not None:
                where += f" (id {self.id!r})"
        return f"{where}: {self.message}"


class DataError(ValueError):
    """A data file with errors; ``str()`` lists every one of them."""

    def __init__(self, file: str | Path, problems: list[Problem]):
        self.file = str(file)
        self.problems = problems
        errors = [p for p in problems if p.level == "error"]
        lines = [p.format(file) for p in errors]
        super().__init__(f"{len(errors)} error(s) in {file}:\n  " + "\n  ".join(lines))


class _InvalidLine:
    """Stands in the raw list for a JSON line that did not parse, so later records keep their index."""


def _parse_file(path: Path) -> tuple[list, list[Problem]]:
    """Raw JSON values of the file (array or JSON lines), and the problems found while parsing."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return [], [Problem("error", "data file not found; check the path")]
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Problem("error", f"cannot read the data file: {exc}")]
    if path.suffix.lower() not in JSONL_SUFFIXES or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            # Several JSON objects one per line in a .json file: JSON lines under another name.
            if not (exc.msg == "Extra data" and text.lstrip().startswith("{")):
                return [], [Problem("error", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                                             "fix the file (a JSON array of records, or one record per line)")]
        else:
            if isinstance(data, dict) and "conversations" in data:
                return [data], []  # a single record (one-line JSON lines file)
            if not isinstance(data, list):
                got = f"an object with keys {sorted(data)[:5]}" if isinstance(data, dict) else type(data).__name__
                return [], [Problem("error", f"the top level must be a JSON array of records ([{{...}}, ...]) or "
                                             f"one record per line (JSON lines), got {got}")]
            return data, []
    raw: list = []
    problems: list[Problem] = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            raw.append(json.loads(line))
        except json.JSONDecodeError as exc:
            problems.append(Problem("error", f"line {lineno}, column {exc.colno}: invalid JSON: {exc.msg}; "
                                             "fix or remove the line", len(raw)))
            raw.append(_InvalidLine())
    return raw, problems


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


def _parse_record(index: int, raw, resolvers: tuple[_Resolver, _Resolver]):
    """One raw value -> (Record or None, problems)."""
    problems: list[Problem] = []
    if not isinstance(raw, dict):
        return None, [Problem("error", f"a record must be a JSON object, got {type(raw).__name__}: "
                                       f"{json.dumps(raw)[:60]}", index)]
    rid = str(raw["id"]) if raw.get("id") is not None else None

    def err(msg: str) -> None:
        problems.append(Problem("error", msg, index, rid))

    images = _as_list(raw.get("image"), "image", err)
    videos = _as_list(raw.get("video"), "video", err)

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

    if len(messages) == len(turns):
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
                    box_format=box_format, box_image=box_image)
    return record, problems


def _advice(exc: media.MediaError, path: str, folder_flag: str) -> str:
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
    except media.MediaError as exc:
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
    except media.MediaError as exc:
        return _advice(exc, path, "--video_folder")
    return info


def check_media_files(records: list[Record], min_side: int, deep: bool, budget: media.MediaBudget | None,
                      workers: int = 16) -> list[Problem]:
    """Header checks (existence, size, frame count) of every distinct file once, then per record; ``deep``
    decodes too. Fills the records' ``image_sizes`` and ``video_infos``."""
    images = list(dict.fromkeys(p for r in records for p in r.images))
    videos = list(dict.fromkeys(p for r in records for p in r.videos))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        image_results = dict(zip(images, pool.map(lambda p: _probe_image(p, min_side, deep, budget), images)))
        video_results = dict(zip(videos, pool.map(lambda p: _probe_video(p, deep, budget), videos)))
    problems = []
    for record in records:
        record.image_sizes = [image_results[p] for p in record.images]
        record.video_infos = [video_results[p] for p in record.videos]
        for result in (*record.image_sizes, *record.video_infos):
            if isinstance(result, str):
                problems.append(Problem("error", result, record.index, record.id))
    return problems


def _collection_warnings(raw: list) -> list[Problem]:
    """Duplicate ids and unknown keys, one warning each (not one per record: a dataset repeats them)."""
    ids: dict[str, list[int]] = {}
    unknown: dict[str, list[int]] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            continue
        if item.get("id") is not None:
            ids.setdefault(str(item["id"]), []).append(index)
        for key in item.keys() - KNOWN_KEYS:
            unknown.setdefault(key, []).append(index)

    def shown(indices: list[int]) -> str:
        return ", ".join(map(str, indices[:10])) + (f" and {len(indices) - 10:,} more" if len(indices) > 10 else "")

    problems = []
    for rid, indices in ids.items():
        if len(indices) > 1:
            problems.append(Problem("warning", f"duplicate id: records {shown(indices)} all use it; give each "
                                               "record its own id, so that reports name one record",
                                    indices[1], rid))
    for key, indices in sorted(unknown.items()):
        first = raw[indices[0]].get("id")
        hint = f"; did you mean {key[:-1]!r}?" if key in ("images", "videos") else ""
        problems.append(Problem("warning", f"unknown key {key!r} ignored (in {len(indices):,} record(s): "
                                           f"{shown(indices)}); known keys: {sorted(KNOWN_KEYS)}{hint}",
                                indices[0], None if first is None else str(first)))
    return problems


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
    box_target: str | None = None,
    box_format: str | None = None,
) -> tuple[list[Record], list[Problem]]:
    """Parse and validate a data file: (valid records, every problem found, sorted by record).

    Records with errors are left out; the others are returned, so a caller may report and go on.
    With ``check_media`` each distinct media file is checked once from its header (existence, size, aspect
    ratio, frame count, and frame sampling under ``budget``); ``deep`` decodes every file, in parallel.
    With ``box_target`` (the family's box convention) the boxes of records that declare a convention (their
    ``box_format``, else ``box_format``) are checked and rewritten in the target convention for the image as the
    model sees it (``convert_boxes``).
    """
    path = Path(path)
    raw, problems = _parse_file(path)
    if not raw:
        return [], problems or [Problem("error", "the data file holds no records; add a JSON array of records")]
    image_folder = Path(image_folder) if image_folder else path.parent
    video_folder = Path(video_folder) if video_folder else image_folder
    resolvers = (_Resolver(image_folder, allow_urls, "image"), _Resolver(video_folder, allow_urls, "video"))

    records: list[Record] = []
    for index, item in enumerate(raw):
        if isinstance(item, _InvalidLine):
            continue
        record, found = _parse_record(index, item, resolvers)
        problems += found
        if record is not None:
            records.append(record)
    problems += _collection_warnings(raw)

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
