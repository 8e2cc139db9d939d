"""``vlmtune convert``: any data file vlmtune reads -> LLaVA JSON plus an image folder, or Parquet with the images
embedded (the ``datasets`` ``Image`` layout), and back.

Every record is read and checked first (``read_records``); a file with errors is not converted (they are listed),
so no record is lost on the way. Images keep their bytes: a file's bytes are copied (LLaVA) or embedded (Parquet),
never re-encoded. Videos stay files (Parquet holds their paths, relative to the output where possible).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from vlmtune.data import inline, media
from vlmtune.data.formats import FORMATS
from vlmtune.data.records import Record, load_records
from vlmtune.data.schema import STAGES
from vlmtune.errors import FileError

TARGETS = ("llava", "parquet")
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
        out["video"] = videos[0] if len(videos) == 1 else videos
    out["conversations"] = [{"from": _FROM[m.role], "value": m.text} for m in record.messages]
    for key in ("chosen", "rejected", "box_format", "box_image"):
        if getattr(record, key) is not None:
            out[key] = getattr(record, key)
    return {**out, **record.fields}


def _to_llava(records: list[Record], dst: Path) -> int:
    folder = dst.with_name(dst.stem + "_images")
    written: dict[str, str] = {}  # image -> its name in the folder
    rows = []
    for record in records:
        names = []
        for path in record.images:
            if path not in written:
                data = image_bytes(path)
                name = _name(path, data)
                stem, n = Path(name), 1
                while any(v == name for v in written.values()):  # same name, other bytes: number it
                    name, n = f"{stem.stem}-{n}{stem.suffix}", n + 1
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
                written[path] = name
            names.append(f"{folder.name}/{written[path]}")
        rows.append(llava_record(record, names, [_relative(v, dst.parent) for v in record.videos]))
    dst.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    return len(written)


def write_parquet(records: list[Record], dst: Path) -> int:
    """Records as Parquet with their images' bytes embedded (the ``datasets`` ``Image`` layout); the images written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, count = [], 0
    for record in records:
        images = [{"bytes": image_bytes(p), "path": None if media.is_inline(p) else Path(p).name}
                  for p in record.images]
        count += len(images)
        row = llava_record(record, [], [_relative(v, dst.parent) for v in record.videos])
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
    pq.write_table(table, dst)
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
        "embedded (OUTPUT.parquet). Every record is checked first; a file with errors is not converted."))
    parser.add_argument("input")
    parser.add_argument("output", help="OUTPUT.json (LLaVA) or OUTPUT.parquet")
    parser.add_argument("--to", choices=TARGETS, help="output format (default: from the output's suffix)")
    parser.add_argument("--data_format", choices=FORMATS, help="format of the input's records (default: detected)")
    parser.add_argument("--stage", choices=STAGES, default="sft", help="what the records are for (dpo / grpo "
                        "records keep their replies and reward fields)")
    parser.add_argument("--image_folder", help="folder of relative image paths (default: the input's)")
    parser.add_argument("--video_folder", help="folder of relative video paths (default: image_folder)")
    parser.add_argument("--allow_urls", action="store_true", help="fetch http(s) images and embed or copy them")
    args = parser.parse_args(argv)
    records, images = convert(args.input, args.output, args.to, image_folder=args.image_folder,
                              video_folder=args.video_folder, data_format=args.data_format, stage=args.stage,
                              allow_urls=args.allow_urls)
    print(f"{records:,} records and {images:,} images written to {args.output}")
    return 0
