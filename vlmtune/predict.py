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
import json
import logging
import sys
from pathlib import Path

from vlmtune import run
from vlmtune.config import INFERENCE_DATA_FIELDS, DataArguments, InferenceArguments
from vlmtune.data.records import check_media_files
from vlmtune.errors import ConfigError, MediaError
from vlmtune.flags import add_fields, check_value, fields_of, need_file, need_folder
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


def check_inputs(args: argparse.Namespace) -> None:
    """The files and folders ``predict`` will read, checked before the model loads."""
    run.check_inference_source(args.model, args.adapter)
    need_file(args.data, "--data", "data file (JSON or JSONL)")
    need_folder(args.image_folder, "--image_folder")
    need_folder(args.video_folder, "--video_folder")
    for flag, paths in (("--image", args.image), ("--video", args.video)):
        for path in paths:
            if "://" not in path:
                need_file(path, flag, "media file")
    if args.output and Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a folder; give a file name for the JSONL predictions")


def main(argv: list[str] | None = None) -> int:
    """``vlmtune predict``."""
    parser = argparse.ArgumentParser(
        prog="vlmtune predict",
        description="Generate a reply for a prompt with images / videos, or for every record of a data file, "
                    "using the family's chat template and the training pixel budgets.",
    )
    add_fields(parser, InferenceArguments)
    add_fields(parser, DataArguments, *INFERENCE_DATA_FIELDS)
    parser.add_argument("--prompt", help="the user's message; <image> / <video> mark where media go (default: "
                        "images, then videos, before the text)")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--video", action="append", default=[], help="a video file (repeat for several)")
    parser.add_argument("--system", help="system message (default: the chat template's)")
    parser.add_argument("--data", help="LLaVA-style data file: predict the last reply of every record")
    parser.add_argument("--output", help="JSONL file for --data predictions (default: standard output)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    parser.add_argument("--draw", help="with --prompt and --image: draw the boxes and points of the reply on the "
                        "image into this PNG (several images: NAME-2.png, ...)")
    args = parser.parse_args(argv)

    if bool(args.data) == bool(args.prompt):
        parser.error("give either --prompt (with --image / --video) or --data")
    if args.draw and not (args.prompt and args.image):
        parser.error("--draw goes with --prompt and --image")
    if args.data and (args.image or args.video):
        parser.error("--image / --video go with --prompt; --data records name their own media")
    fields_of(args, InferenceArguments)  # the same checks as training: ranges, cross-checks
    budget = fields_of(args, DataArguments, *INFERENCE_DATA_FIELDS).budget_overrides()
    check_value("--temperature", args.temperature, (0, None, False, False))
    check_inputs(args)  # before any model loads
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
