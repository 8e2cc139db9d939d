"""Open images and decode videos under pixel, frame and fps budgets.

Resizing and frame sampling are qwen-vl-utils' (the reference implementation); this module chooses the
video reader, applies EXIF orientation, and computes how many vision tokens a file will cost from its
header alone, so lengths are known before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from qwen_vl_utils import vision_process as qvu

from vlmtune import cache_root
from vlmtune.data import frames as frame_lists
from vlmtune.data import inline
from vlmtune.data.inline import inline_bytes, is_inline, is_table_ref  # noqa: F401  (re-exported)
from vlmtune.data.video_readers import VideoInfo, pyav_header, video_backend  # noqa: F401  (re-exported)
from vlmtune.errors import MediaError

# EXIF orientations that rotate by 90 or 270 degrees, so width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
URL_PREFIXES = ("http://", "https://")
FILE_PREFIX = "file://"
# PNG chunks that can carry an EXIF orientation (eXIf, raw EXIF or XMP in text chunks).
_PNG_METADATA_CHUNKS = {b"eXIf", b"tEXt", b"zTXt", b"iTXt"}


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

    def video_element(self, video) -> dict:
        """qwen-vl-utils' element for a video: a file's path, or a list of decoded frames."""
        video = video if isinstance(video, list) else str(video)
        ele = {"video": video, "min_pixels": self.video_min_pixels, "max_pixels": self.video_max_pixels}
        if self.nframes:
            ele["nframes"] = self.nframes
        else:
            fps = float(self.fps) if self.fps else qvu.FPS
            ele.update(fps=fps, min_frames=self.video_min_frames, max_frames=self.video_max_frames)
        return ele


# ---------------------------------------------------------------- files and URLs


def is_url(path: str | Path) -> bool:
    return str(path).startswith(URL_PREFIXES)


def shown(path: str | Path) -> str:
    """How messages name a medium: its path; bytes by their type and size or their table cell; a frame list by its
    first and last frame."""
    if frame_lists.is_frame_list(path):
        return frame_lists.describe(str(path), inline.shown)
    return inline.shown(path)


def _opened(path: str | Path):
    """What ``Image.open`` reads: bytes in memory for a data: URI or a table's cell, else a local path (URLs
    fetched once)."""
    return io.BytesIO(inline_bytes(str(path))) if is_inline(path) else local_path(path)


def media_cache_dir() -> Path:
    """Where downloaded media are kept (``$VLMTUNE_CACHE/media``), so a URL is fetched once."""
    return cache_root() / "media"


def local_path(path: str | Path) -> str:
    """A path that can be opened: ``file://`` stripped; a URL downloaded once into ``media_cache_dir()``."""
    path = str(path)
    if path.startswith(FILE_PREFIX):
        return path[len(FILE_PREFIX):]
    if not is_url(path):
        return path
    suffix = Path(path.split("?", 1)[0].split("#", 1)[0]).suffix[:10]
    target = media_cache_dir() / (hashlib.sha256(path.encode()).hexdigest()[:32] + suffix)
    if target.is_file():
        return str(target)
    import requests

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        with requests.get(path, stream=True, timeout=60) as response:
            response.raise_for_status()
            with open(tmp, "wb") as f:
                for chunk in response.iter_content(1 << 20):
                    f.write(chunk)
        os.replace(tmp, target)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise MediaError(f"cannot download {path}: {exc}") from None
    return str(target)


# ---------------------------------------------------------------- images


def _png_metadata_after_pixels(fp) -> bool:
    """Whether a PNG has a metadata chunk after its first IDAT (PIL reads those only on a full decode).

    Walks the chunk headers and seeks over their data, so no pixel is decoded."""
    fp.seek(8)
    seen_pixels = False
    while True:
        header = fp.read(8)
        if len(header) < 8:
            return False
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            return False
        if kind == b"IDAT":
            seen_pixels = True
        elif seen_pixels and kind in _PNG_METADATA_CHUNKS:
            return True
        fp.seek(length + 4, os.SEEK_CUR)  # data and CRC


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image, from its header where PIL would otherwise decode it."""
    if img.format == "PNG" and "exif" not in img.info and not _png_metadata_after_pixels(img.fp):
        # PIL's PNG getexif() decodes the whole image to reach chunks after the pixels; there are none,
        # and what the header holds is already in img.info.
        exif = Image.Image.getexif(img)
    else:
        exif = img.getexif()
    return exif.get(_EXIF_ORIENTATION_TAG, 1)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    try:
        with Image.open(_opened(path)) as img:
            width, height = img.size
            orientation = _orientation(img)
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"image file not found: {path}") from None
    except Exception as exc:  # PIL raises many types for bad files
        raise MediaError(f"unreadable image {shown(path)}: {exc}") from None
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def load_image(path: str | Path, budget: MediaBudget) -> Image.Image:
    """Decode an image, apply EXIF orientation, convert to RGB and resize it under the budget."""
    return resize_image(_decoded(path), budget)


def _decoded(path: str | Path) -> Image.Image:
    """An image decoded, EXIF orientation applied (not resized)."""
    try:
        with Image.open(_opened(path)) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"image file not found: {path}") from None
    except Exception as exc:
        raise MediaError(f"unreadable image {shown(path)}: {exc}") from None
    return img


def resize_image(img: Image.Image, budget: MediaBudget) -> Image.Image:
    """A decoded image in RGB, resized under the budget by qwen-vl-utils (what the processor then gets)."""
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


def _frames_info(name: str) -> VideoInfo:
    """A frame list's ``VideoInfo`` from its frames' image headers (no frame is decoded): one size for all."""
    frames, fps = frame_lists.frame_list(name)
    sizes = {}
    for i, frame in enumerate(frames):
        try:
            size = image_size(frame)
        except MediaError as exc:
            raise MediaError(f"{shown(name)}, frame {i}: {exc}") from None
        sizes.setdefault(size, i)
        if len(sizes) > 1:
            (w0, h0), (w, h) = sizes
            raise MediaError(f"{shown(name)}: frame {i} ({inline.shown(frame)}) is {w}x{h} px, frame 0 {w0}x{h0} px: "
                             "the frames of a video must have one size (qwen-vl-utils and the processor stack them); "
                             "resize them")
    (width, height), = sizes
    return VideoInfo(len(frames), float(fps), width, height, listed=True)


def video_info(path: str | Path) -> VideoInfo:
    """Frame count, fps and size from the container header (no frame is decoded); for a frame list
    (``vlmtune.data.frames``), from its frames' image headers.

    Frame count and fps come from the reader that will decode the video (decord when installed, so the
    sampled frames are the ones its reader picks); the frame size from PyAV's header when it is installed."""
    if frame_lists.is_frame_list(path):
        return _frames_info(str(path))
    try:
        local = local_path(path)
        if not Path(local).is_file():
            raise MediaError(f"video file not found: {path}")
        backend = video_backend()
        size = None
        if backend == "pyav" or importlib.util.find_spec("av") is not None:
            import av

            with av.open(local) as container:
                info = pyav_header(container)
            size = (info.width, info.height)
        if backend == "decord":
            import decord

            vr = decord.VideoReader(local)
            if size is None or not all(size):
                height, width = vr[0].shape[:2]
                size = (width, height)
            info = VideoInfo(len(vr), float(vr.get_avg_fps()), *size)
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"unreadable video {path}: {exc}") from None
    if info.frames < qvu.FRAME_FACTOR or info.fps <= 0:
        raise MediaError(f"video {path} has {info.frames} frame(s) at {info.fps:g} fps; at least "
                         f"{qvu.FRAME_FACTOR} frames are needed: drop the record")
    if min(info.width, info.height) <= 0:
        raise MediaError(f"video {path} has no frame size in its header ({info.width}x{info.height})")
    return info


def _first_error(exc: BaseException) -> BaseException:
    """The error that started a chain: qwen-vl-utils hides a reader's error behind its broken torchvision
    fallback (``torchvision.io.read_video`` is gone), whose own error names nothing useful."""
    while exc.__context__ is not None:
        exc = exc.__context__
    return exc


def sampled_frame_indices(info: VideoInfo, budget: MediaBudget) -> list[int]:
    """Indices of the frames qwen-vl-utils will sample (the same formula it applies). A frame list: every frame,
    the last repeated up to a multiple of the temporal patch (qwen-vl-utils' ``fetch_video`` on a list)."""
    if info.listed:
        return list(range(qvu.ceil_by_factor(info.frames, qvu.FRAME_FACTOR)))
    ele = budget.video_element("")
    nframes = qvu.smart_nframes(ele, total_frames=info.frames, video_fps=info.fps)
    return torch.linspace(0, info.frames - 1, nframes).round().long().tolist()


def resized_frame_size(info: VideoInfo, nframes: int, budget: MediaBudget) -> tuple[int, int]:
    """(height, width) of each sampled frame: qwen-vl-utils' per-frame cap (its ``fetch_video``). A frame list's
    frames are first resized one by one as images, under the video's pixel bounds and at twice the factor (what
    ``fetch_video`` asks ``fetch_image`` for), then together as a video's frames."""
    f = budget.factor
    height, width = info.height, info.width
    if info.listed:
        height, width = qvu.smart_resize(height, width, factor=2 * f, min_pixels=budget.video_min_pixels,
                                         max_pixels=budget.video_max_pixels)
    total_pixels = qvu.MODEL_SEQ_LEN * f * f * 0.9
    cap = max(min(qvu.VIDEO_MAX_TOKEN_NUM * f * f, total_pixels / nframes * qvu.FRAME_FACTOR),
              int(budget.video_min_pixels * 1.05))
    max_pixels = min(budget.video_max_pixels, cap)
    return qvu.smart_resize(height, width, factor=f, min_pixels=budget.video_min_pixels, max_pixels=max_pixels)


def video_grid(info: VideoInfo, budget: MediaBudget) -> tuple[list[int], int, int]:
    """(sampled indices, grid height, grid width) in merged-token units."""
    indices = sampled_frame_indices(info, budget)
    h, w = resized_frame_size(info, len(indices), budget)
    return indices, h // budget.factor, w // budget.factor


def video_tokens(info: VideoInfo, budget: MediaBudget) -> int:
    """Number of ``<|video_pad|>`` tokens a video costs (frames are paired in time)."""
    indices, gh, gw = video_grid(info, budget)
    return math.ceil(len(indices) / qvu.FRAME_FACTOR) * gh * gw


def _load_frames(name: str, budget: MediaBudget) -> tuple[torch.Tensor, dict]:
    """A frame list decoded (EXIF orientation applied) and handed to qwen-vl-utils as a list, as
    ``process_vision_info`` hands it a list of frame files: every frame kept, resized, timed at ``sample_fps``."""
    frames, fps = frame_lists.frame_list(name)
    images = []
    for i, frame in enumerate(frames):
        try:
            images.append(_decoded(frame))
        except MediaError as exc:
            raise MediaError(f"{shown(name)}, frame {i}: {exc}") from None
    try:
        return qvu.fetch_video({**budget.video_element(images), "sample_fps": fps},
                               image_patch_size=budget.factor // 2, return_video_metadata=True)
    except Exception as exc:
        raise MediaError(f"unreadable video {shown(name)}: {exc}") from None


def load_video(path: str | Path, budget: MediaBudget) -> tuple[torch.Tensor, dict]:
    """Decode the sampled frames of a video, resized under the budget: (frames TCHW float, metadata)."""
    if frame_lists.is_frame_list(path):
        return _load_frames(str(path), budget)
    if qvu.FORCE_QWENVL_VIDEO_READER is None:  # the user's FORCE_QWENVL_VIDEO_READER wins
        qvu.FORCE_QWENVL_VIDEO_READER = video_backend()
        qvu.get_video_reader_backend.cache_clear()
    try:
        local = local_path(path)
        if not Path(local).is_file():
            raise MediaError(f"video file not found: {path}")
        video, metadata = qvu.fetch_video(
            budget.video_element(local), image_patch_size=budget.factor // 2, return_video_metadata=True
        )
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"unreadable video {path}: {_first_error(exc)}") from None
    return video, metadata


def video_size_is_total(video_processor) -> bool:
    """Whether a video processor reads ``size["longest_edge"]`` as the pixels of all sampled frames together.

    Qwen3-VL's does (transformers 5.22: its ``smart_resize`` compares frames x height x width with it, and with
    ``cap_pixels_per_frame`` each frame gets ``min(max_video_tokens x factor², longest_edge // frames)``, at least
    1.05 x ``shortest_edge``); Qwen2-VL's reads it per frame, bounded by an even share of ``max_video_tokens``
    (tests/test_media.py checks both against the installed transformers)."""
    import transformers

    total_kind = getattr(transformers, "Qwen3VLVideoProcessor", None)
    return total_kind is not None and isinstance(video_processor, total_kind)


def budget_from_processor(processor, factor: int, **overrides) -> MediaBudget:
    """The processor's own pixel / frame defaults, with the non-None ``overrides`` on top (``fps`` and ``nframes``
    replace each other)."""
    image_size = getattr(processor.image_processor, "size", None) or {}
    video = getattr(processor, "video_processor", None)
    video_size = getattr(video, "size", None) or {}
    defaults = MediaBudget(factor=factor)
    video_max = video_size.get("longest_edge", defaults.video_max_pixels)
    if video is not None and video_size_is_total(video):  # the per-frame cap is max_video_tokens' worth
        video_max = (getattr(video, "max_video_tokens", None) or qvu.VIDEO_MAX_TOKEN_NUM) * factor**2
    nframes = getattr(video, "num_frames", None)
    values = dict(
        factor=factor,
        image_min_pixels=image_size.get("shortest_edge", defaults.image_min_pixels),
        image_max_pixels=image_size.get("longest_edge", defaults.image_max_pixels),
        video_min_pixels=video_size.get("shortest_edge", defaults.video_min_pixels),
        video_max_pixels=video_max,
        fps=None if nframes else getattr(video, "fps", None) or defaults.fps,
        nframes=nframes,
        video_min_frames=getattr(video, "min_frames", None) or defaults.video_min_frames,
        video_max_frames=getattr(video, "max_frames", None) or defaults.video_max_frames,
    )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "fps" in overrides or "nframes" in overrides:
        values.update(fps=None, nframes=None)
    values.update(overrides)
    return MediaBudget(**values)


def set_processor_budget(processor, budget: MediaBudget) -> None:
    """Write the budget into the processor, so a saved folder serves with the budgets it was trained with
    (transformers and vLLM read them from ``processor_config.json``).

    Written so that the processor's own resizing and frame sampling (``do_resize`` / ``do_sample_frames``) follow
    qwen-vl-utils' as closely as its fields allow: the per-frame cap (``cap_pixels_per_frame``), the total video
    budget qwen-vl-utils applies (``MODEL_SEQ_LEN`` tokens), ``num_frames`` for ``nframes``. What no field holds:
    a fixed image size (``image_resized_*``: written as the same area, so a served image costs about the tokens it
    cost in training; the exact size is in ``vlmtune_run.json``); for Qwen3-VL, a per-frame minimum (its
    ``shortest_edge`` is a minimum over all frames)."""
    if budget.image_resized_height and budget.image_resized_width:
        height, width = resized_image_size(budget.image_resized_width, budget.image_resized_height, budget)
        processor.image_processor.size = {"shortest_edge": height * width, "longest_edge": height * width}
    else:
        processor.image_processor.size = {"shortest_edge": budget.image_min_pixels,
                                          "longest_edge": budget.image_max_pixels}
    video = getattr(processor, "video_processor", None)
    if video is None:
        return
    f2 = budget.factor**2
    video.cap_pixels_per_frame = True
    if video_size_is_total(video):
        total = int(qvu.MODEL_SEQ_LEN * f2 * 0.9 * qvu.FRAME_FACTOR)  # qwen-vl-utils: total_pixels / frames x 2
        video.size = {"shortest_edge": budget.video_min_pixels, "longest_edge": total}
        video.max_video_tokens = min(budget.video_max_pixels, qvu.VIDEO_MAX_TOKEN_NUM * f2) // f2
    else:
        video.size = {"shortest_edge": budget.video_min_pixels, "longest_edge": budget.video_max_pixels}
        video.max_video_tokens = qvu.MODEL_SEQ_LEN
    video.min_frames, video.max_frames = budget.video_min_frames, budget.video_max_frames
    video.num_frames, video.fps = (budget.nframes, None) if budget.nframes else (None, budget.fps)
    video.do_sample_frames = True
