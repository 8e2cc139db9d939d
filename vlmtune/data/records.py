"""LLaVA-style JSON / JSONL -> validated ``Record``s. Every format error of a data file is found here.

Validation runs over the whole file before a model is loaded and reports every problem at once, each
naming the file, the record (index and id) and what to do. Media are checked from their headers (fast on
100k records); ``deep=True`` decodes every file, in parallel.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.data import media
from vlmtune.families.base import SPECIAL_TOKENS

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
KNOWN_KEYS = {"id", "image", "video", "conversations"}
MAX_ASPECT_RATIO = 200  # the processors' limit
URL_PREFIXES = ("http://", "https://")


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


def _parse_file(path: Path) -> tuple[list, list[Problem]]:
    """Raw JSON values of the file (array or JSON lines), or the problems that stop parsing."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], [Problem("error", "data file not found")]
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Problem("error", f"cannot read the data file: {exc}")]
    if path.suffix == ".jsonl" or (text.lstrip()[:1] == "{" and "\n{" in text.strip()):
        raw, problems = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as exc:
                problems.append(Problem("error", f"line {lineno}, column {exc.colno}: invalid JSON: {exc.msg}"))
        return raw, problems
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], [Problem("error", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return [], [Problem("error", f"expected a JSON array of records, got {type(data).__name__}")]
    return data, []


def _as_list(value, key: str, err) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        err(f"'{key}' must be a file name or a list of file names, got {json.dumps(value)[:80]}")
        return []
    return values


def _resolve(name: str, folder: Path | None, allow_urls: bool, kind: str, err) -> str | None:
    if name.startswith(URL_PREFIXES):
        if not allow_urls:
            err(f"{kind} {name!r} is a URL; download it, or pass --allow_urls to fetch it during training")
            return None
        return name
    path = Path(name)
    if not path.is_absolute():
        path = (folder or Path(".")) / path
    return str(path)


def _parse_record(index: int, raw, folders: tuple[Path | None, Path | None], allow_urls: bool):
    """One raw value -> (Record or None, problems)."""
    problems: list[Problem] = []
    if not isinstance(raw, dict):
        return None, [Problem("error", f"a record must be a JSON object, got {type(raw).__name__}", index)]
    rid = str(raw["id"]) if raw.get("id") is not None else None

    def err(msg: str) -> None:
        problems.append(Problem("error", msg, index, rid))

    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        message = f"unknown key(s) {unknown} ignored (known: {sorted(KNOWN_KEYS)})"
        problems.append(Problem("warning", message, index, rid))
    images = _as_list(raw.get("image"), "image", err)
    videos = _as_list(raw.get("video"), "video", err)

    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        err("'conversations' is missing or empty; add a list of {\"from\": ..., \"value\": ...} turns")
        return None, problems

    messages: list[Message] = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            err(f"turn {t} must be an object with 'from' and 'value', got {type(turn).__name__}")
            continue
        role_name = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = ROLES.get(role_name) if isinstance(role_name, str) else None
        if role is None:
            err(f"turn {t}: unknown role {role_name!r} (use 'system', 'human' or 'gpt')")
            continue
        if not isinstance(value, str):
            err(f"turn {t} ({role_name}): 'value' must be a string, got {type(value).__name__}")
            continue
        reserved = [tok for tok in SPECIAL_TOKENS if tok in value]
        if reserved:
            err(f"turn {t} ({role_name}): text contains the reserved token(s) {reserved}; use <image> / <video>")
        if role == "assistant" and not value.strip():
            err(f"turn {t} (gpt): empty assistant reply")
        if role != "user" and (IMAGE_PLACEHOLDER in value or VIDEO_PLACEHOLDER in value):
            err(f"turn {t} ({role_name}): <image>/<video> placeholders belong in the user's turns")
        messages.append(Message(role, value))

    if len(messages) == len(turns):
        roles = [m.role for m in messages]
        body = roles[1:] if roles[0] == "system" else roles
        expected = ["user", "assistant"] * (len(body) // 2 + 1)
        if not body or body != expected[: len(body)] or body[-1] != "assistant":
            err(f"roles out of order: {roles}; after an optional system turn, human and gpt alternate, "
                "starting with human and ending with gpt")

    for kind, placeholder, files in (("image", IMAGE_PLACEHOLDER, images), ("video", VIDEO_PLACEHOLDER, videos)):
        n = sum(m.text.count(placeholder) for m in messages)
        if n != len(files):
            err(f"{n} {placeholder} placeholder(s) but {len(files)} {kind}(s); "
                f"put one {placeholder} in the text where each {kind} goes")

    image_paths = [_resolve(f, folders[0], allow_urls, "image", err) for f in images]
    video_paths = [_resolve(f, folders[1], allow_urls, "video", err) for f in videos]
    if any(p.level == "error" for p in problems):
        return None, problems
    record = Record(index, rid if rid is not None else str(index), messages, image_paths, video_paths)
    return record, problems


def _check_media(record: Record, min_side: int, deep: bool, budget: media.MediaBudget | None) -> list[Problem]:
    """Header checks (existence, size, frame count); ``deep`` decodes too. Fills the record's sizes."""
    problems = []

    def err(msg: str) -> None:
        problems.append(Problem("error", msg, record.index, record.id))

    for path in record.images:
        if path.startswith(URL_PREFIXES):
            continue
        try:
            width, height = media.image_size(path)
        except media.MediaError as exc:
            err(str(exc))
            continue
        record.image_sizes.append((width, height))
        if min(width, height) < min_side:
            err(f"image {path} is {width}x{height} px; the processor needs at least {min_side} px a side: "
                "upscale it or drop the record")
        elif max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            err(f"image {path} is {width}x{height} px, an aspect ratio over {MAX_ASPECT_RATIO}; crop it")
        elif deep:
            try:
                media.load_image(path, budget or media.MediaBudget())
            except media.MediaError as exc:
                err(str(exc))
    for path in record.videos:
        if path.startswith(URL_PREFIXES):
            continue
        try:
            info = media.video_info(path)
            record.video_infos.append(info)
            if deep:
                media.load_video(path, budget or media.MediaBudget())
        except media.MediaError as exc:
            err(str(exc))
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
) -> tuple[list[Record], list[Problem]]:
    """Parse and validate a data file: (valid records, every problem found)."""
    path = Path(path)
    raw, problems = _parse_file(path)
    if problems:
        return [], problems
    if not raw:
        return [], [Problem("error", "the data file holds no records")]
    image_folder = Path(image_folder) if image_folder else path.parent
    folders = (image_folder, Path(video_folder) if video_folder else image_folder)

    records: list[Record] = []
    for index, item in enumerate(raw):
        record, found = _parse_record(index, item, folders, allow_urls)
        problems += found
        if record is not None:
            records.append(record)

    for rid, count in Counter(r.id for r in records if raw[r.index].get("id") is not None).items():
        if count > 1:
            indices = [r.index for r in records if r.id == rid]
            problems.append(Problem("warning", f"id {rid!r} is used by {count} records: {indices}"))

    if check_media:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for found in pool.map(lambda r: _check_media(r, min_image_side, deep, budget), records):
                problems += found
    bad = {p.index for p in problems if p.level == "error"}
    return [r for r in records if r.index not in bad], problems


def load_records(path: str | Path, *args, **kwargs) -> list[Record]:
    """``read_records`` that raises ``DataError`` listing every error, and logs warnings."""
    records, problems = read_records(path, *args, **kwargs)
    for p in problems:
        if p.level == "warning":
            logger.warning(p.format(path))
    if any(p.level == "error" for p in problems):
        raise DataError(path, problems)
    return records
