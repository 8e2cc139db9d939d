"""``vlmtune view`` on a large data file once its store exists: the page's first answers against what a second
``check-data`` of the same file spends, measured in the same run, in one process.

    nice -n 5 .venv/bin/python bench/view_first_page.py [--records 100000] [--out bench/results/F.json]

Records: data_scale's synthetic single-image records. The store is built first (not timed). Rows, each the median
of ``--repeats``:
  check-data, 2nd   ``check_data`` on the built store: open it, the valid records, lengths, problems (baseline)
  view: open        ``DataView``: the same ``check_data`` plus the list's arrays (index, shape, length, problems)
  view: first page  ``DataView.rows()``: the first 50 rows (decoded from the store by offset)
  view: a record    ``DataView.record(i)`` of a record in the middle: its image decoded, processor, labels, positions
  view: search      ``DataView.rows(query=...)``: a search by id, which reads every record (linear in the file)
  file hashed whole ``store_key.file_digest``: what every open of the store cost before its digest memo (the data
                    file's SHA-256 is now remembered under its stat)
Ratios are each row over the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="where the file and the cache go (default: a temporary folder)")
    parser.add_argument("--out", help="also write the figures to this JSON file (e.g. bench/results/...json)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="view-bench-"))
    os.environ["VLMTUNE_CACHE"] = str(work / "cache")

    from data_scale import make_file, make_images

    from vlmtune.data import media
    from vlmtune.data.check import check_data
    from vlmtune.data.conversation import Conversation
    from vlmtune.data.store_key import file_digest
    from vlmtune.model.load import load_config, load_family, load_processor, resolve_model_path
    from vlmtune.view.data_pages import DataView

    data = work / "data.jsonl"
    if not data.is_file():
        make_file(data, args.records, make_images(work / "images", 0), 0)
    model = resolve_model_path(None)
    processor, family, config = load_processor(model), load_family(model), load_config(model)
    budget = media.budget_from_processor(processor, family.factor)
    start, cpu = time.perf_counter(), time.process_time()
    built = check_data(str(data), processor, family, budget, conversation=Conversation(processor)).store.built
    build_s, build_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    print(f"{args.records:,} records; store {'built' if built else 'opened (built before)'} in {build_s:.1f}s "
          "(not timed below)")

    rows = {"check-data, 2nd": lambda: check_data(str(data), processor, family, budget,
                                                   conversation=Conversation(processor))}
    view = DataView(str(data), processor, family, config, budget)
    rows["view: open"] = lambda: DataView(str(data), processor, family, config, budget)
    rows["view: first page"] = lambda: view.rows()
    rows["view: a record"] = lambda: view.record(args.records // 2)
    rows["view: search"] = lambda: view.rows(query=f"r{args.records - 1:07d}")
    rows["file hashed whole"] = lambda: file_digest(data)  # what every open cost before the store's digest memo
    seconds = {name: timed(fn, args.repeats) for name, fn in rows.items()}
    base = seconds["check-data, 2nd"]
    print(f"{'row':<18} {'seconds':>9} {'x baseline':>11}")
    for name, s in seconds.items():
        print(f"{name:<18} {s:>9.3f} {s / base:>11.2f}")
    shown = seconds["view: open"] + seconds["view: first page"]
    print(f"first page shown (open + first page): {shown:.3f}s")
    if args.out:
        results = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                   "python": platform.python_version(), "records": args.records, "repeats": args.repeats,
                   "store_built_in_this_run": built, "store_build_s": round(build_s, 1),
                   "store_build_cpu_s_main_process": round(build_cpu_s, 1),
                   "load_avg": round(os.getloadavg()[0], 2),
                   "seconds": {name: round(s, 4) for name, s in seconds.items()},
                   "x_baseline": {name: round(s / base, 3) for name, s in seconds.items()},
                   "first_page_shown_s": round(shown, 4)}
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
