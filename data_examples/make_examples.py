"""Regenerate data_examples/: shapes drawn with PIL, short clips written with PyAV, data.json (SFT),
preference.json (DPO), grpo.json (GRPO prompts with gold answers), documents.json (CPT) and grounding.json.

    python data_examples/make_examples.py

Deterministic; the committed files are this script's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).parent
COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20)}


def shape_image(shape: str, color: str, size=(96, 72), background=(250, 250, 250)) -> Image.Image:
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w * 0.25, h * 0.2, w * 0.75, h * 0.8)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(w * 0.5, h * 0.15), (w * 0.2, h * 0.85), (w * 0.8, h * 0.85)], fill=COLORS[color])
    return img


def ball_video(path: Path, color: str, direction: str, frames: int = 16, fps: int = 8, size=(64, 48)) -> None:
    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "28"}
        for i in range(frames):
            img = Image.new("RGB", size, (245, 245, 245))
            t = i / (frames - 1)
            x = 8 + (w - 16) * (t if direction == "right" else 1 - t)
            ImageDraw.Draw(img).ellipse((x - 7, h / 2 - 7, x + 7, h / 2 + 7), fill=COLORS[color])
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main() -> None:
    images = HERE / "images"
    videos = HERE / "videos"
    images.mkdir(exist_ok=True)
    videos.mkdir(exist_ok=True)
    for shape, color in [("circle", "red"), ("square", "blue"), ("triangle", "green"), ("circle", "yellow")]:
        shape_image(shape, color).save(images / f"{color}_{shape}.png")
    # A JPEG stored sideways with an EXIF orientation tag (6: rotate 90 degrees clockwise to view).
    upright = shape_image("triangle", "red", size=(72, 96))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(images / "red_triangle_rotated.jpg", exif=exif, quality=90)
    ball_video(videos / "ball_right.mp4", "yellow", "right")
    ball_video(videos / "ball_left.mp4", "blue", "left")

    records = [
        {"id": "single_red_circle", "image": "images/red_circle.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is in the picture?"},
            {"from": "gpt", "value": "A red circle."}]},
        {"id": "single_blue_square", "image": "images/blue_square.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is in the picture?"},
            {"from": "gpt", "value": "A blue square."}]},
        {"id": "single_green_triangle", "image": "images/green_triangle.png", "conversations": [
            {"from": "human", "value": "What color is the shape? <image>"},
            {"from": "gpt", "value": "The triangle is green."}]},
        {"id": "exif_rotated", "image": "images/red_triangle_rotated.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is in the picture?"},
            {"from": "gpt", "value": "A red triangle."}]},
        {"id": "two_images", "image": ["images/red_circle.png", "images/yellow_circle.png"], "conversations": [
            {"from": "human", "value": "Image 1: <image>\nImage 2: <image>\nWhat do the two images share?"},
            {"from": "gpt", "value": "Both show a circle; the first is red and the second is yellow."}]},
        {"id": "video_ball_right", "video": "videos/ball_right.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhere does the ball move?"},
            {"from": "gpt", "value": "The yellow ball moves from the left to the right."}]},
        {"id": "video_ball_left", "video": "videos/ball_left.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhere does the ball move?"},
            {"from": "gpt", "value": "The blue ball moves from the right to the left."}]},
        {"id": "image_and_video", "image": "images/yellow_circle.png", "video": "videos/ball_right.mp4",
         "conversations": [
            {"from": "human", "value": "<image>\nIs the ball in this video <video> the same color as this circle?"},
            {"from": "gpt", "value": "Yes, both are yellow."}]},
        {"id": "text_only", "conversations": [
            {"from": "human", "value": "How many sides does a triangle have?"},
            {"from": "gpt", "value": "Three."}]},
        {"id": "multi_turn", "image": "images/blue_square.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is this?"},
            {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "And what color is it?"},
            {"from": "gpt", "value": "It is blue."}]},
        {"id": "system_prompt", "image": "images/green_triangle.png", "conversations": [
            {"from": "system", "value": "Answer with one word."},
            {"from": "human", "value": "<image>\nName the shape."},
            {"from": "gpt", "value": "Triangle."}]},
        {"id": "text_multi_turn", "conversations": [
            {"from": "system", "value": "You are a geometry tutor."},
            {"from": "human", "value": "What is a square?"},
            {"from": "gpt", "value": "A shape with four equal sides and four right angles."},
            {"from": "human", "value": "And a circle?"},
            {"from": "gpt", "value": "All points at the same distance from the center."}]},
    ]
    (HERE / "data.json").write_text(json.dumps(records, indent=2) + "\n")
    (HERE / "preference.json").write_text(json.dumps(PREFERENCE, indent=2) + "\n")
    (HERE / "grpo.json").write_text(json.dumps(GRPO, indent=2) + "\n")
    (HERE / "documents.json").write_text(json.dumps(DOCUMENTS, indent=2) + "\n")
    grounding_examples()


DOCUMENTS = [  # continued pre-training: a text with its media, no chat
    {"id": "doc_caption", "image": "images/red_circle.png", "text": "A red circle on a white background."},
    {"id": "doc_interleaved", "image": ["images/blue_square.png", "images/green_triangle.png"],
     "text": "Shapes, chapter 1.\nA square has four equal sides:\n<image>\nA triangle has three sides:\n<image>\n"
             "Together they make a house."},
    {"id": "doc_video", "video": "videos/ball_right.mp4", "text": "<video>\nA yellow ball rolls from the left to "
                                                                "the right."},
    {"id": "doc_text", "text": "A circle is the set of points at the same distance from its center."},
    {"id": "doc_caption_square", "image": "images/blue_square.png", "text": "A blue square."},
    {"id": "doc_image_then_video", "image": "images/yellow_circle.png", "video": "videos/ball_left.mp4",
     "text": "The yellow ball <image> moves to the left: <video> The end."},
]


def human(text: str) -> dict:
    return {"from": "human", "value": text}


# Preference records (vlmtune dpo): the prompt turns, then the better and the worse reply to the last one.
# A reply is a string or a turn object.
PREFERENCE = [
    {"id": "pref_red_circle", "image": "images/red_circle.png",
     "conversations": [human("<image>\nWhat shape is in the picture?")],
     "chosen": "A red circle.", "rejected": "A blue square."},
    {"id": "pref_blue_square", "image": "images/blue_square.png",
     "conversations": [human("<image>\nWhat shape is in the picture?")],
     "chosen": "A blue square.", "rejected": "A green triangle."},
    {"id": "pref_green_triangle", "image": "images/green_triangle.png",
     "conversations": [human("What color is the shape? <image>")],
     "chosen": {"from": "gpt", "value": "The triangle is green."},
     "rejected": {"from": "gpt", "value": "The triangle is red."}},
    {"id": "pref_two_images", "image": ["images/red_circle.png", "images/yellow_circle.png"],
     "conversations": [human("Image 1: <image>\nImage 2: <image>\nWhat do the two images share?")],
     "chosen": "Both show a circle.", "rejected": "Both show a square."},
    {"id": "pref_video_right", "video": "videos/ball_right.mp4",
     "conversations": [human("<video>\nWhere does the ball move?")],
     "chosen": "From the left to the right.", "rejected": "From the right to the left."},
    {"id": "pref_video_left", "video": "videos/ball_left.mp4",
     "conversations": [human("<video>\nWhere does the ball move?")],
     "chosen": "From the right to the left.", "rejected": "From the left to the right."},
    {"id": "pref_image_and_video", "image": "images/yellow_circle.png", "video": "videos/ball_right.mp4",
     "conversations": [human("<image>\nIs the ball in this video <video> the same color as this circle?")],
     "chosen": "Yes, both are yellow.", "rejected": "No, the ball is blue."},
    {"id": "pref_text", "conversations": [human("How many sides does a triangle have?")],
     "chosen": "Three.", "rejected": "Four."},
    {"id": "pref_multi_turn", "image": "images/blue_square.png",
     "conversations": [human("<image>\nWhat shape is this?"), {"from": "gpt", "value": "A square."},
                       human("And what color is it?")],
     "chosen": "It is blue.", "rejected": "It is red."},
    {"id": "pref_system", "image": "images/green_triangle.png",
     "conversations": [{"from": "system", "value": "Answer with one word."}, human("<image>\nName the shape.")],
     "chosen": "Triangle.", "rejected": "Circle."},
]

# GRPO records (vlmtune grpo): the prompt turns, and the fields reward functions read: a gold 'answer', a 'box'
# ([x1, y1, x2, y2] in the image's pixels). A conversation that ends with a gpt turn has it as its answer.
GRPO = [
    {"id": "grpo_red_circle", "image": "images/red_circle.png",
     "conversations": [human("<image>\nWhat color is the shape? Answer with one word.")], "answer": "red"},
    {"id": "grpo_blue_square", "image": "images/blue_square.png",
     "conversations": [human("<image>\nWhat shape is it? Answer with one word.")], "answer": "square"},
    {"id": "grpo_green_triangle", "image": "images/green_triangle.png",
     "conversations": [human("What color is the shape? <image> Answer with one word.")], "answer": "green"},
    {"id": "grpo_triangle_sides", "conversations": [human("How many sides does a triangle have? Answer with a "
                                                          "number.")], "answer": "3"},
    {"id": "grpo_square_corners", "conversations": [human("How many corners does a square have?")], "answer": 4},
    {"id": "grpo_video_right", "video": "videos/ball_right.mp4",
     "conversations": [human("<video>\nDoes the ball move to the left or to the right?")], "answer": "right"},
    {"id": "grpo_video_left", "video": "videos/ball_left.mp4",
     "conversations": [human("<video>\nDoes the ball move to the left or to the right?")], "answer": "left"},
    {"id": "grpo_two_images", "image": ["images/red_circle.png", "images/yellow_circle.png"],
     "conversations": [human("Image 1: <image>\nImage 2: <image>\nHow many circles are there?")], "answer": "2"},
    {"id": "grpo_box", "image": "images/red_circle.png",
     "conversations": [human("<image>\nGive the bounding box of the circle as [x1, y1, x2, y2].")],
     "answer": "[24, 14, 72, 58]", "box": [24, 14, 72, 58]},
    {"id": "grpo_gpt_turn_answer", "image": "images/yellow_circle.png",
     "conversations": [human("<image>\nName the shape in one word."), {"from": "gpt", "value": "circle"}]},
]


def scene_image() -> Image.Image:
    """160x120: a blue square at (16, 20)-(64, 68) and a yellow circle in (96, 50)-(144, 98)."""
    img = Image.new("RGB", (160, 120), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.rectangle((16, 20, 63, 67), fill=COLORS["blue"])  # PIL's corners are inclusive: 48x48 pixels
    draw.ellipse((96, 50, 143, 97), fill=COLORS["yellow"])
    return img


def grounding_examples() -> None:
    """grounding.json: boxes in original-image pixels (each record says so with "box_format"), in the forms
    Qwen models write: JSON bbox_2d / point_2d and Qwen2-VL's box tokens; one EXIF-rotated image (its boxes are
    on the image as a viewer shows it) and one multi-image record ("box_image" names the image)."""
    scene_image().save(HERE / "images" / "scene.png")
    locate = "Locate {} in the image and give its bbox_2d in JSON."
    records = [
        # shape_image's box: (w * 0.25, h * 0.2, w * 0.75, h * 0.8) on 96x72
        {"id": "ground_red_circle", "image": "images/red_circle.png", "box_format": "pixel_original",
         "conversations": [
            {"from": "human", "value": "<image>\n" + locate.format("the red circle")},
            {"from": "gpt", "value": '{"bbox_2d": [24, 14, 72, 58], "label": "red circle"}'}]},
        {"id": "ground_scene", "image": "images/scene.png", "box_format": "pixel_original", "conversations": [
            {"from": "human", "value": "<image>\nLocate every shape and give their bbox_2d in JSON."},
            {"from": "gpt", "value": '[{"bbox_2d": [16, 20, 64, 68], "label": "blue square"}, '
                                     '{"bbox_2d": [96, 50, 144, 98], "label": "yellow circle"}]'}]},
        # stored sideways, shown 72x96: the triangle (36, 14.4), (14.4, 81.6), (57.6, 81.6)
        {"id": "ground_exif_rotated", "image": "images/red_triangle_rotated.jpg", "box_format": "pixel_original",
         "conversations": [
            {"from": "human", "value": "<image>\n" + locate.format("the triangle")},
            {"from": "gpt", "value": '{"bbox_2d": [14, 14, 58, 82], "label": "red triangle"}'}]},
        # Qwen2-VL's own form; the triangle (48, 10.8), (19.2, 61.2), (76.8, 61.2) on 96x72
        {"id": "ground_box_tokens", "image": "images/green_triangle.png", "box_format": "pixel_original",
         "conversations": [
            {"from": "human", "value": "<image>\nWhere is the green triangle?"},
            {"from": "gpt", "value": "<|object_ref_start|>the green triangle<|object_ref_end|>"
                                     "<|box_start|>(19,11),(77,61)<|box_end|>"}]},
        {"id": "ground_point", "image": "images/yellow_circle.png", "box_format": "pixel_original",
         "conversations": [
            {"from": "human", "value": "<image>\nPoint at the center of the circle (point_2d in JSON)."},
            {"from": "gpt", "value": '{"point_2d": [48, 36], "label": "circle center"}'}]},
        {"id": "ground_second_image", "image": ["images/red_circle.png", "images/scene.png"],
         "box_format": "pixel_original", "box_image": 2, "conversations": [
            {"from": "human", "value": "Image 1: <image>\nImage 2: <image>\n"
                                       "Locate the yellow circle of image 2 (bbox_2d in JSON)."},
            {"from": "gpt", "value": '{"bbox_2d": [96, 50, 144, 98], "label": "yellow circle"}'}]},
    ]
    (HERE / "grounding.json").write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
