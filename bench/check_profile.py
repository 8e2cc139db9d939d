"""Where the first ``check-data`` of a file spends its time: a cProfile of the store build, per stage.

    nice .venv/bin/python bench/check_profile.py [--records 20000] [--seed 0] [--label before|after]

A file of ``--records`` ordinary single-image LLaVA records (issue 21's: ``bench/data_scale.py --records ordinary``)
is checked once on an empty data cache in this process, on one process (``--processes 1``), under cProfile, on the
embedded tiny Qwen2-VL processor. Printed: the CPU seconds of each stage of the first check (the cumulative time of the
functions that do it, from the profile: parse, validate, template, tokenize, label check, media headers, store
writes, the rest), the check's CPU and wall seconds without the profiler (a second build on another empty cache), and
the imports of the ``check-data`` command (a fresh process importing what the command imports, wall and CPU seconds).

Exactness: a digest of what the store holds for the file (each record's text tokens and length, every problem) is
written with the table; a later run of the same ``--records`` / ``--seed`` compares its digest with every earlier
one in the results file and stops if they differ (the check must find the same tokens and problems, only faster).

Results go to bench/results/check-profile.json (one entry per ``--label``) and the table to
bench/results/check-profile-<label>.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

IMPORTS = """
import resource, time
start = time.perf_counter()
try:
    from vlmtune.data_arguments import DataArguments
except ImportError:  # before issue 21: from the training configuration
    from vlmtune.config import DataArguments
from vlmtune.data import media, mixture
from vlmtune.data.check import check_data
from vlmtune.data.conversation import Conversation
from vlmtune.data.formats import FORMATS
from vlmtune.flags import add_fields, check_value, fields_of, need_file, need_folder
from vlmtune.model.load import load_family, load_processor, resolve_model_path
imported = time.perf_counter()
load_processor(resolve_model_path(None))
loaded = time.perf_counter()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(f"{imported - start:.3f} {loaded - imported:.3f} {usage.ru_utime + usage.ru_stime:.3f}")
"""

# stage -> functions (file suffix, function name) whose cumulative time is the stage's (callees included), before
# and after issue 21 (render -> render_many, the label check in two halves, the tokenizer calls in data/tokens.py)
STAGES = {
    "read the file": [("formats/jsonfile.py", "scan")],
    "hash file and records": [("store_key.py", "file_digest"), ("store_key.py", "_record_hash")],
    "parse (json.loads)": [],  # json.loads called by parse_item: filled from the caller edge
    "validate": [("data/records.py", "parse_item")],  # minus its json.loads
    "template (render)": [("data/conversation.py", "render"), ("data/conversation.py", "render_many")],
    "tokenize": [("data/conversation.py", "_token_ids"), ("data/tokens.py", "token_ids")],
    "label check": [("data/conversation.py", name) for name in ("labels", "problem", "_spans_to_decode",
                                                                "_spans_of_pieces", "_decode_problem")]
    + [("data/tokens.py", "decoded")],
    "media headers": [("data/store_build.py", "_media")],
    "store writes": [("data/store_build.py", "_encode"), ("data/store_build.py", "_merge")],
}


def _find(stats: dict, suffix: str, name: str) -> list:
    return [key for key in stats if key[0].endswith(suffix) and key[2] == name]


def stage_table(profile: cProfile.Profile) -> tuple[dict[str, float], float]:
    """Seconds per stage (cumulative time of its functions) and the profiled total."""
    stats = pstats.Stats(profile).stats
    seconds = {}
    for stage, functions in STAGES.items():
        seconds[stage] = sum(stats[key][3] for suffix, name in functions for key in _find(stats, suffix, name))
    parse_items = _find(stats, "data/records.py", "parse_item")
    loads = 0.0
    for key, (_, _, _, _, callers) in stats.items():
        if key[2] == "loads" and key[0].endswith("json/__init__.py"):
            loads += sum(edge[3] for caller, edge in callers.items() if caller in parse_items)
    seconds["parse (json.loads)"] = loads
    seconds["validate"] -= loads
    total = max(v[3] for v in stats.values())
    seconds["the rest"] = total - sum(seconds.values())
    return seconds, total


def store_digest(store, work: Path) -> str:
    """What the store holds for the file: every record as stored (the temporary folder's name taken out of its
    media paths), its text tokens and length, every problem."""
    import numpy as np

    h = hashlib.sha256()
    h.update(np.asarray(store.text_tokens, dtype=np.int64).tobytes())
    h.update(np.asarray(store.lengths, dtype=np.int64).tobytes())
    h.update(np.asarray(store.index, dtype=np.int64).tobytes())
    h.update((store._blob[:] if len(store) else b"").replace(str(work).encode(), b"WORK"))  # the records as stored
    h.update(json.dumps([[p.level, p.message, p.index, p.id] for p in store.problems]).encode())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="after", help="name of this run in the results (before / after)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="only the check without the profiler and the digest (the label's table is kept)")
    args = parser.parse_args(argv)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", IMPORTS], env=env, capture_output=True, text=True, check=True)
    import_s, load_s, import_cpu = (float(v) for v in out.stdout.split()[-3:])

    import data_scale

    from vlmtune.data import media
    from vlmtune.data.check import check_data
    from vlmtune.data.conversation import Conversation
    from vlmtune.model.load import load_family, load_processor
    from vlmtune.testing.tiny import tiny_model_path

    model_dir = str(tiny_model_path())
    family, processor = load_family(model_dir), load_processor(model_dir)
    budget = media.budget_from_processor(processor, family.factor)
    with tempfile.TemporaryDirectory(prefix="vlmtune-check-profile-") as tmp:
        work = Path(tmp)
        images = data_scale.make_images(work / "images", args.seed)
        path = work / "data.jsonl"
        data_scale.make_file(path, args.records, images, args.seed, "ordinary")

        def check(cache: str):
            os.environ["VLMTUNE_CACHE"] = cache
            return check_data(str(path), processor, family, budget, conversation=Conversation(processor),
                              processes=1, max_seq_length=4096)

        profile = cProfile.Profile(time.process_time)  # CPU seconds: the machine is shared
        if args.profile:
            profile.enable()
            result = check(str(work / "cache-profiled"))
            profile.disable()
            assert result.store is not None and result.store.meta["measured"] == args.records, result.store.meta
            seconds, total = stage_table(profile)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        start, cpu = time.perf_counter(), time.process_time()
        plain = check(str(work / "cache-plain"))
        check_s, check_cpu = time.perf_counter() - start, time.process_time() - cpu
        digest = store_digest(plain.store, work)
        median = int(sorted(plain.lengths)[len(plain.lengths) // 2])
        text = io.StringIO()
        if args.profile:
            assert digest == store_digest(result.store, work)
            pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(40)

    results_dir = ROOT / "bench" / "results"
    results_path = results_dir / "check-profile.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if not args.profile:  # the label's earlier table, this run's check and digest
        kept = results.get(args.label, {})
        seconds, total = kept.get("stages_profiled_s", {}), kept.get("profiled_s", 0.0)

    lines = [f"first check-data of {args.records:,} ordinary records (median {median} tokens), --processes 1, "
             f"tiny Qwen2-VL processor, {args.label}",
             f"{'stage':<24}{'CPU s':>12}{'share':>8}  (cProfile, CPU time)"]
    lines += [f"{stage:<24}{s:12.2f}{s / total:8.1%}" for stage, s in seconds.items()] if args.profile else []
    lines += [f"{'total (profiled)':<24}{total:12.2f}",
              f"check without the profiler: {check_cpu:.2f} CPU s ({args.records / check_cpu:,.0f} records per CPU "
              f"second), {check_s:.2f} s wall (load average {os.getloadavg()[0]:.1f})",
              f"check-data imports: {import_s:.2f} s wall, processor load {load_s:.2f} s wall; CPU of both "
              f"{import_cpu:.2f} s",
              f"store digest (text tokens, lengths, problems): {digest}"]
    table = "\n".join(lines)
    print(table)
    if args.profile:
        (results_dir / f"check-profile-{args.label}.txt").write_text(table + "\n\n" + text.getvalue())
    for label, earlier in results.items():
        if label != args.label and (earlier["records"], earlier["seed"]) == (args.records, args.seed):
            if earlier["digest"] != digest:
                print(f"store content differs from {label!r}'s: {earlier['digest']} != {digest}")
                return 1
            print(f"store content identical to {label!r}'s ({digest}); check CPU {earlier['check_cpu_s']:.2f} s "
                  f"-> {check_cpu:.2f} s ({earlier['check_cpu_s'] / check_cpu:.2f}x as fast, different runs)")
    results[args.label] = {"records": args.records, "seed": args.seed, "digest": digest, "median_tokens": median,
                           "stages_profiled_s": {k: round(v, 3) for k, v in seconds.items()},
                           "profiled_s": round(total, 3), "check_s": round(check_s, 3),
                           "check_cpu_s": round(check_cpu, 3), "import_s": import_s,
                           "processor_load_s": load_s, "import_cpu_s": import_cpu, "max_rss_gb": round(rss_before, 3),
                           "load_avg": round(os.getloadavg()[0], 2)}
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
