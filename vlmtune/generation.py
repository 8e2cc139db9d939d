"""Generation with the training prompt path, for predict, eval and evaluation during training, and sampling
(``sample_group``: several completions of a prompt in one ``generate`` call) for GRPO, on-policy distillation
and ``vlmtune sample``.

The prompt goes through the same path as training data: a ``Record`` with ``<image>`` / ``<video>``
placeholders, the family's chat template (with the generation prompt appended), media decoded under the
same pixel and frame budgets, and the processor call of ``VisionLanguageDataset``. So the model sees at
inference exactly the token layout it saw in training. Batches are padded on the left, as generation needs.

``predict``, ``evaluate`` and the training stages all import this module; none of them imports another.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vlmtune import metrics as M
from vlmtune import run
from vlmtune.config import DEFAULT_MAX_NEW_TOKENS
from vlmtune.data import boxes, media
from vlmtune.data.collator import SEQUENCE_KEYS, Collator
from vlmtune.data.conversation import PromptConversation
from vlmtune.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Message, Record
from vlmtune.errors import ConfigError
from vlmtune.families import Family
from vlmtune.families.base import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

logger = logging.getLogger(__name__)

VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
"""Never sampled: a completion with one of them would claim pixels the batch does not have."""


def prompt_record(prompt: str, images: list[str] | None = None, videos: list[str] | None = None,
                  system: str | None = None, record_id: str = "prompt") -> Record:
    """A one-turn ``Record`` from a prompt: without placeholders the images, then the videos, go before the text
    (as in LLaVA data); with placeholders their counts must match the files given."""
    images, videos = list(images or []), list(videos or [])
    n_img, n_vid = prompt.count(IMAGE_PLACEHOLDER), prompt.count(VIDEO_PLACEHOLDER)
    if n_img == n_vid == 0:
        prompt = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images) + "".join(
            f"{VIDEO_PLACEHOLDER}\n" for _ in videos) + prompt
    elif (n_img, n_vid) != (len(images), len(videos)):
        raise ConfigError(f"the prompt has {n_img} {IMAGE_PLACEHOLDER} and {n_vid} {VIDEO_PLACEHOLDER} "
                          f"placeholder(s) but {len(images)} --image and {len(videos)} --video were given")
    messages = ([Message("system", system)] if system else []) + [Message("user", prompt)]
    return Record(0, record_id, messages, [str(p) for p in images], [str(p) for p in videos])


def prompt_of(record: Record) -> Record:
    """A data record up to (without) its last assistant reply: the prompt the reply answers."""
    last = max(i for i, m in enumerate(record.messages) if m.role == "assistant")
    return dataclasses.replace(record, messages=record.messages[:last])


def reference_of(record: Record) -> str:
    """The last assistant reply of a data record."""
    return next(m.text for m in reversed(record.messages) if m.role == "assistant")


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A right-padded batch (``Collator``) with each row's tokens moved to the right end, padding first."""
    lengths = batch["attention_mask"].sum(dim=1)
    width = batch["input_ids"].shape[1]
    for key in SEQUENCE_KEYS:
        if key in batch:
            batch[key] = torch.stack([row.roll(int(width - n)) for row, n in zip(batch[key], lengths)])
    return batch


def on_model(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """A batch on ``model``'s device, its pixels in the model's floating dtype."""
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in batch:
            batch[key] = batch[key].to(dtype)
    return batch


# ---------------------------------------------------------------- sampling (GRPO, on-policy distillation, sample)


def eos_ids(model, tokenizer) -> list[int]:
    """The tokens that end a completion: the generation config's, else the tokenizer's end of sequence."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside a PEFT wrapper
    eos = getattr(inner.generation_config, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return eos or [tokenizer.eos_token_id]


def cut_before(row: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """A completion up to (not including) its first token among ``token_ids`` (vLLM samples vision tokens too)."""
    found = torch.isin(row, torch.tensor(token_ids, device=row.device)).nonzero()
    return row[: int(found[0])] if len(found) else row


def cut_at_eos(row: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """A completion up to and including its first end token (all of it when it has none)."""
    ends = torch.isin(row, torch.tensor(eos, device=row.device)).nonzero()
    return row[: int(ends[0]) + 1] if len(ends) else row


@torch.no_grad()
def sample_group(model, batch: dict[str, torch.Tensor], eos: list[int], pad_id: int, suppressed: list[int],
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, repeat: int = 1,
                 decode: Callable | None = None) -> list[torch.Tensor]:
    """``repeat`` sampled completions per row of ``batch`` (a row's consecutive, row by row), in one ``generate``
    call, each cut after its first token of ``eos``; the tokens ``suppressed`` are never sampled. Rows of several
    lengths go padded on the left (``left_padded``); a prompt repeated by ``repeat`` rather than by rows of the
    batch has its images and videos encoded once (transformers repeats their features). The random draws are
    torch's global generator's (seed it for repeatable samples). ``decode(model, batch, repeat, **generate_kwargs)``:
    a stand-in for ``generate`` that returns the tokens after the prompt (GRPO's ``group_decoding.sample_groups``)."""
    batch = {k: v for k, v in batch.items() if k != "labels"}
    prompt_length = batch["input_ids"].shape[1]
    kwargs = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens,
              "eos_token_id": eos, "pad_token_id": pad_id, "suppress_tokens": suppressed}
    if decode is not None:
        new = decode(model, batch, repeat, **kwargs)
    else:
        new = model.generate(**batch, do_sample=True, use_cache=True, num_return_sequences=repeat,
                             **kwargs)[:, prompt_length:]
    return [cut_at_eos(row, eos) for row in new]


class Progress:
    """A progress bar with ETA on a terminal; a plain line every tenth of the way otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "records"):
        self.total, self.desc, self.done, self.unit = total, desc, 0, unit
        self.start = time.perf_counter()
        self.bar = None
        self.next_line = max(1, total // 10)
        self.enabled = enabled and total > 0
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=" " + unit, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (self.done >= self.next_line or self.done == self.total):
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.done * (self.total - self.done)
            logger.info("%s: %d/%d %s, %s elapsed, ETA %s", self.desc, self.done, self.total, self.unit,
                        format_duration(elapsed), format_duration(eta))
            self.next_line = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_duration(seconds: float) -> str:
    """``42s``, ``3m07s`` or ``2h05m``: a duration for the console (progress lines, a run's summary)."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Predictor:
    """A loaded model, its processor and budgets; ``reply(record)`` / ``replies(records)`` generate the
    assistant's next turn."""

    def __init__(self, model, processor, family: Family, budget: media.MediaBudget,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0, source: str = "",
                 enable_thinking: bool | None = None):
        self.model = model
        self.processor = processor
        self.family = family
        self.budget = budget
        self.conversation = PromptConversation(processor, enable_thinking=enable_thinking)
        self.collate = Collator(processor.tokenizer.pad_token_id)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.source = source

    def encode(self, record: Record) -> dict[str, torch.Tensor]:
        from vlmtune.data.dataset import VisionLanguageDataset

        item = VisionLanguageDataset([record], self.processor, self.family, self.budget, self.conversation)[0]
        item.pop("labels")
        return item

    @torch.no_grad()
    def generate(self, items: list[dict[str, torch.Tensor]], **generate_kwargs) -> list[str]:
        """Replies for encoded prompts, in one batch (padded on the left)."""
        batch = on_model(left_padded(self.collate(items)), self.model)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {
            "do_sample": False}
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, use_cache=True,
                                      pad_token_id=self.processor.tokenizer.pad_token_id, **sampling,
                                      **generate_kwargs)
        finally:
            self.model.train(was_training)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def reply(self, record: Record) -> str:
        return self.generate([self.encode(record)])[0]

    def replies(self, records: Sequence[Record], batch_size: int = 8, desc: str = "generating",
                progress: bool = True, on_batch: Callable[[list[Record], list[str]], None] | None = None,
                **generate_kwargs) -> list[str]:
        """Replies for many prompts, ``batch_size`` at a time, with a progress bar and ETA."""
        out: list[str] = []
        bar = Progress(len(records), desc, progress)
        try:
            for start in range(0, len(records), max(1, batch_size)):
                chunk = list(records[start:start + batch_size])
                texts = self.generate([self.encode(r) for r in chunk], **generate_kwargs)
                out += texts
                if on_batch is not None:
                    on_batch(chunk, texts)
                bar.update(len(chunk))
        finally:
            bar.close()
        return out


def load_predictor(model: str | None, adapter: str | None = None, *, dtype: str | None = None,
                   device: str | None = None, budget_overrides: dict | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
                   enable_thinking: bool | None = None) -> Predictor:
    """Load a standalone model, or a base model with a run's adapters (merged in memory), for generation.

    ``enable_thinking`` None: the value the run trained with (its ``vlmtune_run.json``), else the template's default.
    """
    loaded = run.load_for_inference(model, adapter, dtype=dtype, device=device, budget_overrides=budget_overrides)
    logger.info("generating with %s", loaded.source)
    if enable_thinking is None:
        enable_thinking = loaded.template_options.get("enable_thinking")
    return Predictor(loaded.model, loaded.processor, loaded.family, loaded.budget, max_new_tokens, temperature,
                     loaded.source, enable_thinking)


# ---------------------------------------------------------------- boxes in replies


def geometries(record: Record, budget: media.MediaBudget) -> list[boxes.Geometry]:
    """The geometry of each image of a record (sizes after EXIF orientation, from its header; after resizing
    under ``budget``)."""
    out = []
    for width, height in record.image_sizes:
        rh, rw = media.resized_image_size(width, height, budget)
        out.append(boxes.Geometry(width, height, rw, rh))
    return out


def boxes_in_pixels(text: str, fmt: str, record: Record, budget: media.MediaBudget,
                    box_image: int | list[int] | None = None) -> list[dict]:
    """The boxes and points of a text written in convention ``fmt``, in pixels of the original images
    (``{"kind", "image" (0-based), "coords"}``). Boxes that do not parse or fit are left out."""
    if not record.image_sizes:
        return []
    geoms = geometries(record, budget)
    found, _ = boxes.find_boxes(text)
    where = boxes.image_of_boxes(len(found), geoms, box_image)
    if isinstance(where, str):  # a reply with another box count than box_image lists, or no box_image at all
        first = box_image[0] if isinstance(box_image, list) and box_image else box_image
        where = [first - 1 if isinstance(first, int) and 1 <= first <= len(geoms) else 0] * len(found)
    out = []
    for box, image in zip(found, where):
        if boxes.problem_with(box, fmt, geoms[image]) is not None:
            continue
        coords = boxes.convert(box.coords, fmt, "pixel_original", geoms[image], rounded=False)
        out.append({"kind": box.kind, "image": image, "coords": [round(c, 1) for c in coords]})
    return out


def draw_boxes(record: Record, found: list[dict], out: str | Path) -> list[Path]:
    """Draw boxes and points (original-image pixels, from ``boxes_in_pixels``) on the record's images as a viewer
    shows them (EXIF applied); one PNG per image: ``out``, then ``out-2.png``, ..."""
    from PIL import Image, ImageDraw, ImageOps

    out = Path(out)
    written = []
    for i, path in enumerate(record.images):
        with Image.open(media.local_path(path)) as img:
            canvas = ImageOps.exif_transpose(img).convert("RGB")
        draw = ImageDraw.Draw(canvas)
        width = max(2, round(max(canvas.size) / 200))
        for b in (b for b in found if b["image"] == i):
            c = b["coords"]
            if b["kind"] == "bbox":
                draw.rectangle(c, outline=(255, 0, 255), width=width)
            else:
                r = 2 * width
                draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), outline=(255, 0, 255), width=width)
        target = out if i == 0 else out.with_name(f"{out.stem}-{i + 1}{out.suffix or '.png'}")
        target.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(target)
        written.append(target)
    return written


def _bboxes(found: list[dict]) -> list[tuple[float, ...]]:
    return [tuple(b["coords"]) for b in found if b["kind"] == "bbox"]


@dataclasses.dataclass
class Scores:
    """Predictions on a split scored against the records' references."""

    samples: list[M.Sample]
    per_record: list[dict[str, float | None]]
    summary: dict[str, dict]
    pred_boxes: list[list[dict]]
    ref_boxes: list[list[dict]] = dataclasses.field(default_factory=list)
    """The references' boxes and points, in original pixels too (one list per record, like ``pred_boxes``)."""


def score(records: Sequence[Record], predictions: Sequence[str], family: Family, budget: media.MediaBudget,
          metric_names: Sequence[str] | None = None, reference_format: str | None = None) -> Scores:
    """Score replies against the records' last assistant turns. Boxes are compared in original-image pixels:
    predicted ones read in the family's convention, reference ones in ``reference_format`` (default: the
    family's too). ``metric_names`` None: the metrics that fit the references."""
    ref_fmt = reference_format or family.box_format
    pred_boxes, ref_boxes, samples = [], [], []
    for record, prediction in zip(records, predictions):
        box_image = getattr(record, "box_image", None)
        pb = boxes_in_pixels(prediction, family.box_format, record, budget, box_image)  # the reference's image
        rb = boxes_in_pixels(reference_of(record), ref_fmt, record, budget, box_image)
        pred_boxes.append(pb)
        ref_boxes.append(rb)
        points = [tuple(b["coords"]) for b in rb if b["kind"] == "point"]
        samples.append(M.Sample(prediction, reference_of(record), _bboxes(pb), _bboxes(rb), points))
    names = list(metric_names or M.default_metrics(samples))
    per_record = M.score_records(samples, names)
    return Scores(samples, per_record, M.summarize(samples, per_record, names), pred_boxes, ref_boxes)


def prediction_lines(records: Sequence[Record], predictions: Sequence[str], scores: Scores) -> list[dict]:
    """One JSON-able dict per record: id, prompt, reference, prediction, its metrics; for a record with images,
    their names (local files absolute; URLs, data: URIs and table cells as given) and, where found, the predicted
    ``boxes`` and the ``reference_boxes`` (original pixels, ``{"kind", "image", "coords"}``)."""
    lines = []
    ref_boxes = scores.ref_boxes or [[] for _ in records]
    for record, prediction, values, pboxes, rboxes in zip(records, predictions, scores.per_record, scores.pred_boxes,
                                                          ref_boxes):
        line = {"id": record.id, "prompt": prompt_of(record).messages[-1].text, "reference": reference_of(record),
                "prediction": prediction, "metrics": {k: v for k, v in values.items() if v is not None}}
        if record.images:
            line["images"] = [p if media.is_url(p) or media.is_inline(p) else str(Path(p).absolute())
                              for p in record.images]
        if pboxes:
            line["boxes"] = pboxes
        if rboxes:
            line["reference_boxes"] = rboxes
        lines.append(line)
    return lines
