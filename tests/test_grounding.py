"""Grounding boxes through the real pipeline, for every family: an annotation on an EXIF-rotated image goes
through loading, conversion and the dataset; the converted box must cover the same pixels as the rectangle
found in the pixel tensor the model receives. Also: bad boxes are errors naming the record, check-data lists
the boxes, and predict draws them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import EXAMPLES
from PIL import Image, ImageOps

from vlmtune.cli import main as cli
from vlmtune.data import media
from vlmtune.data.check import check_data
from vlmtune.data.conversation import Conversation
from vlmtune.data.dataset import VisionLanguageDataset
from vlmtune.data.records import load_records
from vlmtune.errors import DataError
from vlmtune.families import FAMILIES
from vlmtune.model.load import load_family, load_processor

RAW_SIZE = (400, 240)  # stored sideways: 96,000 pixels, more than the tiny processors' budget, so it shrinks
RAW_RECT = (60, 40, 220, 140)  # [x1, x2) x [y1, y2) in the stored pixels
# EXIF orientation 6 shows the stored image turned 90 degrees clockwise: stored (x, y) is shown at (H - 1 - y, x),
# so the rectangle is shown at x in [240 - 140, 240 - 40), y in [60, 220): the box a user annotates.
SHOWN_BOX = [100, 60, 200, 220]


def exif_image(path):
    pixels = np.full((RAW_SIZE[1], RAW_SIZE[0], 3), 255, np.uint8)
    x1, y1, x2, y2 = RAW_RECT
    pixels[y1:y2, x1:x2] = (220, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif)
    return path


def image_from_pixel_values(pixel_values: torch.Tensor, grid_thw, patch: int, merge: int = 2) -> torch.Tensor:
    """(C, H, W) back from the processor's flat patches. Its layout (transformers' Qwen2VLImageProcessor.patchify):
    rows ordered (h block, w block, h in block, w in block), each row (channel, time, patch row, patch col)."""
    _, gh, gw = (int(v) for v in grid_thw)
    channels = pixel_values.shape[1] // (2 * patch * patch)
    x = pixel_values.reshape(gh // merge, gw // merge, merge, merge, channels, 2, patch, patch)[:, :, :, :, :, 0]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, gh * patch, gw * patch)


def rectangle_in(image: torch.Tensor) -> tuple[int, int, int, int]:
    """[x1, y1, x2, y2) of the red rectangle: where the green channel is low (white around it)."""
    green = image[1]
    mask = green < (green.max() + green.min()) / 2
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union


def test_the_shown_box_is_where_pil_shows_the_rectangle(tmp_path):
    """The hand-computed annotation agrees with PIL's own EXIF transpose of the file."""
    with Image.open(exif_image(tmp_path / "r.png")) as img:
        shown = np.asarray(ImageOps.exif_transpose(img))
    ys, xs = np.nonzero(shown[:, :, 1] < 128)
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == SHOWN_BOX


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("form", ["json", "box_tokens"])
def test_converted_box_covers_the_rectangle_the_model_sees(family, form, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir(family)
    fam = load_family(str(model_dir))
    processor = load_processor(str(model_dir))
    budget = media.budget_from_processor(processor, fam.factor)
    x1, y1, x2, y2 = SHOWN_BOX
    reply = (f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "box"}}' if form == "json"
             else f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "rect", "image": str(exif_image(tmp_path / "rect.png")),
                                 "conversations": [{"from": "human", "value": "<image>\nWhere is the box?"},
                                                   {"from": "gpt", "value": reply}]}]))
    result = check_data(str(data), processor, fam, budget, box_format="pixel_original")
    assert not result.errors
    (record,) = result.records
    item = VisionLanguageDataset([record], processor, fam, budget, Conversation(processor))[0]

    seen = image_from_pixel_values(item["pixel_values"], item["image_grid_thw"][0], fam.patch_size)
    height, width = seen.shape[1:]
    assert width * height < RAW_SIZE[0] * RAW_SIZE[1] and height > width  # resized, and upright
    target = rectangle_in(seen)

    text = record.messages[-1].text.replace("bbox_2d", "")
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", text)]
    assert len(numbers) == 4
    if fam.box_format == "pixel_resized":
        box = numbers
    else:
        assert fam.box_format == "norm1000"
        box = [numbers[0] * width / 1000, numbers[1] * height / 1000,
               numbers[2] * width / 1000, numbers[3] * height / 1000]
    assert iou(box, target) >= 0.95, (family, record.messages[-1].text, box, target, (width, height))


def test_declared_boxes_that_do_not_fit_are_errors_naming_the_record(tiny_model_dir, tmp_path):
    processor = load_processor(str(tiny_model_dir("qwen2_vl")))
    fam = FAMILIES["qwen2_vl"]
    budget = media.budget_from_processor(processor, fam.factor)
    image = str(EXAMPLES / "images" / "red_circle.png")  # 96x72

    def rec(rid, reply, **extra):
        return {"id": rid, "image": image, **extra, "conversations": [
            {"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": reply}]}

    data = tmp_path / "bad.json"
    data.write_text(json.dumps([
        rec("outside", '{"bbox_2d": [10, 10, 100, 50]}'),
        rec("swapped", '{"bbox_2d": [50, 10, 20, 40]}'),
        rec("broken", '{"bbox_2d": [1, 2, 3]}'),
        rec("fine_norm", '{"bbox_2d": [100, 100, 900, 900]}', box_format="norm1000"),
        rec("bad_format", '{"bbox_2d": [1, 2, 3, 4]}', box_format="pixels"),
    ]))
    result = check_data(str(data), processor, fam, budget, box_format="pixel_original")
    errors = {p.id: p.message for p in result.errors}
    assert set(errors) == {"outside", "swapped", "broken", "bad_format"}
    assert "outside the image (96x72 px, --box_format pixel_original)" in errors["outside"]
    assert "x2 < x1" in errors["swapped"]
    assert 'unparseable "bbox_2d"' in errors["broken"]
    assert "'box_format' 'pixels' is not one of" in errors["bad_format"]
    with pytest.raises(DataError, match=r"record 0 \(id 'outside'\)"):
        load_records(data, budget=budget, min_image_side=fam.factor, box_target=fam.box_format,
                     box_format="pixel_original")
    # undeclared boxes are used as written, with one warning
    result = check_data(str(data), processor, fam, budget)
    warnings = [p.message for p in result.problems if p.level == "warning"]
    assert any("hold boxes but declare no box format" in w for w in warnings)


def test_check_data_lists_the_boxes_it_converted(tiny_model_dir, capsys):
    assert cli(["check-data", str(EXAMPLES / "grounding.json"), "--model", str(tiny_model_dir("qwen2_vl"))]) == 0
    out = capsys.readouterr().out
    assert "boxes: 7 in 6 record(s), converted to norm1000" in out
    # 24 / 96 * 1000 = 250, 14 / 72 * 1000 = 194.4, 72 / 96 * 1000 = 750, 58 / 72 * 1000 = 805.6
    assert "ground_red_circle: [24, 14, 72, 58] -> [250, 194, 750, 806] (image 1: 96x72 px" in out
    # the EXIF-rotated JPEG is 72x96 as shown; the multi-image record's box is on image 2 (scene.png, 160x120)
    assert "ground_exif_rotated: [14, 14, 58, 82] -> [194, 146, 806, 854] (image 1: 72x96 px" in out
    assert "ground_second_image: [96, 50, 144, 98] -> [600, 417, 900, 817] (image 2: 160x120 px" in out


def test_predict_converts_reply_boxes_to_original_pixels_and_draws_them(tiny_model_dir, tmp_path, capsys,
                                                                        monkeypatch):
    from vlmtune import generation

    # The tiny model writes no boxes; its reply is replaced by one in the family's convention (Qwen2.5-VL: pixels
    # of the resized image). The 400x240 sideways file is shown 240x400 and resized to 168x280 (smart_resize
    # under 64 tokens of 28 px: floor(400 / 1.383 / 28) * 28 = 280 rows, floor(240 / 1.383 / 28) * 28 = 168).
    monkeypatch.setattr(generation.Predictor, "reply", lambda self, record: '{"bbox_2d": [70, 42, 140, 154]}')
    image = exif_image(tmp_path / "r.png")
    out = tmp_path / "drawn.png"
    assert cli(["predict", "--model", str(tiny_model_dir("qwen2_5_vl")), "--image", str(image), "--prompt",
                "Where is the box?", "--draw", str(out)]) == 0
    printed = capsys.readouterr().out
    # back to shown pixels: x * 240 / 168, y * 400 / 280 -> 100, 60, 200, 220
    assert "bbox in original pixels: [100, 60, 200, 220]" in printed
    with Image.open(out) as img:
        assert img.size == (240, 400)
        drawn = np.asarray(img.convert("RGB"))
    assert tuple(drawn[140, 100]) == (255, 0, 255)  # the left edge of the box, on the upright image
    assert tuple(drawn[140, 150]) == (220, 0, 0)  # inside: the rectangle itself, untouched


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eval_scores_boxes_in_original_pixels(family, tiny_model_dir):
    """grounding.json through loading (converted to the family's convention) and back: replies equal to the
    converted references score IoU 1, their boxes land on the annotation in original pixels (within rounding),
    and a reply shifted by half a box width scores 1/3."""
    from vlmtune.generation import reference_of, score

    model_dir = tiny_model_dir(family)
    fam = load_family(str(model_dir))
    budget = media.budget_from_processor(load_processor(str(model_dir)), fam.factor)
    records = load_records(EXAMPLES / "grounding.json", budget=budget, min_image_side=fam.factor,
                           box_target=fam.box_format, box_format=None)
    replies = [reference_of(r) for r in records]
    scores = score(records, replies, fam, budget)
    assert list(scores.summary) == ["iou", "acc@0.5"]
    assert scores.summary["iou"]["n"] == 5  # the point record has no box to compare
    assert scores.summary["iou"]["score"] == pytest.approx(1.0)
    raw = {r["id"]: r for r in json.loads((EXAMPLES / "grounding.json").read_text())}
    for record, found in zip(records, scores.pred_boxes):
        written = [float(v) for v in re.findall(r"\d+", raw[record.id]["conversations"][-1]["value"].replace(
            "bbox_2d", "").replace("point_2d", ""))]
        back = [c for b in found for c in b["coords"]]
        assert back == pytest.approx(written, abs=1.0), record.id  # one pixel of the model's grid, at most

    # the red circle's box [24, 14, 72, 58] moved right by 24 px to [48, 14, 96, 58]: IoU 24 x 44 / (2 x 48 x 44 -
    # 24 x 44) = 1/3, written in the family's convention by hand
    circle = records[0]
    assert circle.id == "ground_red_circle"
    g = circle.boxes[0].geometry
    if fam.box_format == "pixel_resized":
        sx, sy = g.resized_width / 96, g.resized_height / 72
        moved = f'{{"bbox_2d": [{round(48 * sx)}, {round(14 * sy)}, {round(96 * sx)}, {round(58 * sy)}]}}'
    else:
        moved = '{"bbox_2d": [500, 194, 1000, 806]}'
    per = score([circle], [moved], fam, budget).per_record[0]
    assert per["iou"] == pytest.approx(1 / 3, abs=0.03) and per["acc@0.5"] == 0.0
