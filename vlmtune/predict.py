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

from vlmtune.config import DataArguments, boolean_flag
from vlmtune.data.records import check_media_files
from vlmtune.errors import MediaError
from vlmtune.generation import (  # noqa: F401  (re-exported: the names predict has always had)
    DEFAULT_MAX_NEW_TOKENS,
    Predictor,
    boxes_in_pixels,
    draw_boxes,
    load_predictor,
    prompt_of,
    prompt_record,
    reference_of,
)

logger = logging.getLogger(__name__)

BUDGET_FIELDS = tuple(DataArguments().budget_overrides())
"""Pixel / frame budget options shared with ``vlmtune train`` (same names, same help)."""


def predict_file(predictor: Predictor, data_path: str, output, *, image_folder: str | None = None,
                 video_folder: str | None = None, limit: int | None = None, batch_size: int = 8,
                 box_format: str | None = None) -> int:
    """Generate a reply for every record of a data file, ``batch_size`` at a time; one JSON line (id, prompt,
    reference, prediction) per record is written to ``output`` (a text stream). Returns the number of records."""
    from vlmtune.data.records import load_records

    records = load_records(data_path, image_folder, video_folder, budget=predictor.budget,
                           min_image_side=predictor.family.factor, box_target=predictor.family.box_format,
                           box_format=box_format)
    if limit:
        records = records[:limit]

    done = 0

    def write(chunk, predictions):
        nonlocal done
        for record, prediction in zip(records[done:done + len(chunk)], predictions):
            line = {"id": record.id, "prompt": prompt_of(record).messages[-1].text,
                    "reference": reference_of(record), "prediction": prediction}
            found = boxes_in_pixels(prediction, predictor.family.box_format, record, predictor.budget,
                                    record.box_image)
            if found:
                line["boxes"] = found  # original-image pixels
            output.write(json.dumps(line, ensure_ascii=False) + "\n")
        output.flush()
        done += len(chunk)

    predictor.replies([prompt_of(r) for r in records], batch_size, desc="predicting", on_batch=write)
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
    parser.add_argument("--batch_size", type=int, default=8, help="prompts generated together (--data)")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    parser.add_argument("--enable_thinking", type=boolean_flag, metavar="{true,false}",
                        help="passed to the chat template (Qwen3.5: false opens the reply after an empty <think> "
                        "block); default: the run's value (vlmtune train --enable_thinking), else the template's")
    parser.add_argument("--box_format", choices=["pixel_original", "pixel_resized", "norm1000", "norm1"],
                        help="convention of the boxes in --data (converted to the family's before generation)")
    parser.add_argument("--draw", help="with --prompt and --image: draw the boxes and points of the reply on the "
                        "image into this PNG (several images: NAME-2.png, ...)")
    parser.add_argument("--dtype", help="bfloat16, float16 or float32 (default: the model's / the run's)")
    parser.add_argument("--device", help="default: cuda if present, else cpu")
    help_of = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(DataArguments)}
    types = {"fps": float}
    for name in BUDGET_FIELDS:
        parser.add_argument(f"--{name}", type=types.get(name, int), help=help_of.get(name))
    args = parser.parse_args(argv)

    if bool(args.data) == bool(args.prompt):
        parser.error("give either --prompt (with --image / --video) or --data")
    if args.draw and not (args.prompt and args.image):
        parser.error("--draw goes with --prompt and --image")
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
                                 video_folder=args.video_folder, limit=args.limit, batch_size=args.batch_size,
                                 box_format=args.box_format)
            print(f"{n} predictions written to {out_path}")
        else:
            predict_file(predictor, args.data, sys.stdout, image_folder=args.image_folder,
                         video_folder=args.video_folder, limit=args.limit, batch_size=args.batch_size,
                         box_format=args.box_format)
        return 0
    record = prompt_record(args.prompt, args.image, args.video, args.system)
    problems = check_media_files([record], predictor.family.factor, deep=False, budget=predictor.budget)
    if problems:  # the same header checks as for a data file
        raise MediaError("; ".join(p.message for p in problems))
    reply = predictor.reply(record)
    if not reply:
        logger.warning("the reply is empty: the model ended its turn at once (or wrote only special tokens)")
    print(reply)
    found = boxes_in_pixels(reply, predictor.family.box_format, record, predictor.budget)
    for b in found:
        image = f" on image {b['image'] + 1}" if len(record.images) > 1 else ""
        print(f"{b['kind']} in original pixels{image}: [{', '.join(f'{c:g}' for c in b['coords'])}]")
    if args.draw:
        for path in draw_boxes(record, found, args.draw):
            print(f"drawn: {path} ({len(found)} box(es) and point(s) in the reply)")
    return 0
