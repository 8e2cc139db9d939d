"""``vlmtune predict``: generate replies with a model (and optionally a run's adapters).

The prompt goes through the same path as training data: a ``Record`` with ``<image>`` / ``<video>``
placeholders, the family's chat template (with the generation prompt appended), media decoded under the
same pixel and frame budgets, and the processor call of ``VisionLanguageDataset``. So the model sees at
inference exactly the token layout it saw in training.

``--model`` is a standalone model folder (a base model, a merged folder, a full fine-tune), or a training
output / checkpoint with adapters (the base model then comes from its ``vlmtune_run.json``, or from
``--model`` when ``--adapter`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from vlmtune import run
from vlmtune.config import ConfigError, DataArguments, boolean_flag
from vlmtune.data import media
from vlmtune.data.collator import Collator
from vlmtune.data.conversation import Conversation
from vlmtune.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Message, Record, check_media_files
from vlmtune.families import Family

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
BUDGET_FIELDS = tuple(DataArguments().budget_overrides())
"""Pixel / frame budget options shared with ``vlmtune train`` (same names, same help)."""


class GenerationConversation(Conversation):
    """The training conversation rendering (same template switches, e.g. ``enable_thinking``), ending with the
    template's generation prompt, which the model continues from."""

    add_generation_prompt = True


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


class Predictor:
    """A loaded model, its processor and budgets; ``reply(record)`` generates the assistant's next turn."""

    def __init__(self, model, processor, family: Family, budget: media.MediaBudget,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
                 enable_thinking: bool | None = None):
        self.model = model
        self.processor = processor
        self.family = family
        self.budget = budget
        self.conversation = GenerationConversation(processor, enable_thinking=enable_thinking)
        self.collate = Collator(processor.tokenizer.pad_token_id)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    @torch.no_grad()
    def reply(self, record: Record) -> str:
        from vlmtune.data.dataset import VisionLanguageDataset

        dataset = VisionLanguageDataset([record], self.processor, self.family, self.budget, self.conversation)
        item = dataset[0]
        item.pop("labels")
        device = next(self.model.parameters()).device
        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        batch = {k: v.to(device) for k, v in self.collate([item]).items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in batch:
                batch[key] = batch[key].to(dtype)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {
            "do_sample": False}
        out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, **sampling)
        new_tokens = out[0, batch["input_ids"].shape[1]:]
        return self.processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def load_predictor(model: str | None, adapter: str | None = None, *, dtype: str | None = None,
                   device: str | None = None, budget_overrides: dict | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
                   enable_thinking: bool | None = None) -> Predictor:
    """Load a standalone model, or a base model with a run's adapters (merged in memory), for generation.

    ``enable_thinking`` None: the value the run trained with (its ``vlmtune_run.json``), else the template's default.
    """
    loaded = run.load_for_inference(model, adapter, dtype=dtype, device=device, budget_overrides=budget_overrides)
    logger.info("predicting with %s", loaded.source)
    if enable_thinking is None:
        enable_thinking = loaded.template_options.get("enable_thinking")
    return Predictor(loaded.model, loaded.processor, loaded.family, loaded.budget, max_new_tokens, temperature,
                     enable_thinking)


def predict_file(predictor: Predictor, data_path: str, output, *, image_folder: str | None = None,
                 video_folder: str | None = None, limit: int | None = None) -> int:
    """Generate a reply for every record of a data file; one JSON line (id, prompt, reference, prediction)
    per record is written to ``output`` (a text stream). Returns the number of records."""
    from vlmtune.data.records import load_records

    records = load_records(data_path, image_folder, video_folder, budget=predictor.budget,
                           min_image_side=predictor.family.factor)
    if limit:
        records = records[:limit]
    for i, record in enumerate(records, 1):
        prompt = prompt_of(record)
        prediction = predictor.reply(prompt)
        line = {"id": record.id, "prompt": prompt.messages[-1].text, "reference": record.messages[-1].text,
                "prediction": prediction}
        output.write(json.dumps(line, ensure_ascii=False) + "\n")
        output.flush()
        logger.info("[%d/%d] %s: %s", i, len(records), record.id, prediction[:80])
    return len(records)


def main(argv: list[str] | None = None) -> int:
    """``vlmtune predict``."""
    parser = argparse.ArgumentParser(
        prog="vlmtune predict",
        description="Generate a reply for a prompt with images / videos, or for every record of a data file, "
                    "using the family's chat template and the training pixel budgets.",
    )
    parser.add_argument("--model", help="model folder (base, merged or full fine-tune), or a training output with "
                        "adapters; with --adapter: the base model (default: the run's)")
    parser.add_argument("--adapter", help="training output or checkpoint with LoRA adapters to apply to --model")
    parser.add_argument("--prompt", help="the user's message; <image> / <video> mark where media go (default: "
                        "images, then videos, before the text)")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--video", action="append", default=[], help="a video file (repeat for several)")
    parser.add_argument("--system", help="system message (default: the chat template's)")
    parser.add_argument("--data", help="LLaVA-style data file: predict the last reply of every record")
    parser.add_argument("--image_folder", help="folder of relative image paths in --data (default: the file's)")
    parser.add_argument("--video_folder", help="folder of relative video paths in --data (default: image_folder)")
    parser.add_argument("--output", help="JSONL file for --data predictions (default: standard output)")
    parser.add_argument("--limit", type=int, help="predict only the first N records of --data")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    parser.add_argument("--enable_thinking", type=boolean_flag, metavar="{true,false}",
                        help="passed to the chat template (Qwen3.5: false opens the reply after an empty <think> "
                        "block); default: the run's value (vlmtune train --enable_thinking), else the template's")
    parser.add_argument("--dtype", help="bfloat16, float16 or float32 (default: the model's / the run's)")
    parser.add_argument("--device", help="default: cuda if present, else cpu")
    help_of = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(DataArguments)}
    types = {"fps": float}
    for name in BUDGET_FIELDS:
        parser.add_argument(f"--{name}", type=types.get(name, int), help=help_of.get(name))
    args = parser.parse_args(argv)

    if bool(args.data) == bool(args.prompt):
        parser.error("give either --prompt (with --image / --video) or --data")
    if args.data and (args.image or args.video):
        parser.error("--image / --video go with --prompt; --data records name their own media")
    if args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be at least 1")
    budget = {name: getattr(args, name) for name in BUDGET_FIELDS}
    DataArguments(**{k: v for k, v in budget.items() if v is not None})  # the same cross-checks as training
    predictor = load_predictor(args.model, args.adapter, dtype=args.dtype, device=args.device,
                               budget_overrides=budget, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, enable_thinking=args.enable_thinking)
    if args.data:
        if args.output:
            out_path = Path(args.output)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            with out_path.open("w", encoding="utf-8") as out:
                n = predict_file(predictor, args.data, out, image_folder=args.image_folder,
                                 video_folder=args.video_folder, limit=args.limit)
            print(f"{n} predictions written to {out_path}")
        else:
            predict_file(predictor, args.data, sys.stdout, image_folder=args.image_folder,
                         video_folder=args.video_folder, limit=args.limit)
        return 0
    record = prompt_record(args.prompt, args.image, args.video, args.system)
    problems = check_media_files([record], predictor.family.factor, deep=False, budget=predictor.budget)
    if problems:  # the same header checks as for a data file
        raise media.MediaError("; ".join(p.message for p in problems))
    reply = predictor.reply(record)
    if not reply:
        logger.warning("the reply is empty: the model ended its turn at once (or wrote only special tokens)")
    print(reply)
    return 0
