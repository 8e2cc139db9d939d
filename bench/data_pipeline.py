"""Data pipeline benchmark: the up-front check on a large file, then dataset + collator throughput and padding.

    .venv/bin/python bench/data_pipeline.py [--records 100000] [--dataset-records 200] [--batch-size 4]

(a) Check: a synthetic file of ``--records`` records (data_examples/ repeated, unique ids, the same 7 media
    files) is read by ``read_records`` as training does by default (parse, validate, media headers), and
    compared in the same run with a baseline that reads one header per media reference (no sharing between
    records that name the same file), timed on a slice and reported per record. The token lengths that
    ``check-data`` adds (chat template + tokenizer + vision tokens from headers) are timed on the same records.
(b) Dataset + collator: ``--dataset-records`` records through the lazy dataset and the collator on the embedded
    tiny Qwen2-VL (batches of ``--batch-size``): records/s, vision tokens/s, and the fraction of padding
    tokens in batches in random order vs grouped by length (``LengthGroupedSampler`` over ``dataset.lengths``,
    as ``--group_by_length`` does), as a ratio against random order measured in the same run.
(c) Against a bare processor call (issue 21): every image and text record of data_examples/ (videos left out: a
    bare call has no video reader of its own) through the dataset (decode under the budget, the processor on the
    reply pieces, labels and their check), and through what a plain script does per record: open the images with
    PIL, render the conversation with ``processor.apply_chat_template`` and call ``processor(text, images)`` (which
    resizes). Printed: CPU milliseconds per record of each (one torch thread, as in a DataLoader worker; CPU time,
    as the machine is shared), interleaved over ``--ratio-rounds`` rounds: the median per record of each and the
    median of the rounds' ratios (bare / dataset: at least 1.0 means the data path keeps up with the bare call), for
    ``--family`` or, with ``--only-ratio``, every family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5,
    Qwen3.5-MoE). Both sides run the same processor object, so its image processor (the default, torchvision
    backend) is the same on both; the dataset's images come resized by qwen-vl-utils (``do_resize=False``), the bare
    call's are resized by the image processor.
Prints one table. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers.trainer_pt_utils import LengthGroupedSampler  # noqa: E402

from vlmtune.data import media  # noqa: E402
from vlmtune.data.collator import Collator  # noqa: E402
from vlmtune.data.conversation import Conversation  # noqa: E402
from vlmtune.data.dataset import VisionLanguageDataset, record_lengths  # noqa: E402
from vlmtune.data.records import read_records  # noqa: E402
from vlmtune.families import FAMILIES  # noqa: E402
from vlmtune.families.base import IMAGE_PAD, VIDEO_PAD  # noqa: E402
from vlmtune.model.load import load_family, load_processor  # noqa: E402
from vlmtune.testing.tiny import tiny_model_path  # noqa: E402

EXAMPLES = ROOT / "data_examples"
SEEDS = range(5)


def synthetic_file(n: int, folder: Path) -> Path:
    """data_examples/data.json repeated to ``n`` records with unique ids; media paths relative to data_examples/."""
    base = json.loads((EXAMPLES / "data.json").read_text())
    records = [{**base[i % len(base)], "id": f"{base[i % len(base)]['id']}_{i}"} for i in range(n)]
    path = folder / f"data_{n}.json"
    path.write_text(json.dumps(records))
    return path


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def per_reference_baseline(records) -> None:
    """The check before header reads were shared: one read per media reference."""
    for record in records:
        for path in record.images:
            media.image_size(path)
        for path in record.videos:
            media.video_info(path)


def bench_check(n: int, folder: Path, processor, family, budget) -> list[tuple[str, str]]:
    path = synthetic_file(n, folder)
    rows = []
    (records, problems), parse_s = timed(read_records, path, EXAMPLES, check_media=False)
    assert len(records) == n and not problems, problems[:3]
    rows.append((f"parse + validate {n:,} records (no media)", f"{parse_s:6.2f} s  {n / parse_s:>10,.0f} rec/s"))
    kwargs = dict(min_image_side=family.factor, budget=budget)
    (records, problems), check_s = timed(read_records, path, EXAMPLES, **kwargs)
    assert len(records) == n and not problems, problems[:3]
    files = len({p for r in records for p in (*r.images, *r.videos)})
    rows.append((f"read_records default: + headers of {files} distinct files", f"{check_s:6.2f} s  "
                 f"{n / check_s:>10,.0f} rec/s"))
    sample = records[: min(n, 2000)]
    _, base_s = timed(per_reference_baseline, sample)
    base_rate = len(sample) / base_s
    rows.append((f"baseline: one header read per reference ({len(sample):,} records)",
                 f"{n / base_rate:6.2f} s* {base_rate:>10,.0f} rec/s  (*for {n:,}, extrapolated)"))
    rows.append(("  default check vs baseline", f"{(n / check_s) / base_rate:6.1f} x faster"))
    lengths, lengths_s = timed(record_lengths, records, Conversation(processor), budget, family)
    rows.append((f"check-data token lengths of {n:,} records", f"{lengths_s:6.2f} s  {n / lengths_s:>10,.0f} rec/s"))
    path.unlink()
    return rows


def padding_fraction(items: list[dict], order: list[int], batch_size: int, collate: Collator) -> float:
    pad = total = 0
    for start in range(0, len(order), batch_size):
        mask = collate([items[i] for i in order[start : start + batch_size]])["attention_mask"]
        pad += int((mask == 0).sum())
        total += mask.numel()
    return pad / total


def bench_dataset(n: int, batch_size: int, folder: Path, processor, family, budget) -> list[tuple[str, str]]:
    path = synthetic_file(n, folder)
    records, problems = read_records(path, EXAMPLES, min_image_side=family.factor, budget=budget)
    assert len(records) == n and not problems, problems[:3]
    dataset, build_s = timed(VisionLanguageDataset, records, processor, family, budget, Conversation(processor))
    collate = Collator(processor.tokenizer.pad_token_id)
    tok = processor.tokenizer
    pads = torch.tensor([tok.convert_tokens_to_ids(IMAGE_PAD), tok.convert_tokens_to_ids(VIDEO_PAD)])

    # throughput: items read in random order, collated in batches, as a training epoch does
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    items: list[dict | None] = [None] * len(dataset)
    vision_tokens = 0
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        batch_items = []
        for i in order[first : first + batch_size]:
            items[i] = dataset[i]
            batch_items.append(items[i])
        batch = collate(batch_items)
        vision_tokens += int(torch.isin(batch["input_ids"], pads).sum())
    epoch_s = time.perf_counter() - start
    assert [len(it["input_ids"]) for it in items] == dataset.lengths  # lengths known before decoding are exact

    random_pad = statistics.mean(
        padding_fraction(items, torch.randperm(len(items), generator=torch.Generator().manual_seed(s)).tolist(),
                         batch_size, collate) for s in SEEDS)
    grouped_pad = statistics.mean(
        padding_fraction(items, list(LengthGroupedSampler(batch_size, lengths=dataset.lengths,
                                                          generator=torch.Generator().manual_seed(s))),
                         batch_size, collate) for s in SEEDS)
    lengths = sorted(dataset.lengths)
    path.unlink()
    return [
        (f"dataset build ({n} records: lengths, no decode)", f"{build_s:6.2f} s"),
        (f"dataset + collator, batch {batch_size}, random order", f"{epoch_s:6.2f} s  {n / epoch_s:>10,.1f} rec/s"),
        ("  vision tokens", f"{vision_tokens:>7,}   {vision_tokens / epoch_s:>10,.0f} tok/s"),
        ("  sequence length min / median / max", f"{lengths[0]} / {int(statistics.median(lengths))} / {lengths[-1]}"),
        (f"padding fraction, random order (mean of {len(SEEDS)} seeds)", f"{random_pad:6.1%}"),
        ("padding fraction, grouped by length", f"{grouped_pad:6.1%}"),
        ("  grouped / random", f"{grouped_pad / random_pad:6.2f} x"),
    ]


def bench_bare_ratio(family_name: str, rounds: int, folder: Path) -> list[tuple[str, str]]:
    from PIL import Image, ImageOps

    from vlmtune.data.conversation import chat_messages

    model_dir = str(tiny_model_path(family_name))
    family, processor = load_family(model_dir), load_processor(model_dir)
    budget = media.budget_from_processor(processor, family.factor)
    records, problems = read_records(EXAMPLES / "data.json", EXAMPLES, min_image_side=family.factor, budget=budget)
    records = [r for r in records if not r.videos]
    dataset = VisionLanguageDataset(records, processor, family, budget, Conversation(processor))

    def bare(record) -> dict:
        images = [ImageOps.exif_transpose(Image.open(path)).convert("RGB") for path in record.images]
        text = processor.apply_chat_template(chat_messages(record), tokenize=False)
        return processor(text=[text], images=images or None, return_tensors="pt")

    def cpu(fn, *args) -> float:
        start = time.process_time()
        fn(*args)
        return time.process_time() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for i, record in enumerate(records):  # warm up both
        dataset[i], bare(record)
    ours, theirs = [], []  # CPU seconds per record of each round
    for _ in range(rounds):  # interleaved, so that a change of load on the machine hits both alike
        ours_s = bare_s = 0.0
        for i, record in enumerate(records):
            ours_s += cpu(dataset.__getitem__, i)
            bare_s += cpu(bare, record)
        ours.append(ours_s / len(records))
        theirs.append(bare_s / len(records))
    torch.set_num_threads(threads)
    ratio = statistics.median(b / o for b, o in zip(theirs, ours))
    return [(f"{family_name}: dataset item ({len(records)} image/text records, median of {rounds} rounds)",
             f"{1000 * statistics.median(ours):7.2f} CPU ms/record"),
            (f"{family_name}: bare processor call (PIL open, template, processor)",
             f"{1000 * statistics.median(theirs):7.2f} CPU ms/record"),
            (f"{family_name}:   bare / dataset (median of the rounds' ratios)", f"{ratio:7.2f} x")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="records in the synthetic file to check")
    parser.add_argument("--dataset-records", type=int, default=200, help="records through dataset + collator")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--family", default="qwen2_vl", choices=list(FAMILIES))
    parser.add_argument("--ratio-rounds", type=int, default=5, help="rounds of (c), per family")
    parser.add_argument("--only-ratio", action="store_true", help="only (c), on every family")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    model_dir = str(tiny_model_path(args.family))
    family, processor = load_family(model_dir), load_processor(model_dir)
    budget = media.budget_from_processor(processor, family.factor)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only_ratio:
            rows = [("== (c) dataset item vs a bare processor call", "")]
            for name in FAMILIES:
                rows += bench_bare_ratio(name, args.ratio_rounds, Path(tmp))
            return _print(rows)
        rows = [(f"== (a) check, video reader {media.video_backend()}", "")]
        rows += bench_check(args.records, Path(tmp), processor, family, budget)
        rows.append((f"== (b) dataset + collator, tiny {args.family}", ""))
        rows += bench_dataset(args.dataset_records, args.batch_size, Path(tmp), processor, family, budget)
        rows.append((f"== (c) dataset item vs a bare processor call, tiny {args.family}", ""))
        rows += bench_bare_ratio(args.family, args.ratio_rounds, Path(tmp))
    return _print(rows)


def _print(rows: list[tuple[str, str]]) -> int:
    width = max(len(name) for name, _ in rows) + 2
    print(f"\nvlmtune data pipeline ({torch.get_num_threads()} torch threads)")
    for name, value in rows:
        print(f"{name:<{width}}{value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
