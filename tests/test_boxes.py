"""Grounding boxes in text: the forms found, checks against the image, conversions against hand computations
(and Qwen's published conversion formulas, qwen-vl-finetune/tools/process_bbox.ipynb)."""

from __future__ import annotations

import pytest

from vlmtune.data import boxes as B

# A 640x428 image (COCO_train2014_000000580957 in Qwen's notebook); smart_resize(428, 640) with factor 28 and the
# default budget keeps round(428/28)*28 = 420 rows and round(640/28)*28 = 644 columns.
COCO = B.Geometry(640, 428, 644, 420)


def test_finds_box_tokens_and_json_keys_in_order():
    text = ('A cat <|box_start|>( 10 , 20 ),(30,40)<|box_end|> and ```json\n'
            '[{"bbox_2d": [1, 2.5, 3, 4], "label": "dog"}, {"point_2d": [5,6]}]\n```')
    found, problems = B.find_boxes(text)
    assert problems == []
    assert [(b.kind, b.coords, b.form) for b in found] == [
        ("bbox", (10, 20, 30, 40), "box_tokens"), ("bbox", (1, 2.5, 3, 4), "json"), ("point", (5, 6), "json")]


@pytest.mark.parametrize("text", [
    '"bbox_2d": [1, 2, 3]',
    '"bbox_2d": [1, 2, "x", 4]',
    '"point_2d": [1, 2',
    "<|box_start|>(1,2)<|box_end|>",
    "<|box_start|>(1,2),(3,4)",
])
def test_unparseable_boxes_are_problems(text):
    found, problems = B.find_boxes(text)
    assert found == [] and len(problems) == 1


def test_qwen2vl_conversion_matches_qwens_formula():
    # convert_to_qwen2vl_format([146, 137, 615, 415], 428, 640): round(x / w * 1000), round(y / h * 1000)
    assert B.convert((146, 137, 615, 415), "pixel_original", "norm1000", COCO) == (228, 320, 961, 970)


def test_qwen25vl_conversion_matches_qwens_formula():
    # convert_to_qwen25vl_format: round(x * 644 / 640), round(y * 420 / 428): 146.9 134.4 618.8 407.2
    assert B.convert((146, 137, 615, 415), "pixel_original", "pixel_resized", COCO) == (147, 134, 619, 407)


def test_conversions_round_trip_and_clamp():
    g = B.Geometry(200, 100, 112, 56)
    assert B.convert((50, 25), "pixel_original", "norm1", g) == (0.25, 0.25)
    assert B.convert((0.25, 0.25, 1.0, 1.0), "norm1", "pixel_original", g) == (50, 25, 199, 99)  # clamp size-1
    assert B.convert((500, 500, 1000, 1000), "norm1000", "pixel_resized", g) == (56, 28, 111, 55)
    assert B.convert((56, 28), "pixel_resized", "pixel_original", g, rounded=False) == (100.0, 50.0)


def test_problems_name_what_is_wrong():
    g = B.Geometry(100, 50, 112, 56)
    box = B.find_boxes('"bbox_2d": [30, 10, 20, 40]')[0][0]
    assert "x2 < x1" in B.problem_with(box, "pixel_original", g)
    box = B.find_boxes('"bbox_2d": [10, 10, 20, 60]')[0][0]
    assert "outside the image (100x50 px" in B.problem_with(box, "pixel_original", g)
    assert "outside the resized image (112x56 px" in B.problem_with(box, "pixel_resized", g)
    box = B.find_boxes('"bbox_2d": [10, 10, 20, 1001]')[0][0]
    assert "outside the range" in B.problem_with(box, "norm1000", g)
    assert B.problem_with(B.find_boxes('"point_2d": [100, 50]')[0][0], "pixel_original", g) is None


def test_convert_texts_rewrites_only_the_numbers():
    texts = ["<image>\nWhere is the cat?", 'Here: {"bbox_2d": [146, 137, 615, 415], "label": "cat"}.']
    new, found, problems = B.convert_texts(texts, "pixel_original", "norm1000", [COCO])
    assert problems == []
    assert new == [texts[0], 'Here: {"bbox_2d": [228, 320, 961, 970], "label": "cat"}.']
    assert [(c.message, c.source, c.converted, c.image) for c in found] == [
        (1, (146, 137, 615, 415), (228, 320, 961, 970), 0)]


def test_multi_image_records_say_which_image():
    other = B.Geometry(320, 214, 336, 224)
    texts = ["<image><image>", '<|box_start|>(10,10),(20,20)<|box_end|> <|box_start|>(1,1),(2,2)<|box_end|>']
    _, _, problems = B.convert_texts(texts, "pixel_original", "norm1000", [COCO, other])
    assert "box_image" in problems[0]
    new, found, problems = B.convert_texts(texts, "pixel_original", "norm1000", [COCO, other], [2, 1])
    assert problems == [] and [c.image for c in found] == [1, 0]
    # (10, 10, 20, 20) on the 320x214 image: 31, 47, 62, 93; (1, 1, 2, 2) on 640x428: 2, 2, 3, 5
    assert new[1] == "<|box_start|>(31,47),(62,93)<|box_end|> <|box_start|>(2,2),(3,5)<|box_end|>"
    # images of one geometry need no box_image
    assert B.convert_texts(texts, "pixel_original", "norm1000", [COCO, COCO])[2] == []
    assert "not an image" in B.convert_texts(texts, "pixel_original", "norm1000", [COCO, other], 3)[2][0]


def test_a_bad_box_leaves_the_texts_unchanged():
    texts = ['{"bbox_2d": [10, 10, 20, 20]} {"bbox_2d": [700, 10, 720, 20]}']
    new, _, problems = B.convert_texts(texts, "pixel_original", "norm1000", [COCO])
    assert new == texts and len(problems) == 1 and "outside the image" in problems[0]


def test_box_iou():
    assert B.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert B.box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert B.box_iou((0, 0, 10, 10), (0, 0, 5, 10)) == 0.5
    assert B.box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
