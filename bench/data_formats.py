"""The same records as JSON lines (image files) and as Parquet with the images' bytes embedded: the first and the
second ``vlmtune check-data``, each in its own fresh process, and the size of the data store each leaves.

    nice .venv/bin/python bench/data_formats.py [--records 20000]

Records: short single-image records over data_examples' six images (a few hundred bytes each), the same ids,
turns and image bytes in both files. Columns: wall seconds of the whole command, peak RSS of the largest process
(``wait4``'s maxrss), the store's size on disk. Ratios are Parquet over JSON lines, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = sorted((ROOT / "data_examples" / "images").glob("*.png"))


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        image = rng.choice(IMAGES)
        out.append({"id": f"r{i}", "image": image.name, "conversations": [
            {"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
            {"from": "gpt", "value": f"A shape, number {rng.randrange(10**6)}."}]})
    return out


def run(path: Path, cache: Path, folder: Path) -> dict:
    env = {**os.environ, "VLMTUNE_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vlmtune.cli", "check-data", str(path), "--image_folder",
                             str(folder)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"check-data failed on {path}:\n{out[-2000:]}")
    store = sum(p.stat().st_size for p in (cache / "data").rglob("*") if p.is_file())
    return {"seconds": round(time.perf_counter() - start, 2), "peak_rss_gb": round(usage.ru_maxrss / 1e6, 3),
            "store_mb": round(store / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20000)
    args = parser.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = records(args.records)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "data.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        blobs = {p.name: p.read_bytes() for p in IMAGES}
        table = [{**r, "image": [{"bytes": blobs[r["image"]], "path": r["image"]}]} for r in rows]
        parquet = tmp / "data.parquet"
        pq.write_table(pa.Table.from_pylist(table), parquet, row_group_size=4096)
        results = {}
        for name, path in (("jsonl", jsonl), ("parquet", parquet)):
            cache = tmp / f"cache-{name}"
            results[name] = {"file_mb": round(path.stat().st_size / 1e6, 1),
                             "first": run(path, cache, IMAGES[0].parent), "second": run(path, cache, IMAGES[0].parent)}
    print(json.dumps({"records": args.records, "load": os.getloadavg(), **results}, indent=1))
    for run_ in ("first", "second"):
        a, b = results["jsonl"][run_], results["parquet"][run_]
        print(f"{run_} check: Parquet / JSON lines = {b['seconds'] / a['seconds']:.2f}x time, "
              f"{b['peak_rss_gb'] - a['peak_rss_gb']:+.3f} GB peak RSS, store {b['store_mb']} MB vs {a['store_mb']} MB")


if __name__ == "__main__":
    main()
