"""The same records as JSON lines (image files) and as Parquet with the images' bytes embedded: the first and the
second ``vlmtune check-data``, each in its own fresh process, against each file's own plain read, in one run.

    nice -n 5 .venv/bin/python bench/data_formats.py [--records 20000] [--distinct 200] [--first_only] [--save]

Records: data_scale's synthetic single-image records (a question of 5 to 20 words, an answer of 20 to 90), ids
``r0000000``...; their images: ``--distinct`` different PNGs (data_examples' six images, each made distinct by a
text chunk numbering it: a few hundred bytes each), record i showing image i mod distinct. JSON lines name the
files (written to a folder); the Parquet file (``--row_group`` rows a group) holds the same records in the LLaVA
layout with the images' bytes in an ``image`` column of ``datasets`` Image structs. Same ids, turns, image bytes.

Rows, each from its own process, started fresh:
  plain JSON      ``json.loads`` of every line of the JSON lines file (data_scale's baseline)
  pyarrow text    ``pyarrow.parquet.read_table`` of the Parquet file's text columns (every column but the images):
                  the baseline the issue names for memory
  check, 1st/2nd  ``vlmtune check-data FILE`` on an empty data cache, then again (the store is opened)
  random reads    what training does: the store opened, ``--reads`` records at random positions read by offset and
                  their images' bytes read (a file; a Parquet cell: its row group's image column decoded)
Columns: wall seconds of the whole command (process start, imports, processor load included), the seconds the check
itself reports, CPU seconds, the largest resident set of one process (``wait4``'s maxrss) and the peak of the
process tree's proportional set size (PSS, sampled every 0.5 s); the store's size on disk. Ratios are Parquet over
JSON lines, measured in the same run, and each check over its own file's plain read. ``--save`` writes
bench/results/data-formats-<records>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_scale import PLAIN, PY, check_seconds, newest_meta, run, synthetic_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASES = sorted((ROOT / "data_examples" / "images").glob("*.png"))

READ = """
import random, resource, sys, time
from vlmtune.data.convert import image_bytes
from vlmtune.data.store import DataStore
store = DataStore(sys.argv[1])
rng = random.Random(0)
picks = [rng.randrange(len(store)) for _ in range(int(sys.argv[2]))]
start = time.perf_counter()
size = sum(len(image_bytes(path)) for pos in picks for path in store.record(pos).images)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(f"read {len(picks)} random records and their images ({size} bytes) in {seconds:.3f}s: "
      f"{seconds / len(picks) * 1e3:.3f} ms each; peak RSS {peak:.3f} GB")
"""

ARROW_TEXT = """
import sys, time
import pyarrow.parquet as pq
start = time.perf_counter()
f = pq.ParquetFile(sys.argv[1])
columns = [name for name in f.schema_arrow.names if name != "image"]
table = pq.read_table(sys.argv[1], columns=columns)
print(f"read {table.num_rows} rows of {columns} ({table.nbytes / 1e6:.0f} MB) in {time.perf_counter() - start:.3f}s")
"""


def numbered_png(data: bytes, i: int) -> bytes:
    """A PNG's bytes with a tEXt chunk numbering it after the header chunk: other bytes, the same pixels."""
    body = b"tEXt" + b"n\0" + str(i).encode()
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    end = 8 + 4 + 4 + 13 + 4  # signature, then IHDR: length, type, 13 bytes, CRC
    return data[:end] + chunk + data[end:]


def write_files(work: Path, n: int, distinct: int, row_group: int, seed: int) -> tuple[Path, Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    bases = [p.read_bytes() for p in BASES]
    blobs = []
    for k in range(distinct):
        blobs.append(numbered_png(bases[k % len(bases)], k))
        (folder / f"img_{k:07d}.png").write_bytes(blobs[-1])
    rng = random.Random(seed)
    jsonl, parquet = work / "data.jsonl", work / "data.parquet"
    writer = None
    with open(jsonl, "w") as f:
        for start in range(0, n, row_group):
            rows = []
            for i in range(start, min(n, start + row_group)):
                record = synthetic_record(rng, i, ["x"])
                k = i % distinct
                record["image"] = f"img_{k:07d}.png"
                f.write(json.dumps(record) + "\n")
                rows.append({**record, "image": [{"bytes": blobs[k], "path": record["image"]}]})
            table = pa.Table.from_pylist(rows)
            writer = writer or pq.ParquetWriter(parquet, table.schema)
            writer.write_table(table, row_group_size=row_group)
    writer.close()
    return jsonl, parquet, folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--distinct", type=int, help="distinct images (default: records / 100, at least 100)")
    parser.add_argument("--row_group", type=int, default=1000, help="rows per Parquet row group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reads", type=int, default=2000, help="random records read as training reads them")
    parser.add_argument("--first_only", action="store_true", help="skip the second checks")
    parser.add_argument("--save", action="store_true", help="write bench/results/data-formats-<records>-<date>.json")
    args = parser.parse_args()
    distinct = args.distinct or min(args.records, max(100, args.records // 100))
    work = Path(tempfile.mkdtemp(prefix="vlmtune-data-formats-"))
    results: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores",
                     "date": datetime.date.today().isoformat(), "python": platform.python_version(),
                     "records": args.records, "distinct_images": distinct,
                     "row_group": args.row_group}

    def show(name: str, r: dict, extra: str = "") -> None:
        print(f"  {name:<22} wall {r['wall_s']:7.1f}s  cpu {r['cpu_s']:7.1f}s  max RSS {r['max_rss_gb']:5.2f} GB  "
              f"tree PSS {r['peak_pss_gb']:5.2f} GB  (load {r['load_avg']:.1f}){extra}", flush=True)

    try:
        start = time.perf_counter()
        jsonl, parquet, folder = write_files(work, args.records, distinct, args.row_group, args.seed)
        print(f"{args.records:,} records, {distinct:,} images: JSON lines {jsonl.stat().st_size / 1e6:,.0f} MB, "
              f"Parquet {parquet.stat().st_size / 1e6:,.0f} MB, written in {time.perf_counter() - start:.0f}s",
              flush=True)
        for name, path, baseline in (("jsonl", jsonl, PLAIN), ("parquet", parquet, ARROW_TEXT)):
            cache = work / f"cache-{name}"
            env = {**os.environ, "VLMTUNE_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
            row = {"file_mb": round(path.stat().st_size / 1e6, 1)}
            plain = run([PY, "-c", baseline, str(path)], env)
            show(f"{name}: plain read", plain, "  " + plain.pop("output").strip().splitlines()[-1][:60])
            row["plain"] = plain
            for which in ("first", "second")[: 1 if args.first_only else 2]:
                r = run([PY, "-m", "vlmtune.cli", "check-data", str(path), "--image_folder", str(folder)], env)
                r["check_s"] = check_seconds(r.pop("output"))
                if which == "first":
                    meta = newest_meta(cache)
                    r["stages"], r["processes"] = meta["stages"], meta["processes"]
                    r["store_mb"] = round(sum(p.stat().st_size for p in (cache / "data").rglob("*")
                                              if p.is_file()) / 1e6, 1)
                row[which] = r
                if which == "first":
                    store = max((cache / "data").glob("*/*/meta.json"), key=lambda p: p.stat().st_mtime_ns).parent
                show(f"{name}: check, {which}", r, f"  x{r['wall_s'] / plain['wall_s']:.1f} plain read  "
                     f"{r['max_rss_gb'] - plain['max_rss_gb']:+.2f} GB RSS" +
                     (f"  store {r['store_mb']} MB" if which == "first" else ""))
            r = run([PY, "-c", READ, str(store), str(args.reads)], env)
            r["read_ms"] = float(r.pop("output").split(" ms each")[0].rsplit(" ", 1)[-1])
            row["random_reads"] = r
            show(f"{name}: random reads", r, f"  {r['read_ms']:.3f} ms a record")
            results[name] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, b = results["jsonl"], results["parquet"]
    results["parquet_over_jsonl"] = {
        which: {"wall": round(b[which]["wall_s"] / a[which]["wall_s"], 2),
                "cpu": round(b[which]["cpu_s"] / a[which]["cpu_s"], 2),
                "max_rss_gb": round(b[which]["max_rss_gb"] - a[which]["max_rss_gb"], 3),
                "peak_pss_gb": round(b[which]["peak_pss_gb"] - a[which]["peak_pss_gb"], 3)}
        for which in ("first", "second") if which in b}
    results["parquet_check_over_pyarrow_text"] = {
        "max_rss_gb": round(b["first"]["max_rss_gb"] - b["plain"]["max_rss_gb"], 3),
        "peak_pss_gb": round(b["first"]["peak_pss_gb"] - b["plain"]["peak_pss_gb"], 3),
        "wall_x": round(b["first"]["wall_s"] / b["plain"]["wall_s"], 1)}
    results["jsonl_check_over_plain_json"] = {"wall_x": round(a["first"]["wall_s"] / a["plain"]["wall_s"], 1)}
    results["random_read_ms"] = {"jsonl": a["random_reads"]["read_ms"], "parquet": b["random_reads"]["read_ms"]}
    print(json.dumps({k: results[k] for k in ("parquet_over_jsonl", "parquet_check_over_pyarrow_text",
                                              "jsonl_check_over_plain_json", "random_read_ms")}, indent=1))
    first = results["parquet_over_jsonl"]["first"]
    print(f"first check: Parquet / JSON lines = {first['wall']:.2f}x wall, {first['cpu']:.2f}x CPU; Parquet check "
          f"peak RSS {results['parquet_check_over_pyarrow_text']['max_rss_gb']:+.2f} GB over pyarrow's text read; "
          f"stores {b['first']['store_mb']} MB vs {a['first']['store_mb']} MB")
    if args.save:
        out = ROOT / "bench" / "results" / f"data-formats-{args.records}-{results['date']}.json"
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"results: {out}")


if __name__ == "__main__":
    main()
