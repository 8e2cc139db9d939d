"""Video readers: which one decodes (decord, else PyAV), what a container's header says, and a qwen-vl-utils reader
backend on PyAV (registered on import). How frames are planned and sampled is ``vlmtune.data.media``'s."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from qwen_vl_utils import vision_process as qvu

from vlmtune.errors import MediaError


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: enough to plan frame sampling and count tokens without decoding.

    ``listed``: a list of frame files (``vlmtune.data.frames``): ``frames`` is the list's length, ``fps`` its
    ``sample_fps``, the size its frames' (read from their image headers); every frame is kept, none sampled."""

    frames: int
    fps: float
    width: int
    height: int
    listed: bool = False


def video_backend() -> str:
    """The video reader: decord when installed, else PyAV. Chosen explicitly, since qwen-vl-utils'
    own fallback (torchvision.io.read_video) no longer exists in torchvision 0.29."""
    if importlib.util.find_spec("decord") is not None:
        return "decord"
    if importlib.util.find_spec("av") is not None:
        return "pyav"
    raise MediaError("no video reader is installed: pip install 'vlmtune[video]' (decord, or PyAV)")


def pyav_header(container) -> VideoInfo:
    """What PyAV reads from an opened container's header; the PyAV reader samples from the same numbers."""
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    frames = stream.frames
    if not frames and fps:  # containers without a frame count (e.g. some WebM / MKV): estimate from duration
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = (container.duration or 0) / 1_000_000
        frames = round(seconds * fps)
    return VideoInfo(int(frames), fps, stream.codec_context.width, stream.codec_context.height)


def read_video_pyav(ele: dict):
    """A qwen-vl-utils reader backend on PyAV, returning what its decord reader returns.

    Frames are decoded in one pass and only the sampled ones are converted to RGB and kept, so memory
    holds ``nframes`` frames, not the whole video. The frame count is the header's (as ``media.video_info``
    reads it), so the sampled indices match the token count computed before decoding."""
    import av
    import numpy as np

    path = str(ele["video"]).removeprefix("file://")
    with av.open(path) as container:
        header = pyav_header(container)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        total, video_fps = header.frames, header.fps
        start, end, total_in_range = qvu.calculate_video_frame_range(ele, total, video_fps)
        nframes = qvu.smart_nframes(ele, total_frames=total_in_range, video_fps=video_fps)
        idx = torch.linspace(start, end, nframes).round().long().tolist()
        wanted = set(idx)
        kept: dict[int, np.ndarray] = {}
        last = None
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
            last = frame
            if i >= idx[-1]:
                break
        if not kept and last is None:
            raise ValueError(f"no frame could be decoded from {path}")
        if len(kept) < len(wanted):  # the header counted more frames than the stream holds
            fill = kept[max(kept)] if kept else last.to_ndarray(format="rgb24")
            kept.update({i: fill for i in wanted if i not in kept})
    video = torch.from_numpy(np.stack([kept[i] for i in idx])).permute(0, 3, 1, 2)
    metadata = dict(fps=video_fps, frames_indices=idx, total_num_frames=total_in_range, video_backend="pyav")
    return video, metadata, nframes / max(total_in_range, 1e-6) * video_fps


qvu.VIDEO_READER_BACKENDS.setdefault("pyav", read_video_pyav)
