"""Model inputs without a data file: a few short conversations over images drawn in memory.

``vlmtune merge`` compares logits on them when it is given no ``--data_path`` (an installed package has no
``data_examples/``). They take the path every data record takes: the chat template and labels of
``Conversation``, images resized under the run's budgets by qwen-vl-utils, the processor call, the collator. One of
each shape: one image, two images, text only, and an image in a two-turn conversation with a system prompt.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vlmtune.data import media
from vlmtune.data.collator import Collator
from vlmtune.data.conversation import Conversation
from vlmtune.data.dataset import Media, encode_with
from vlmtune.data.schema import IMAGE_PLACEHOLDER, Message, Record


def drawn_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB picture: a colour gradient with a rectangle of another colour on it."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    mix = (xs / max(width - 1, 1) + ys / max(height - 1, 1))[..., None] / 2
    pixels = start * (1 - mix) + end * mix
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    pixels[y0:y0 + height // 3, x0:x0 + width // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def synthetic_records(factor: int) -> list[tuple[Record, list[Image.Image]]]:
    """(record, its images) for each synthetic sample; image sides are multiples of the family's ``factor``."""
    def user(text: str, images: int = 0) -> Message:
        return Message("user", f"{IMAGE_PLACEHOLDER}\n" * images + text)

    samples = [
        ([user("What is in the picture?", 1), Message("assistant", "A coloured square on a gradient.")],
         [(4, 3)]),
        ([user("Which picture is brighter?", 2), Message("assistant", "The second one.")], [(3, 3), (2, 4)]),
        ([Message("system", "You are a helpful assistant."), user("Name three primary colours."),
          Message("assistant", "Red, blue and yellow.")], []),
        ([Message("system", "Answer briefly."), user("Describe the picture.", 1),
          Message("assistant", "A rectangle on a smooth background."), user("Is the rectangle small?"),
          Message("assistant", "Yes, about a third of the width.")], [(5, 2)]),
    ]
    out = []
    for index, (messages, sizes) in enumerate(samples):
        images = [drawn_image(w * factor, h * factor, seed=10 * index + k) for k, (w, h) in enumerate(sizes)]
        record = Record(index, f"synthetic_{index}", messages, images=[f"<drawn image {k}>" for k in range(len(sizes))],
                        image_sizes=[img.size for img in images])
        out.append((record, images))
    return out


def synthetic_batch(processor, budget: media.MediaBudget, samples: int, **template_options) -> dict[str, torch.Tensor]:
    """A padded batch (labels included) of the first ``samples`` synthetic records (at least one, at most four)."""
    conversation = Conversation(processor, **template_options)
    chosen = synthetic_records(budget.factor)[:max(1, samples)]
    items = [encode_with(conversation, record, Media([media.resize_image(img, budget) for img in images], [], []))
             for record, images in chosen]
    return Collator(processor.tokenizer.pad_token_id)(items)
