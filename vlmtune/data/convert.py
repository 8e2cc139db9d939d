"""``vlmtune convert``: any data file vlmtune reads -> LLaVA JSON plus an image folder, or Parquet with the images
embedded (the ``datasets`` ``Image`` layout), and back.

Every record is read and checked first (``read_records``); a file with errors is not converted (they are listed),
so no record is lost on the way. Images keep their bytes: a file's bytes are copied (LLaVA) or embedded (Parquet),
never re-encoded; so do the frames of a video given as a list of frames (``vlmtune.data.frames``). Video files stay
files (Parquet holds their paths, relative to the output where possible).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from vlmtune.data import frames, inline, media
from vlmtune.data.formats import FORMATS
from vlmtune.data.records import Record, load_records
from vlmtune.data.schema import STAGES
from vlmtune.errors import FileError

TARGETS = ("llava", "parquet")
ROW_GROUP_ROWS = 100
"""Rows per row group of a Parquet file written here: training reads an image by decoding its row group's image
column (``vlmtune.data.cells``), so a group holds a few images, not the file's (pyarrow's default is 1Mi rows)."""
_FROM = {"user": "human", "assistant": "gpt", "system": "system"}
_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif", "image/webp": ".webp", "image/bmp": ".bmp"}


def image_bytes(path: str) -> bytes:
    """The bytes of a record's image: decoded from a data: URI, read from a table's cell or from its file (a URL
    fetched once)."""
    return media.inline_bytes(path) if media.is_inline(path) else Path(media.local_path(path)).read_bytes()


def _name(path: str, data: bytes) -> str:
    """A file name for an image: its own name, or for bytes given inline their hash and type."""
    if media.is_inline(path):
        return hashlib.sha256(data).hexdigest()[:16] + _SUFFIX.get(inline.media_type(path, data), ".img")
    return Path(path.split("?", 1)[0]).name


def _relative(path: str, folder: Path) -> str:
    if media.is_url(path):
        return path
    try:
        return os.path.relpath(path, folder)
    except ValueError:  # another drive
        return os.path.abspath(path)


def llava_record(record: Record, images: list, videos: list) -> dict:
    """A record as LLaVA JSON (``images`` / ``videos``: what to write for its media)."""
    out: dict = {"id": record.id}
    if images:
        out["image"] = images[0] if len(images) == 1 else images
    if videos:
        out["video"] = videos[0] if len(videos) == 1 and isinstance(videos[0], str) else videos  # frames: nested
    out["conversations"] = [{"from": _FROM[m.role], "value": m.text} for m in record.messages]
    for key in ("chosen", "rejected", "box_format", "box_image"):
        if getattr(record, key) is not None:
            out[key] = getattr(record, key)
    return {**out, **record.fields}


def _to_llava(records: list[Record], dst: Path) -> int:
    folder = dst.with_name(dst.stem + "_images")
    written: dict[str, str] = {}  # image -> its name in the folder

    def image(path: str) -> str:
        if path not in written:
            data = image_bytes(path)
            name = _name(path, data)
            stem, n = Path(name), 1
            while any(v == name for v in written.values()):  # same name, other bytes: number it
                name, n = f"{stem.stem}-{n}{stem.suffix}", n + 1
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
            written[path] = name
        return f"{folder.name}/{written[path]}"

    rows = []
    for record in records:
        names = [image(path) for path in record.images]
        videos = [frames.as_entry(v, [image(f) for f in frames.frame_list(v)[0]]) if frames.is_frame_list(v)
                  else _relative(v, dst.parent) for v in record.videos]
        rows.append(llava_record(record, names, videos))
    dst.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    return len(written)


def write_parquet(records: list[Record], dst: Path) -> int:
    """Records as Parquet with their images' bytes embedded (the ``datasets`` ``Image`` layout); the images written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, count = [], 0

    def embedded(path: str) -> dict:
        nonlocal count
        count += 1
        return {"bytes": image_bytes(path), "path": None if media.is_inline(path) else Path(path).name}

    for record in records:
        images = [embedded(p) for p in record.images]
        videos = [frames.as_entry(v, [embedded(f) for f in frames.frame_list(v)[0]]) if frames.is_frame_list(v)
                  else _relative(v, dst.parent) for v in record.videos]
        row = llava_record(record, [], videos)
        row.pop("image", None)
        row.update(image=images, video=row.pop("video", None))
        if isinstance(row["video"], str):
            row["video"] = [row["video"]]
        rows.append(row)
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise FileError(f"the records' fields differ in type from record to record, which a Parquet column cannot "
                        f"hold: {exc}; write LLaVA JSON instead (--to llava)") from None
    pq.write_table(table, dst, row_group_size=ROW_GROUP_ROWS)
    return count


def convert(src: str | Path, dst: str | Path, to: str | None = None, *, image_folder=None, video_folder=None,
            data_format: str | None = None, stage: str = "sft", allow_urls: bool = False) -> tuple[int, int]:
    """Convert ``src`` to ``dst`` (``to``: "llava" or "parquet", default from ``dst``'s suffix): (records, images
    written). Raises ``DataError`` listing every error of ``src`` (nothing is written then)."""
    dst = Path(dst)
    to = to or ("parquet" if dst.suffix.lower() == ".parquet" else "llava")
    records = load_records(src, image_folder, video_folder, allow_urls=allow_urls, data_format=data_format,
                           stage=stage, min_image_side=1)
    dst.parent.mkdir(parents=True, exist_ok=True)
    images = write_parquet(records, dst) if to == "parquet" else _to_llava(records, dst)
    return len(records), images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune convert", description=(
        "Write a data file (LLaVA, ShareGPT or messages JSON / JSON lines, Parquet, Arrow, a save_to_disk folder) "
        "as LLaVA JSON plus an image folder (OUTPUT.json, OUTPUT_images/) or as Parquet with the images' bytes "
        "embedded (OUTPUT.parquet); a video's frames are written as images are. Every record is checked first; a "
        "file with errors is not converted."))
    parser.add_argument("input")
    parser.add_argument("output", help="OUTPUT.json (LLaVA) or OUTPUT.parquet")
    parser.add_argument("--to", choices=TARGETS, help="output format (default: from the output's suffix)")
    parser.add_argument("--data_format", choices=FORMATS, help="format of the input's records (default: detected)")
    parser.add_argument("--stage", choices=STAGES, default="sft", help="what the records are for (dpo / grpo "
                        "records keep their replies and reward fields)")
    parser.add_argument("--image_folder", help="folder of relative image paths (default: the input's)")
    parser.add_argument("--video_folder", help="folder of relative video and frame paths (default: image_folder)")
    parser.add_argument("--allow_urls", action="store_true", help="fetch http(s) images and embed or copy them")
    args = parser.parse_args(argv)
    records, images = convert(args.input, args.output, args.to, image_folder=args.image_folder,
                              video_folder=args.video_folder, data_format=args.data_format, stage=args.stage,
                              allow_urls=args.allow_urls)
    print(f"{records:,} records and {images:,} images written to {args.output}")
    return 0
