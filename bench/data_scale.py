"""Data check at scale: what a user waits for before training, on synthetic LLaVA files of 10K to 1M records.

    nice .venv/bin/python bench/data_scale.py [--sizes 10000,100000,1000000] [--seed 0] [--no-train] [--datasets]
        [--records short|ordinary] [--processes N]

Files: single-image records over 50 real JPEGs (sizes 160 to 1023 px a side), written as JSON lines with
``--seed``. ``--records short`` (the default): a question of 5 to 20 words and an answer of 20 to 90 from a small
vocabulary (about 530 bytes a record: 1M records are 530 MB). ``--records ordinary``: the records of issue 21, a
question of 3 to 43 words and an answer of 5 to 83 words of ordinary English (about 370 tokens median with the
image on the tiny processor; about 640 bytes a record). Each figure below comes from its own process, started fresh,
as a user runs it, on the embedded tiny Qwen2-VL processor:

  plain parse     ``[json.loads(line) for line in file]``: the baseline, measured in the same run
  check, 1st      ``vlmtune check-data FILE`` on an empty data cache (``$VLMTUNE_CACHE/data``)
  check, 2nd      the same command again: the store is opened, not rebuilt
  edit one        one record's answer edited in the middle of the file, then ``check-data``: one record re-measured
  train, 1st/2nd  ``vlmtune train ... --max_steps 1``: seconds from the command's start to its first logged step
                  (check, model load and one LoRA step), on an empty data cache and then again
  datasets        (``--datasets``, needs ``pip install datasets``) the same parse, validation, chat template and
                  tokenizer work as HF ``datasets.load_dataset("json")`` + ``.map(num_proc=cores)`` (text tokens
                  only), first run and cached run: the engine the issue asked to consider, on the same file

Columns: wall seconds of the whole command (process start, imports and processor load included) and, for the
check, the seconds the check itself reports; CPU seconds of the process and its workers; peak memory as the
largest resident set of one process (``wait4``'s maxrss) and as the peak of the process tree's proportional set
size (PSS, sampled every 0.5 s: shared pages counted once). Ratios are to the plain parse of the same file:
time as a factor, memory as GB above it. Per stage of the first check, the seconds and the peak RSS of the
building process so far come from the store's meta.json. The load average of the machine is printed with each
row: on a shared machine the wall time follows the cores the job gets, the CPU time does not.

Results go to bench/results/data-scale-<date>.json, rewritten after each size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

WORDS = ("a photo of the red circle on white background blue square next to green triangle cat sits mat looks at "
         "camera two dogs run across field grass what is in this image describe picture one sentence how many "
         "objects are there three shapes video shows ball moving from left right color yellow compare images "
         "first brighter than second answer question briefly").split()

ORDINARY = ("the a of and to in is that it with on for as this are at by from there which be or an was his her their "
            "picture image photograph scene building window kitchen table person woman man child people street vehicle "
            "bicycle umbrella background foreground colorful wooden metallic standing sitting holding wearing looking "
            "walking several number visible between behind underneath beside surrounded appears probably possibly "
            "describe explain identify question answer detailed information specific location weather morning evening "
            "afternoon shadows reflection mountains landscape river bridge restaurant customers waiting traffic signal "
            "pedestrians crossing animals grazing elephant giraffe horse sheep airplane runway passengers luggage "
            "computer keyboard monitor desk office bookshelf television remote control sandwich vegetables plate fork "
            "knife pizza dessert chocolate strawberry banana orange clothing jacket shirt trousers glasses hat shoes "
            "baseball tennis racket skateboard surfboard beach ocean waves because although however therefore "
            "important interesting different similar compared another likely suggests atmosphere environment activity "
            "purpose reason happening event celebration crowd audience performance stage").split()
"""Ordinary English words (issue 21's records): about 2.3 tokens a word on the tiny tokenizer."""

PLAIN = """
import json, sys, time
start = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    records = [json.loads(line) for line in f if line.strip()]
print(f"parsed {len(records)} in {time.perf_counter() - start:.3f}s")
"""

DATASETS = """
import os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
from pathlib import Path
import datasets
from vlmtune.data import records as R
from vlmtune.data.conversation import Conversation
from vlmtune.model.load import load_processor

path, model_dir, cache, procs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
processor = load_processor(model_dir)
conversation = Conversation(processor)
resolvers = R.resolvers_for(path, None, None, False)
start = time.perf_counter()
data = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
loaded = time.perf_counter()

def lengths(batch):
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    records = [R._parse_record(i, row, resolvers)[0] for i, row in enumerate(rows)]
    counts, problems = conversation.measure(records)  # the same work as the store's: counts and the label check
    return {"text_tokens": counts}

measured = data.map(lengths, batched=True, batch_size=2048, num_proc=procs, remove_columns=data.column_names)
done = time.perf_counter()
print(f"datasets: {len(measured)} rows, load {loaded - start:.1f}s, map {done - loaded:.1f}s")
"""


# ---------------------------------------------------------------- synthetic data


def make_images(folder: Path, seed: int, count: int = 50) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(160, 1024, size=2))
        noise = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype("uint8")
        Image.fromarray(noise).resize((width, height)).save(folder / f"img_{i:02d}.jpg", quality=80)
        names.append(f"images/img_{i:02d}.jpg")
    return names


def synthetic_record(rng: random.Random, i: int, images: list[str]) -> dict:
    question = " ".join(rng.choices(WORDS, k=rng.randint(5, 20))).capitalize() + "?"
    answer = " ".join(rng.choices(WORDS, k=rng.randint(20, 90))).capitalize() + "."
    return {"id": f"r{i:07d}", "image": rng.choice(images),
            "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}


def ordinary_record(rng: random.Random, i: int, images: list[str]) -> dict:
    """Issue 21's ordinary record: a question of 3 to 43 words, an answer of 5 to 83 words."""
    question = " ".join(rng.choices(ORDINARY, k=rng.randint(3, 43))).capitalize() + "?"
    answer = " ".join(rng.choices(ORDINARY, k=rng.randint(5, 83))).capitalize() + "."
    return {"id": f"r{i:07d}", "image": rng.choice(images),
            "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}


RECORDS = {"short": synthetic_record, "ordinary": ordinary_record}


def make_file(path: Path, n: int, images: list[str], seed: int, kind: str = "short") -> None:
    rng = random.Random(seed)
    make = RECORDS[kind]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps(make(rng, i, images)) + "\n")


def edit_one(path: Path, n: int) -> None:
    """Rewrite the file with the answer of record n // 2 made longer (streamed: the file is never held)."""
    tmp = path.with_suffix(".tmp")
    with open(path) as src, open(tmp, "w") as dst:
        for i, line in enumerate(src):
            if i == n // 2:
                record = json.loads(line)
                record["conversations"][1]["value"] += " Edited: the answer is longer now."
                line = json.dumps(record) + "\n"
            dst.write(line)
    os.replace(tmp, path)


# ---------------------------------------------------------------- measuring a command


def _tree_pss(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total / 1e9


def run(cmd: list[str], env: dict, step_marker: str | None = None) -> dict:
    """Run a command; wall and CPU seconds, largest RSS, peak tree PSS, its output, and when ``step_marker``
    first appeared in the output (seconds from the start)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[str] = []
    marked: list[float] = []
    peak = [0.0]

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if step_marker and not marked and step_marker in line:
                marked.append(time.perf_counter() - start)

    def sample() -> None:
        while proc.returncode is None:
            peak[0] = max(peak[0], _tree_pss(proc.pid))
            time.sleep(0.5)

    reader = threading.Thread(target=read, daemon=True)
    sampler = threading.Thread(target=sample, daemon=True)
    reader.start()
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    sampler.join(timeout=2)
    output = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{output[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "max_rss_gb": round(usage.ru_maxrss / 1e6, 3), "peak_pss_gb": round(peak[0], 3),
            "first_step_s": round(marked[0], 2) if marked else None, "load_avg": round(os.getloadavg()[0], 2),
            "output": output}


def check_seconds(output: str) -> float | None:
    found = re.search(r"valid records \(.*\) in ([\d.]+)s", output)
    return float(found.group(1)) if found else None


def newest_meta(cache: Path) -> dict:
    metas = sorted((cache / "data").glob("*/*/meta.json"), key=lambda p: p.stat().st_mtime_ns)
    return json.loads(metas[-1].read_text())


# ---------------------------------------------------------------- one size


def bench_size(n: int, work: Path, images: list[str], args, env: dict, model_dir: str) -> dict:
    path = work / f"data_{n}.jsonl"
    start = time.perf_counter()
    make_file(path, n, images, args.seed, args.records)
    print(f"\n== {n:,} records: {path.stat().st_size / 1e6:,.0f} MB written in {time.perf_counter() - start:.0f}s",
          flush=True)
    cache = Path(env["VLMTUNE_CACHE"])
    row: dict = {"records": n, "kind": args.records, "file_mb": round(path.stat().st_size / 1e6, 1)}

    def show(name: str, r: dict, extra: str = "") -> None:
        print(f"  {name:<16} wall {r['wall_s']:7.1f}s  cpu {r['cpu_s']:7.1f}s  max RSS {r['max_rss_gb']:5.2f} GB  "
              f"tree PSS {r['peak_pss_gb']:5.2f} GB  (load {r['load_avg']:.1f}){extra}", flush=True)

    plain = run([PY, "-c", PLAIN, str(path)], env)
    plain["parse_s"] = float(re.search(r"in ([\d.]+)s", plain["output"]).group(1))
    show("plain parse", plain, f"  parse {plain['parse_s']:.1f}s")
    row["plain"] = plain

    check_cmd = [PY, "-m", "vlmtune.cli", "check-data", str(path), "--max_seq_length", "4096"]
    if args.processes:
        check_cmd += ["--processes", str(args.processes)]
    shutil.rmtree(cache / "data", ignore_errors=True)
    for name in ("check_1st", "check_2nd"):
        r = run(check_cmd, env)
        r["check_s"] = check_seconds(r["output"])
        if name == "check_1st":
            meta = newest_meta(cache)
            r["stages"] = meta["stages"]
            r["processes"] = meta["processes"]
        row[name] = r
        show(name.replace("_", ", "), r, f"  check {r['check_s']:.1f}s  x{r['wall_s'] / plain['wall_s']:.1f} plain  "
                                         f"+{r['max_rss_gb'] - plain['max_rss_gb']:.2f} GB")
    for stage, figures in row["check_1st"]["stages"].items():
        print(f"    stage {stage:<36} {figures['seconds']:7.1f}s  peak RSS so far {figures['peak_rss_gb']:.2f} GB")

    edit_one(path, n)
    r = run(check_cmd, env)
    r["check_s"] = check_seconds(r["output"])
    meta = newest_meta(cache)
    r["measured"], r["reused"] = meta["measured"], meta["reused"]
    row["edit_one"] = r
    show("edit one", r, f"  check {r['check_s']:.1f}s  measured {r['measured']}, reused {r['reused']:,}")

    if args.train:
        out = work / "out"
        train_cmd = [PY, "-m", "vlmtune.cli", "train", "--data_path", str(path), "--output_dir", str(out),
                     "--max_steps", "1", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
                     "--disable_tqdm", "True", "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0"]
        shutil.rmtree(cache / "data", ignore_errors=True)
        for name in ("train_1st", "train_2nd"):
            r = run(train_cmd, env, step_marker="step 1/1  loss")  # the console line of step 1
            shutil.rmtree(out, ignore_errors=True)
            row[name] = r
            show(name.replace("_", ", "), r, f"  first step at {r['first_step_s']:.1f}s")

    if args.datasets and n in args.datasets_sizes:
        hf_cache = work / "hf-datasets"
        shutil.rmtree(hf_cache, ignore_errors=True)
        for name in ("datasets_1st", "datasets_2nd"):
            r = run([PY, "-c", DATASETS, str(path), model_dir, str(hf_cache), str(os.cpu_count())], env)
            found = re.search(r"load ([\d.]+)s, map ([\d.]+)s", r["output"])
            r["load_s"], r["map_s"] = float(found.group(1)), float(found.group(2))
            row[name] = r
            show(name.replace("_", ", "), r, f"  load {r['load_s']:.1f}s  map {r['map_s']:.1f}s")
        shutil.rmtree(hf_cache, ignore_errors=True)
    path.unlink()
    for value in row.values():
        if isinstance(value, dict):
            value.pop("output", None)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--records", choices=sorted(RECORDS), default="short",
                        help="short records, or issue 21's ordinary ones (results file data-scale-ordinary-<date>)")
    parser.add_argument("--processes", type=int, help="check-data --processes (default: every core)")
    parser.add_argument("--no-train", dest="train", action="store_false", help="skip the training-start rows")
    parser.add_argument("--datasets", action="store_true", help="also time HF datasets (needs `datasets`)")
    parser.add_argument("--datasets-sizes", default="10000,100000")
    parser.add_argument("--workdir", help="where files and caches go (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.datasets_sizes = {int(s) for s in args.datasets_sizes.split(",")}

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vlmtune-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLMTUNE_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT)}
    model_dir = subprocess.run([PY, "-c", "from vlmtune.testing.tiny import tiny_model_path; print(tiny_model_path())"],
                               env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()[-1]
    images = make_images(work / "images", args.seed)
    import tokenizers
    import transformers

    results = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": datetime.date.today().isoformat(),
               "python": platform.python_version(), "transformers": transformers.__version__,
               "tokenizers": tokenizers.__version__, "seed": args.seed, "sizes": []}
    kind = "" if args.records == "short" else f"{args.records}-"
    out = ROOT / "bench" / "results" / f"data-scale-{kind}{results['date']}.json"
    earlier = json.loads(out.read_text())["sizes"] if out.is_file() else []  # a day's runs add up, by size
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            row = bench_size(n, work, images, args, env, model_dir)
            rows = {r["records"]: r for r in earlier + results["sizes"]}
            rows[n] = row
            results["sizes"] = [rows[k] for k in sorted(rows)]
            out.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
