"""Grounding boxes in text: find them, check them against their image, and convert between conventions.

Forms recognised (anywhere in a message):

* Qwen2-VL's box tokens: ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` (spaces allowed around the numbers);
* JSON keys as Qwen2.5-VL / Qwen3-VL write them in replies: ``"bbox_2d": [x1, y1, x2, y2]`` and
  ``"point_2d": [x, y]`` (inside a JSON object, a list of them, or a fenced code block; only the key and its
  list are read, so the surrounding JSON need not parse).

Conventions (``FORMATS``), all with the origin at the top-left corner, x to the right, y down:

* ``pixel_original``: pixels of the image as a viewer shows it, i.e. after its EXIF orientation is applied;
* ``pixel_resized``: pixels of the image the model receives (EXIF applied, then resized under the pixel budget);
* ``norm1000``: 0..1000 of the image's width and height;
* ``norm1``: 0..1 of the image's width and height.

Resizing scales the whole image (no crop, no pad), so normalised coordinates are the same on the original
and the resized image; only ``pixel_*`` conventions need the two sizes. Each family's convention is
``Family.box_format`` (see ``vlmtune/families``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FORMATS = ("pixel_original", "pixel_resized", "norm1000", "norm1")
BOX_START = "<|box_start|>"
BOX_END = "<|box_end|>"

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_TOKENS = re.compile(
    re.escape(BOX_START) + rf"\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*"
    + re.escape(BOX_END)
)
_BOX_TOKENS_LOOSE = re.compile(re.escape(BOX_START) + r"(.*?)(?:" + re.escape(BOX_END) + "|$)", re.S)
_JSON_KEY = re.compile(r'"(bbox_2d|point_2d)"\s*:\s*(\[[^\]\[]*\]?)')
_NUM_RE = re.compile(_NUM)


@dataclass(frozen=True)
class Box:
    """A box (``x1, y1, x2, y2``) or a point (``x, y``) found in a text, with where its numbers are."""

    kind: str  # "bbox" | "point"
    coords: tuple[float, ...]
    spans: tuple[tuple[int, int], ...]  # [start, end) of each number in the text
    form: str  # "box_tokens" | "json"

    @property
    def start(self) -> int:
        return self.spans[0][0]


@dataclass(frozen=True)
class Geometry:
    """One image as the pipeline sees it: its size after EXIF orientation, and after resizing."""

    width: int
    height: int
    resized_width: int
    resized_height: int

    def size(self, fmt: str) -> tuple[float, float]:
        """Width and height of the coordinate frame of ``fmt``."""
        if fmt == "pixel_original":
            return self.width, self.height
        if fmt == "pixel_resized":
            return self.resized_width, self.resized_height
        if fmt == "norm1000":
            return 1000.0, 1000.0
        if fmt == "norm1":
            return 1.0, 1.0
        raise ValueError(f"unknown box format {fmt!r}; use one of {', '.join(FORMATS)}")


def has_box_markers(text: str) -> bool:
    """Whether a text has something that looks like a box (parsed or not)."""
    return BOX_START in text or '"bbox_2d"' in text or '"point_2d"' in text


def find_boxes(text: str) -> tuple[list[Box], list[str]]:
    """Every box and point in ``text`` in order, and a message for each marker whose numbers do not parse."""
    boxes: list[Box] = []
    problems: list[str] = []
    parsed_at: set[int] = set()
    for m in _BOX_TOKENS.finditer(text):
        spans = tuple(m.span(i) for i in range(1, 5))
        boxes.append(Box("bbox", tuple(float(m.group(i)) for i in range(1, 5)), spans, "box_tokens"))
        parsed_at.add(m.start())
    for m in _BOX_TOKENS_LOOSE.finditer(text):
        if m.start() not in parsed_at:
            problems.append(f"unparseable box {text[m.start():m.end()][:60]!r}; write "
                            f"{BOX_START}(x1,y1),(x2,y2){BOX_END}")
    for m in _JSON_KEY.finditer(text):
        key, body = m.group(1), m.group(2)
        want = 4 if key == "bbox_2d" else 2
        inner = body[1:-1] if body.endswith("]") else None
        items = [s.strip() for s in inner.split(",")] if inner is not None else []
        if inner is None or len(items) != want or not all(_NUM_RE.fullmatch(s) for s in items):
            problems.append(f'unparseable "{key}": {body[:60]}; write {want} numbers in a list')
            continue
        offset = m.start(2) + 1
        spans = []
        for num in _NUM_RE.finditer(inner):
            spans.append((offset + num.start(), offset + num.end()))
        coords = tuple(float(s) for s in items)
        boxes.append(Box("bbox" if key == "bbox_2d" else "point", coords, tuple(spans), "json"))
    boxes.sort(key=lambda b: b.start)
    return boxes, problems


def problem_with(box: Box, fmt: str, geometry: Geometry) -> str | None:
    """Why ``box`` is not a valid box in ``fmt`` on this image (None when it is)."""
    width, height = geometry.size(fmt)
    xs, ys = box.coords[0::2], box.coords[1::2]
    shown = ", ".join(f"{c:g}" for c in box.coords)
    if box.kind == "bbox" and (xs[1] < xs[0] or ys[1] < ys[0]):
        return f"box [{shown}] has x2 < x1 or y2 < y1; write [x1, y1, x2, y2] with the top-left corner first"
    if min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height:
        frame = f"{width:g}x{height:g}" + (" px" if fmt.startswith("pixel") else "")
        where = {"pixel_original": "the image", "pixel_resized": "the resized image"}.get(fmt, "the range")
        return (f"{box.kind} [{shown}] lies outside {where} ({frame}, --box_format {fmt}); "
                "check the coordinates and the box format")
    return None


def convert(coords: tuple[float, ...], src: str, dst: str, geometry: Geometry, *, rounded: bool = True
            ) -> tuple[float, ...]:
    """Coordinates from convention ``src`` to ``dst`` on one image.

    Integer conventions (pixels, norm1000) are rounded when ``rounded``; results are clamped to the frame
    (pixels to ``size - 1`` as Qwen's own conversion does, norm1000 to 1000, norm1 to 1)."""
    sw, sh = geometry.size(src)
    dw, dh = geometry.size(dst)
    out = []
    for i, c in enumerate(coords):
        scale, limit = (dw / sw, dw) if i % 2 == 0 else (dh / sh, dh)
        value = c * scale
        if dst.startswith("pixel"):
            limit = limit - 1
        if rounded and dst != "norm1":
            value = float(round(value))
        elif dst == "norm1":
            value = round(value, 4)
        out.append(min(max(value, 0.0), float(limit)))
    return tuple(out)


def _format_number(value: float, fmt: str) -> str:
    if fmt == "norm1":
        return f"{value:.4f}".rstrip("0").rstrip(".") or "0"
    return str(int(round(value)))


def rewrite(text: str, boxes: list[Box], new_coords: list[tuple[float, ...]], fmt: str) -> str:
    """``text`` with each box's numbers replaced by ``new_coords`` (formatting around them kept)."""
    pieces = []
    last = 0
    replacements = sorted((span, value) for box, coords in zip(boxes, new_coords)
                          for span, value in zip(box.spans, coords))
    for (start, end), value in replacements:
        pieces.append(text[last:start])
        pieces.append(_format_number(value, fmt))
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two ``x1, y1, x2, y2`` boxes in the same frame (0 for empty ones)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def image_of_boxes(n_boxes: int, geometries: list[Geometry], box_image: int | list[int] | None) -> list[int] | str:
    """0-based image index of each box in a record, or the reason it cannot be told.

    ``box_image`` (1-based, from the record) is one image for every box, or one entry per box in order. Without
    it a record with one image, or with images that all have the same geometry, needs none."""
    n_images = len(geometries)
    if n_images == 0:
        return f"{n_boxes} box(es) in a record without images; boxes need the image they refer to"
    if box_image is None:
        if len(set(geometries)) == 1:
            return [0] * n_boxes
        return (f"{n_boxes} box(es) in a record with {n_images} images of different sizes; add \"box_image\": N "
                "(1-based) to the record, or a list with one N per box in order")
    indices = [box_image] * n_boxes if isinstance(box_image, int) else list(box_image)
    if len(indices) != n_boxes:
        return f"\"box_image\" lists {len(indices)} image(s) for {n_boxes} box(es); give one per box, in order"
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= n_images]
    if bad:
        return f"\"box_image\" {bad[0]!r} is not an image of the record (1..{n_images})"
    return [i - 1 for i in indices]


@dataclass(frozen=True)
class Converted:
    """One box of a record: where it was, its coordinates as written and as converted, and its image."""

    message: int
    box: Box
    source: tuple[float, ...]
    converted: tuple[float, ...]
    image: int
    geometry: Geometry


def convert_texts(texts: list[str], src: str, dst: str, geometries: list[Geometry],
                  box_image: int | list[int] | None = None) -> tuple[list[str], list[Converted], list[str]]:
    """Convert every box in a record's message texts from ``src`` to ``dst``.

    Returns the new texts, the boxes found (in order), and problems (unparseable, outside the image, x2 < x1,
    no image to refer to). With any problem the texts come back unchanged."""
    found: list[tuple[int, Box]] = []
    problems: list[str] = []
    for i, text in enumerate(texts):
        boxes, bad = find_boxes(text)
        found += [(i, b) for b in boxes]
        problems += bad
    if not found:
        return texts, [], problems
    images = image_of_boxes(len(found), geometries, box_image)
    if isinstance(images, str):
        return texts, [], problems + [images]
    converted = []
    for (i, box), image in zip(found, images):
        problem = problem_with(box, src, geometries[image])
        if problem:
            problems.append(problem)
            continue
        geometry = geometries[image]
        converted.append(Converted(i, box, box.coords, convert(box.coords, src, dst, geometry), image, geometry))
    if problems:
        return texts, converted, problems
    new_texts = list(texts)
    for i in range(len(texts)):
        mine = [c for c in converted if c.message == i]
        if mine:
            new_texts[i] = rewrite(texts[i], [c.box for c in mine], [c.converted for c in mine], dst)
    return new_texts, converted, problems
