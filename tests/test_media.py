"""Images and videos: EXIF orientation, pixel / frame budgets, the video readers, token counts from headers."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, FAMILIES
from PIL import Image, PngImagePlugin
from qwen_vl_utils import vision_process as qvu

from vlmtune.data import media, video_readers
from vlmtune.errors import MediaError
from vlmtune.families.base import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

ROTATED = EXAMPLES / "images/red_triangle_rotated.jpg"
IMAGES = sorted((EXAMPLES / "images").iterdir())
VIDEOS = sorted((EXAMPLES / "videos").iterdir())


def red_rows(img: Image.Image) -> np.ndarray:
    """Number of red pixels in each row."""
    a = np.asarray(img.convert("RGB")).astype(int)
    red = (a[..., 0] > 150) & (a[..., 1] < 100) & (a[..., 2] < 100)
    return red.sum(axis=1)


# ---------------------------------------------------------------- images


def test_exif_orientation_gives_the_upright_size_and_image():
    with Image.open(ROTATED) as raw:
        assert raw.size == (96, 72)  # stored sideways
        stored = raw.convert("RGB")
    assert media.image_size(ROTATED) == (72, 96)
    budget = media.MediaBudget(factor=32, image_min_pixels=32 * 32, image_max_pixels=1000 * 32 * 32)  # Qwen3-VL's
    img = media.load_image(ROTATED, budget)
    assert img.size == (64, 96)
    assert media.resized_image_size(72, 96, budget) == (96, 64)
    # the triangle points up: few red pixels in the top rows, many in the bottom rows
    rows = red_rows(img)
    third = len(rows) // 3
    assert rows[:third].sum() * 3 < rows[-third:].sum()
    # the stored pixels alone do not show that (the test would catch a missing transpose)
    rows = red_rows(stored)
    assert rows[:24].sum() * 3 > rows[-24:].sum()


def _png_with_exif_after_pixels(tmp_path, orientation: int):
    """A PNG whose eXIf chunk comes after its IDAT, where PIL finds it only by decoding the image."""
    buf = io.BytesIO()
    Image.new("RGB", (60, 30), "white").save(buf, "PNG")
    data = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()[6:]  # without the "Exif\0\0" header
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    iend = data.rindex(b"IEND") - 4
    path = tmp_path / "late_exif.png"
    path.write_bytes(data[:iend] + chunk + data[iend:])
    return path


def test_png_size_is_read_without_decoding_pixels(tmp_path, monkeypatch):
    Image.new("RGB", (300, 100), "blue").save(tmp_path / "plain.png")
    late = _png_with_exif_after_pixels(tmp_path, 6)

    def no_decode(self):
        raise AssertionError("decoded")

    with monkeypatch.context() as m:
        m.setattr(PngImagePlugin.PngImageFile, "load", no_decode)
        assert media.image_size(tmp_path / "plain.png") == (300, 100)
        with pytest.raises(MediaError, match="decoded"):  # only this one needs its pixels read past
            media.image_size(late)
    # metadata after the pixels is still honoured, and agrees with the decoded image
    assert media.image_size(late) == (30, 60)
    assert media.load_image(late, media.MediaBudget(image_min_pixels=28 * 28)).size == (28, 56)


def test_image_max_pixels_budget(tmp_path):
    Image.new("RGB", (1000, 500), "green").save(tmp_path / "big.png")
    budget = media.MediaBudget(image_min_pixels=4 * 28 * 28, image_max_pixels=64 * 28 * 28)
    img = media.load_image(tmp_path / "big.png", budget)
    w, h = img.size
    assert w % 28 == 0 and h % 28 == 0
    assert w * h <= 64 * 28 * 28 and w * h > 32 * 28 * 28
    assert abs(w / h - 2) < 0.3
    assert media.image_tokens(1000, 500, budget) == (w // 28) * (h // 28)


def test_image_min_pixels_budget(tmp_path):
    Image.new("RGB", (30, 40), "green").save(tmp_path / "small.png")
    budget = media.MediaBudget(image_min_pixels=16 * 28 * 28, image_max_pixels=64 * 28 * 28)
    w, h = media.load_image(tmp_path / "small.png", budget).size
    assert w * h >= 16 * 28 * 28 and w % 28 == 0 and h % 28 == 0
    assert media.image_tokens(30, 40, budget) == (w // 28) * (h // 28) >= 16


def test_fixed_image_size(tmp_path):
    Image.new("RGB", (300, 300), "green").save(tmp_path / "square.png")
    budget = media.MediaBudget(image_resized_height=56, image_resized_width=112)
    assert media.load_image(tmp_path / "square.png", budget).size == (112, 56)
    assert media.image_tokens(300, 300, budget) == 4 * 2
    # the fixed size wins over the pixel budget, as in qwen-vl-utils
    tight = media.MediaBudget(image_resized_height=56, image_resized_width=112, image_max_pixels=4 * 28 * 28)
    assert media.load_image(tmp_path / "square.png", tight).size == (112, 56)


def test_images_are_converted_to_rgb(tmp_path):
    Image.new("RGBA", (56, 56), (255, 0, 0, 0)).save(tmp_path / "alpha.png")
    Image.new("L", (56, 56), 128).save(tmp_path / "gray.png")
    for name in ("alpha.png", "gray.png"):
        img = media.load_image(tmp_path / name, media.MediaBudget())
        assert img.mode == "RGB"
    assert media.load_image(tmp_path / "alpha.png", media.MediaBudget()).getpixel((0, 0)) == (255, 255, 255)


def test_missing_and_corrupt_images_raise_media_errors(tmp_path):
    with pytest.raises(MediaError, match="image file not found"):
        media.image_size(tmp_path / "nope.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(MediaError, match="unreadable image"):
        media.load_image(tmp_path / "bad.jpg", media.MediaBudget())


# ---------------------------------------------------------------- videos


@pytest.fixture
def restore_video_reader():
    """Tests that force a reader put qwen-vl-utils' choice back afterwards."""
    saved = qvu.FORCE_QWENVL_VIDEO_READER
    yield
    qvu.FORCE_QWENVL_VIDEO_READER = saved
    qvu.get_video_reader_backend.cache_clear()


def test_video_header():
    info = media.video_info(VIDEOS[0])
    assert info == media.VideoInfo(frames=16, fps=8.0, width=64, height=48)


@pytest.mark.parametrize("fps, frames", [(1.0, 2), (2.5, 4), (4.0, 8), (8.0, 16)])
def test_float_fps_samples_the_expected_frames(fps, frames, restore_video_reader):
    budget = media.MediaBudget(fps=fps, video_min_frames=2, video_min_pixels=4 * 28 * 28,
                               video_max_pixels=16 * 28 * 28)
    info = media.video_info(VIDEOS[0])
    indices = media.sampled_frame_indices(info, budget)
    assert len(indices) == frames
    assert indices[0] == 0 and indices[-1] == 15
    video, metadata = media.load_video(VIDEOS[0], budget)
    assert video.shape[0] == frames and video.dtype == torch.float32
    assert list(metadata["frames_indices"]) == indices
    indices_, gh, gw = media.video_grid(info, budget)
    assert tuple(video.shape[2:]) == (gh * 28, gw * 28)


def test_nframes_overrides_fps(restore_video_reader):
    budget = media.MediaBudget(nframes=6, fps=1.0)
    video, metadata = media.load_video(VIDEOS[1], budget)
    assert video.shape[0] == 6
    assert list(metadata["frames_indices"]) == [0, 3, 6, 9, 12, 15]
    assert media.video_tokens(media.video_info(VIDEOS[1]), budget) == 3 * (video.shape[2] // 28) * (
        video.shape[3] // 28)


def test_video_frame_pixel_budget():
    """``video_max_pixels`` caps each frame; ``video_min_pixels`` lifts small ones."""
    info = media.VideoInfo(frames=64, fps=8.0, width=1280, height=720)
    capped = media.MediaBudget(video_min_pixels=4 * 28 * 28, video_max_pixels=16 * 28 * 28)
    h, w = media.resized_frame_size(info, 16, capped)
    assert h * w <= 16 * 28 * 28 and h % 28 == 0 and w % 28 == 0 and w > h
    tiny = media.VideoInfo(frames=64, fps=8.0, width=32, height=24)
    lifted = media.MediaBudget(video_min_pixels=64 * 28 * 28, video_max_pixels=256 * 28 * 28)
    h, w = media.resized_frame_size(tiny, 16, lifted)
    assert h * w >= 64 * 28 * 28


@pytest.mark.parametrize("video", VIDEOS, ids=lambda p: p.stem)
@pytest.mark.parametrize("ele", [
    {"fps": 2.0, "min_frames": 4, "max_frames": 768},
    {"fps": 1.0, "min_frames": 2, "max_frames": 768},
    {"nframes": 6},
    {"fps": 4.0, "min_frames": 2, "max_frames": 768, "video_start": 0.5, "video_end": 1.5},
], ids=["fps2", "fps1", "nframes6", "range"])
def test_pyav_reader_matches_decord(video, ele):
    decord_video, decord_meta, decord_fps = qvu._read_video_decord({"video": str(video), **ele})
    pyav_video, pyav_meta, pyav_fps = video_readers.read_video_pyav({"video": str(video), **ele})
    assert pyav_meta["frames_indices"] == decord_meta["frames_indices"]
    assert pyav_meta["total_num_frames"] == decord_meta["total_num_frames"]
    assert pyav_meta["fps"] == pytest.approx(decord_meta["fps"])
    assert pyav_fps == pytest.approx(decord_fps)
    assert pyav_video.shape == decord_video.shape and pyav_video.dtype == decord_video.dtype
    diff = (pyav_video.float() - decord_video.float()).abs()
    assert diff.mean() < 2.0 and diff.max() < 40


def test_pyav_is_used_when_decord_is_absent(monkeypatch, restore_video_reader):
    real_find_spec = media.importlib.util.find_spec
    monkeypatch.setattr(media.importlib.util, "find_spec",
                        lambda name, *a: None if name == "decord" else real_find_spec(name, *a))
    assert media.video_backend() == "pyav"
    assert media.video_info(VIDEOS[0]) == media.VideoInfo(frames=16, fps=8.0, width=64, height=48)
    qvu.FORCE_QWENVL_VIDEO_READER = None
    budget = media.MediaBudget(fps=2.0, video_min_pixels=4 * 28 * 28, video_max_pixels=16 * 28 * 28)
    video, metadata = media.load_video(VIDEOS[0], budget)
    assert qvu.get_video_reader_backend() == "pyav"
    assert metadata["video_backend"] == "pyav"
    assert video.shape[0] == 4 and metadata["frames_indices"] == [0, 5, 10, 15]


def test_video_errors_name_the_real_cause(tmp_path, restore_video_reader):
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all" * 50)
    with pytest.raises(MediaError, match="video file not found"):
        media.video_info(tmp_path / "none.mp4")
    with pytest.raises(MediaError, match="unreadable video") as info:
        media.video_info(tmp_path / "bad.mp4")
    with pytest.raises(MediaError, match="unreadable video") as info:
        media.load_video(tmp_path / "bad.mp4", media.MediaBudget())
    # not qwen-vl-utils' fallback reader, torchvision.io.read_video, which no longer exists
    assert "read_video" not in str(info.value) and "bad.mp4" in str(info.value)


def test_budget_without_fps_uses_the_default_rate():
    budget = media.MediaBudget(fps=None)
    assert budget.video_element("x.mp4")["fps"] == qvu.FPS
    assert len(media.sampled_frame_indices(media.video_info(VIDEOS[0]), budget)) == 4


# ---------------------------------------------------------------- token counts from headers vs the processor


def _pads(processor, pad: str, **media_inputs) -> tuple[int, torch.Tensor]:
    """Pad tokens the processor writes for one image / video, and its grid."""
    encoded = processor(text=[VISION_START + pad + VISION_END], do_resize=False, do_sample_frames=False,
                        return_tensors="pt", **media_inputs)
    pad_id = processor.tokenizer.convert_tokens_to_ids(pad)
    grid = encoded["image_grid_thw" if pad == IMAGE_PAD else "video_grid_thw"]
    return int((encoded["input_ids"] == pad_id).sum()), grid


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_from_headers_equal_the_processor(pipeline, family):
    p = pipeline(family)
    for path in IMAGES:
        expected = media.image_tokens(*media.image_size(path), p.budget)
        pads, grid = _pads(p.processor, IMAGE_PAD, images=[media.load_image(path, p.budget)])
        assert pads == int(grid.prod()) // 4 == expected, path.name
        # the processor's own resizing of the upright image agrees too
        with Image.open(path) as raw:
            upright = media.ImageOps.exif_transpose(raw).convert("RGB")
        own = p.processor.image_processor(images=[upright], return_tensors="pt")["image_grid_thw"]
        assert int(own.prod()) // 4 == expected, path.name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampling", [{}, {"fps": 1.0, "video_min_frames": 2}, {"nframes": 8}])
def test_video_tokens_from_headers_equal_the_processor(pipeline, family, sampling):
    p = pipeline(family)
    budget = media.MediaBudget(**{**p.budget.__dict__, **sampling})
    for path in VIDEOS:
        expected = media.video_tokens(media.video_info(path), budget)
        frames, metadata = media.load_video(path, budget)
        pads, grid = _pads(p.processor, VIDEO_PAD, videos=[frames], video_metadata=[metadata])
        assert pads == int(grid.prod()) // 4 == expected, (path.name, sampling)
