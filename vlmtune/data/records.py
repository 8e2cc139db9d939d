"""Raw records of any format -> validated ``Record``s. Every format error of a data file is found here.

Validation runs over the whole file before a model is loaded and reports every problem at once, each
naming the file, the record (index and id) and what to do. Media are checked from their headers (fast on
100k records, ``vlmtune.data.probe``); ``deep=True`` decodes every file, in parallel. How a file is read into
raw records is the formats' job (``vlmtune.data.formats``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

from vlmtune.data import boxes, formats, frames, media
from vlmtune.data.formats import scan
from vlmtune.data.probe import check_media_files, probe_media  # noqa: F401  (re-exported)
from vlmtune.data.schema import (  # noqa: F401  (re-exported: the names every reader of records uses)
    DOCUMENT_ROLE,
    IMAGE_PLACEHOLDER,
    KNOWN_KEYS,
    ROLES,
    STAGES,
    VIDEO_PLACEHOLDER,
    Message,
    RawItem,
    Record,
    known_keys,
)
from vlmtune.data.stage_records import check_prompt_turns, document_text, stage_hint, stage_parts
from vlmtune.errors import DataError, FileError, MediaError, Problem
from vlmtune.families.base import SPECIAL_TOKENS

logger = logging.getLogger(__name__)

URL_PREFIXES = media.URL_PREFIXES


def _as_list(value, key: str, err) -> list[str] | None:
    """The file names of an ``image`` / ``video`` field, or None (and an error) when its type is wrong."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        err(f"'{key}' must be a file name or a list of file names, got {json.dumps(value)[:80]}")
        return None
    return values


def _video_list(value, err) -> list | None:
    """The entries of a ``video`` field (file names, frame lists: ``vlmtune.data.frames``), or None (and an error)."""
    if value is None:
        return []
    values = [value] if isinstance(value, str | dict) else value
    if not isinstance(values, list):
        err(f"'video' must be a file name or a list of videos, got {json.dumps(value, default=str)[:80]}")
        return None
    for i, v in enumerate(values):
        problem = frames.check_entry(v)
        if problem:
            err(f"'video' entry {i}: {problem}")
            return None
    return values


class _Resolver:
    """Media names -> paths (relative to a folder, or absolute), memoised: datasets repeat file names. A video's
    list of frames -> one name (``frames.frames_name``) of its frames resolved as images."""

    def __init__(self, folder: Path, allow_urls: bool, kind: str):
        self.folder = str(folder)
        self.allow_urls = allow_urls
        self.kind = kind
        self.cache: dict[str, str] = {}

    def __call__(self, name, err) -> str | None:
        if not isinstance(name, str):  # a video's frames (checked by _video_list): each one an image
            listed, fps = frames.entry(name)
            paths = [self._one(frame, err, "frame") for frame in listed]
            return None if None in paths else frames.frames_name(paths, fps)
        return self._one(name, err, self.kind)

    def _one(self, name: str, err, kind: str) -> str | None:
        if media.is_inline(name):  # bytes in the record or a table's cell: decoded from memory when read
            if kind == "video":
                given = "bytes in a table" if media.is_table_ref(name) else "a data: URI"
                err(f"a video given as {given} is not read (only images and frames are); write it to a file")
                return None
            if not media.is_table_ref(name):  # a table's bytes are checked with the other media headers
                try:
                    media.inline_bytes(name)
                except MediaError as exc:
                    err(f"{exc}; give the image as base64 (data:image/png;base64,...) or as a file")
                    return None
            return name
        if name.startswith(URL_PREFIXES):
            if not self.allow_urls:
                err(f"{kind} {name!r} is a URL; download it, or pass --allow_urls to fetch it")
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
    videos = _video_list(raw.get("video"), err)
    if stage == "cpt":  # a document: its text and media, no conversation
        text = document_text(raw, images, videos, err)
        paths = [[resolver(f, err) for f in files or []] for resolver, files in zip(resolvers, (images, videos))]
        if problems:
            return None, problems
        return Record(index, rid if rid is not None else str(index), [Message(DOCUMENT_ROLE, text)], *paths), problems

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

    extra = stage_parts(raw, stage, messages, names, err) if len(messages) == len(turns) else {}
    if len(messages) == len(turns) and stage != "sft":
        check_prompt_turns(messages, names, stage, err)
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
                    box_format=box_format, box_image=box_image, **extra)
    return record, problems


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
            hint = f"; did you mean {key[:-1]!r}?" if key in ("images", "videos") else stage_hint(key, self.stage)
            problems.append(Problem("warning", f"unknown key {key!r} ignored (in {count:,} record(s): "
                                               f"{_shown(count, first)}); known keys: {sorted(self.known)}{hint}",
                                    first[0], rid))
        return problems


Parsed = tuple[int, "Record | None", list[Problem], "str | None", "list[str] | None"]
"""(index, the record or None, its problems, its raw id or None, its unknown keys or None if not an object)."""


def parse_item(item: RawItem, resolvers: tuple[_Resolver, _Resolver], stage: str = "sft",
               data_format: str = "llava") -> Parsed:
    """One raw record of a ``data_format`` file -> validated ``Record`` (or None) and its problems, with what the
    file-wide check needs."""
    index, lineno, text = item
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        return index, None, [Problem("error", f"line {lineno}, column {exc.colno}: invalid JSON: {exc.msg}; "
                                              "fix or remove the line", index)], None, None
    except UnicodeDecodeError as exc:
        return index, None, [Problem("error", f"line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                              "fix or remove the line", index)], None, None
    rid = str(raw["id"]) if isinstance(raw, dict) and raw.get("id") is not None else None
    problems: list[Problem] = []
    raw = formats.to_llava(raw, data_format, lambda message: problems.append(Problem("error", message, index, rid)))
    if raw is None:
        return index, None, problems, rid, []
    record, problems = _parse_record(index, raw, resolvers, stage)
    if not isinstance(raw, dict):
        return index, record, problems, None, None
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
    data_format: str | None = None,
) -> tuple[list[Record], list[Problem]]:
    """Parse and validate a data file: (valid records, every problem found, sorted by record).

    ``stage``: "sft" (conversations end with the reply), "dpo" (preference records) or "grpo" (prompt records).

    Records with errors are left out; the others are returned, so a caller may report and go on.
    With ``check_media`` each distinct media file is checked once from its header (existence, size, aspect
    ratio, frame count, and frame sampling under ``budget``); ``deep`` decodes every file, in parallel.
    With ``box_target`` (the family's box convention) the boxes of records that declare a convention (their
    ``box_format``, else ``box_format``) are checked and rewritten in the target convention for the image as the
    model sees it (``convert_boxes``). ``data_format`` forces one of ``formats.FORMATS`` (default: detected).
    """
    path = Path(path)
    data_format = formats.file_format(path, data_format)
    resolvers = resolvers_for(path, image_folder, video_folder, allow_urls)
    records: list[Record] = []
    problems: list[Problem] = []
    collection = CollectionCheck(stage)
    count = 0
    try:
        for item in scan(path):
            index, record, found, rid, keys = parse_item(item, resolvers, stage, data_format)
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
