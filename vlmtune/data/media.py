"""Open images and decode videos under pixel, frame and fps budgets.

Resizing and frame sampling are qwen-vl-utils' (the reference implementation); this module chooses the
video reader, applies EXIF orientation, and computes how many vision tokens a file will cost from its
header alone, so lengths are known before any pixel is decoded.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from qwen_vl_utils import vision_process as qvu

# EXIF orientations that rotate by 90 or 270 degrees, so width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class MediaBudget:
    """Pixel and frame budgets for one model (``factor`` = patch size x spatial merge)."""

    factor: int = 28
    image_min_pixels: int = 4 * 28 * 28
    image_max_pixels: int = 1280 * 28 * 28
    image_resized_height: int | None = None
    image_resized_width: int | None = None
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    fps: float | None = 2.0
    nframes: int | None = None
    video_min_frames: int = 4
    video_max_frames: int = 768

    def image_element(self, image) -> dict:
        ele = {"image": image, "min_pixels": self.image_min_pixels, "max_pixels": self.image_max_pixels}
        if self.image_resized_height and self.image_resized_width:
            ele.update(resized_height=self.image_resized_height, resized_width=self.image_resized_width)
        return ele

    def video_element(self, path: str) -> dict:
        ele = {"video": str(path), "min_pixels": self.video_min_pixels, "max_pixels": self.video_max_pixels}
        if self.nframes:
            ele["nframes"] = self.nframes
        else:
            ele.update(fps=self.fps, min_frames=self.video_min_frames, max_frames=self.video_max_frames)
        return ele


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: enough to plan frame sampling and count tokens without decoding."""

    frames: int
    fps: float
    width: int
    height: int


class MediaError(ValueError):
    """A media file that cannot be used, with a message fit for the user."""


# ---------------------------------------------------------------- images


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except FileNotFoundError:
        raise MediaError(f"image file not found: {path}") from None
    except Exception as exc:  # PIL raises many types for bad files
        raise MediaError(f"unreadable image {path}: {exc}") from None
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def load_image(path: str | Path, budget: MediaBudget) -> Image.Image:
    """Decode an image, apply EXIF orientation, convert to RGB and resize it under the budget."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except Exception as exc:
        raise MediaError(f"unreadable image {path}: {exc}") from None
    return qvu.fetch_image(budget.image_element(img), image_patch_size=budget.factor // 2)


def resized_image_size(width: int, height: int, budget: MediaBudget) -> tuple[int, int]:
    """(height, width) the image will have after resizing, as qwen-vl-utils computes it."""
    if budget.image_resized_height and budget.image_resized_width:
        return qvu.smart_resize(budget.image_resized_height, budget.image_resized_width, factor=budget.factor)
    return qvu.smart_resize(
        height, width, factor=budget.factor, min_pixels=budget.image_min_pixels, max_pixels=budget.image_max_pixels
    )


def image_tokens(width: int, height: int, budget: MediaBudget) -> int:
    """Number of ``<|image_pad|>`` tokens an image of this size costs."""
    h, w = resized_image_size(width, height, budget)
    return (h // budget.factor) * (w // budget.factor)


# ---------------------------------------------------------------- videos


def video_backend() -> str:
    """The video reader: decord when installed, else PyAV. Chosen explicitly, since qwen-vl-utils'
    own fallback (torchvision.io.read_video) no longer exists in torchvision 0.29."""
    if importlib.util.find_spec("decord") is not None:
        return "decord"
    if importlib.util.find_spec("av") is not None:
        return "pyav"
    raise MediaError("no video reader is installed: pip install 'vlmtune[video]' (decord, or PyAV)")


def video_info(path: str | Path) -> VideoInfo:
    """Frame count, fps and size from the container header (no frame is decoded)."""
    if not Path(path).is_file():
        raise MediaError(f"video file not found: {path}")
    try:
        if video_backend() == "decord":
            import decord

            vr = decord.VideoReader(str(path))
            height, width = vr[0].shape[:2] if len(vr) else (0, 0)
            info = VideoInfo(len(vr), float(vr.get_avg_fps()), width, height)
        else:
            import av

            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate or stream.guessed_rate or 0)
                frames = stream.frames or int(float(stream.duration * stream.time_base) * fps if stream.duration else 0)
                info = VideoInfo(frames, fps, stream.codec_context.width, stream.codec_context.height)
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"unreadable video {path}: {exc}") from None
    if info.frames < qvu.FRAME_FACTOR or info.fps <= 0:
        raise MediaError(f"video {path} has {info.frames} frames at {info.fps:g} fps; at least 2 frames are needed")
    return info


def sampled_frame_indices(info: VideoInfo, budget: MediaBudget) -> list[int]:
    """Indices of the frames qwen-vl-utils will sample (the same formula it applies)."""
    ele = budget.video_element("")
    nframes = qvu.smart_nframes(ele, total_frames=info.frames, video_fps=info.fps)
    return torch.linspace(0, info.frames - 1, nframes).round().long().tolist()


def resized_frame_size(info: VideoInfo, nframes: int, budget: MediaBudget) -> tuple[int, int]:
    """(height, width) of each sampled frame: qwen-vl-utils' per-frame cap (its ``fetch_video``)."""
    f = budget.factor
    total_pixels = qvu.MODEL_SEQ_LEN * f * f * 0.9
    cap = max(min(qvu.VIDEO_MAX_TOKEN_NUM * f * f, total_pixels / nframes * qvu.FRAME_FACTOR),
              int(budget.video_min_pixels * 1.05))
    max_pixels = min(budget.video_max_pixels, cap)
    return qvu.smart_resize(info.height, info.width, factor=f, min_pixels=budget.video_min_pixels,
                            max_pixels=max_pixels)


def video_grid(info: VideoInfo, budget: MediaBudget) -> tuple[list[int], int, int]:
    """(sampled indices, grid height, grid width) in merged-token units."""
    indices = sampled_frame_indices(info, budget)
    h, w = resized_frame_size(info, len(indices), budget)
    return indices, h // budget.factor, w // budget.factor


def video_tokens(info: VideoInfo, budget: MediaBudget) -> int:
    """Number of ``<|video_pad|>`` tokens a video costs (frames are paired in time)."""
    indices, gh, gw = video_grid(info, budget)
    return math.ceil(len(indices) / qvu.FRAME_FACTOR) * gh * gw


def _read_video_pyav(ele: dict):
    """A qwen-vl-utils reader backend on PyAV, returning what its decord reader returns."""
    import av
    import numpy as np

    path = ele["video"]
    with av.open(path) as container:
        stream = container.streams.video[0]
        video_fps = float(stream.average_rate or stream.guessed_rate)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    total = len(frames)
    start, end, total_in_range = qvu.calculate_video_frame_range(ele, total, video_fps)
    nframes = qvu.smart_nframes(ele, total_frames=total_in_range, video_fps=video_fps)
    idx = torch.linspace(start, end, nframes).round().long().tolist()
    video = torch.from_numpy(np.stack([frames[i] for i in idx])).permute(0, 3, 1, 2)
    metadata = dict(fps=video_fps, frames_indices=idx, total_num_frames=total, video_backend="pyav")
    return video, metadata, nframes / max(total_in_range, 1e-6) * video_fps


qvu.VIDEO_READER_BACKENDS.setdefault("pyav", _read_video_pyav)


def load_video(path: str | Path, budget: MediaBudget) -> tuple[torch.Tensor, dict]:
    """Decode the sampled frames of a video, resized under the budget: (frames TCHW float, metadata)."""
    if qvu.FORCE_QWENVL_VIDEO_READER is None:  # the user's FORCE_QWENVL_VIDEO_READER wins
        qvu.FORCE_QWENVL_VIDEO_READER = video_backend()
        qvu.get_video_reader_backend.cache_clear()
    try:
        video, metadata = qvu.fetch_video(
            budget.video_element(str(path)), image_patch_size=budget.factor // 2, return_video_metadata=True
        )
    except Exception as exc:
        raise MediaError(f"unreadable video {path}: {exc}") from None
    return video, metadata


def budget_from_processor(processor, factor: int, **overrides) -> MediaBudget:
    """The processor's own pixel / frame defaults, with the non-None ``overrides`` on top."""
    image_size = getattr(processor.image_processor, "size", None) or {}
    video = getattr(processor, "video_processor", None)
    video_size = getattr(video, "size", None) or {}
    defaults = MediaBudget(factor=factor)
    values = dict(
        factor=factor,
        image_min_pixels=image_size.get("shortest_edge", defaults.image_min_pixels),
        image_max_pixels=image_size.get("longest_edge", defaults.image_max_pixels),
        video_min_pixels=video_size.get("shortest_edge", defaults.video_min_pixels),
        video_max_pixels=video_size.get("longest_edge", defaults.video_max_pixels),
        fps=getattr(video, "fps", None) or defaults.fps,
        video_min_frames=getattr(video, "min_frames", None) or defaults.video_min_frames,
        video_max_frames=getattr(video, "max_frames", None) or defaults.video_max_frames,
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return MediaBudget(**values)
