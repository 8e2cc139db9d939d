"""A video given as a list of frame files, as ``qwen_vl_utils.process_vision_info`` takes it.

Written in a record as ``{"type": "video", "video": ["f/0001.jpg", "f/0002.jpg", ...]}`` (typed messages; an optional
``"sample_fps"`` says how many frames a second they are), as a list inside ShareGPT's ``videos`` or LLaVA's ``video``
(``[["f/0001.jpg", ...]]``, or ``{"frames": [...], "sample_fps": 4}``). Each frame is an image name: a file, a URL
(with ``--allow_urls``), a ``data:`` URI or a table's cell. A ``Record`` names such a video by one string,
``frames:{"sample_fps": 2.0, "frames": [resolved names]}``, so the store, its media table and the loaders carry it as
they carry a video file; ``vlmtune.data.media`` plans and decodes it (every frame kept, as qwen-vl-utils keeps them).
"""

from __future__ import annotations

import json

FRAMES_PREFIX = "frames:"
SAMPLE_FPS = 2.0
"""Frames a second of a frame list without ``sample_fps``: qwen-vl-utils' ``fetch_video`` default."""


def is_frame_list(name) -> bool:
    """Whether a record's video name stands for a list of frames (not a video file)."""
    return isinstance(name, str) and name.startswith(FRAMES_PREFIX)


def frames_name(frames: list[str], sample_fps: float) -> str:
    """The one string a record names a frame-list video by."""
    return FRAMES_PREFIX + json.dumps({"sample_fps": float(sample_fps), "frames": frames}, ensure_ascii=False,
                                      separators=(",", ":"))


def frame_list(name: str) -> tuple[list[str], float]:
    """(frame names, frames a second) of a frame-list video's name."""
    value = json.loads(name[len(FRAMES_PREFIX):])
    return value["frames"], value["sample_fps"]


def entry(value) -> tuple[list, float] | str | None:
    """A video entry of a record: ``(frames, sample_fps)`` for a frame list, a string for a video file, or None for
    anything else (``check_entry`` says why)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return value, SAMPLE_FPS
    if isinstance(value, dict) and "frames" in value:  # a null sample_fps (a table's column): the default
        return value["frames"], SAMPLE_FPS if value.get("sample_fps") is None else value["sample_fps"]
    return None


def check_entry(value) -> str | None:
    """What is wrong with a video entry (a file name, a list of frame names, or ``{"frames": [...], "sample_fps":
    n}``), or None."""
    parsed = entry(value)
    if parsed is None:
        return (f"a video must be a file name or a list of frame files, got {json.dumps(value, default=str)[:80]}")
    if isinstance(parsed, str):
        return None if parsed.strip() else "a video's file name is empty"
    frames, fps = parsed
    if not isinstance(frames, list) or not frames:
        return "an empty list of frames; give the video's frame files (or a video file)"
    for i, frame in enumerate(frames):
        if not isinstance(frame, str) or not frame.strip():
            return (f"frame {i} of the video must be an image file name, got {json.dumps(frame, default=str)[:60]}; "
                    "a frame list holds one image name per frame")
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not fps > 0:
        return f"'sample_fps' of a frame list must be a positive number (frames a second), got {fps!r}"
    return None


def describe(name: str, shown=str) -> str:
    """How messages name a frame-list video: its first and last frame and how many (``shown`` names one frame)."""
    frames, _ = frame_list(name)
    if len(frames) == 1:
        return f"frame list [{shown(frames[0])}]"
    return f"frame list [{shown(frames[0])} .. {shown(frames[-1])}] ({len(frames)} frames)"


def as_entry(name: str, frames: list) -> list | dict:
    """A frame-list video as a record's entry again (``frames``: what to write for each frame)."""
    _, fps = frame_list(name)
    return frames if fps == SAMPLE_FPS else {"frames": frames, "sample_fps": fps}
