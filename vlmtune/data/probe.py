"""Media checks from the files' headers (existence, size, aspect ratio, frame sampling); ``deep`` decodes."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from vlmtune.data import media
from vlmtune.data.frames import frame_list, is_frame_list
from vlmtune.data.schema import Record
from vlmtune.errors import MediaError, Problem

MAX_ASPECT_RATIO = 200  # the processors' limit


def _present(path: str) -> bool:
    """Whether a medium is there to read: bytes, a URL, an existing file; a frame list's every frame."""
    if is_frame_list(path):
        return all(map(_present, frame_list(path)[0]))
    return media.is_url(path) or media.is_inline(path) or os.path.exists(path)


def _advice(exc: MediaError, path: str, folder_flag: str) -> str:
    if is_frame_list(path) and _present(path):  # frames that are there: the message says what to do
        return str(exc)
    if _present(path):
        return f"{exc}; replace the file or drop the record"
    return f"{exc}; check the name and {folder_flag} (relative paths are resolved against it)"


def _probe_image(path: str, min_side: int, deep: bool, budget: media.MediaBudget | None):
    """(width, height) of an image, or the message of what is wrong with it."""
    name = media.shown(path)
    try:
        width, height = media.image_size(path)
        # under a fixed size every image is resized to it: its own size and shape do not matter
        fixed = budget is not None and budget.image_resized_height and budget.image_resized_width
        if not fixed and min(width, height) < min_side:
            return (f"image {name} is {width}x{height} px; the processor needs at least {min_side} px a side: "
                    "upscale it or drop the record")
        if not fixed and max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            return (f"image {name} is {width}x{height} px, an aspect ratio over {MAX_ASPECT_RATIO}: crop or pad "
                    "it, or drop the record")
        if deep:
            media.load_image(path, budget or media.MediaBudget())
    except MediaError as exc:
        return _advice(exc, path, "--image_folder")
    return width, height


def _probe_video(path: str, deep: bool, budget: media.MediaBudget | None):
    """The ``VideoInfo`` of a video (a file or a frame list), or the message of what is wrong with it."""
    name = media.shown(path)
    try:
        info = media.video_info(path)
        if max(info.width, info.height) / min(info.width, info.height) > MAX_ASPECT_RATIO:
            return (f"video {name} is {info.width}x{info.height} px, an aspect ratio over {MAX_ASPECT_RATIO}: "
                    "crop it or drop the record")
        if budget is not None:
            try:
                media.video_grid(info, budget)
            except ValueError as exc:
                sampling = f"nframes={budget.nframes}" if budget.nframes else f"fps={budget.fps:g}"
                return (f"video {name} ({info.frames} frames at {info.fps:g} fps) cannot be sampled with "
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

