"""Mixtures (issue 18 §2): several data files in one run, by weight or record count, seeded; per-file eval splits;
what was drawn in the run folder; check-data per file; bad entries as one line naming the flag and the entry."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

SIZES = {"a": 2000, "b": 1000, "c": 1000}


def write_text_records(path: Path, name: str, n: int) -> Path:
    """``n`` text-only LLaVA records whose ids say their file and index: ``b17`` is record 17 of b."""
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"{name}{i}", "conversations": [
                {"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{name} {i}."}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("mixture")
    return {name: str(write_text_records(folder / f"{name}.jsonl", name, n)) for name, n in SIZES.items()}


@pytest.fixture(scope="module")
def build(pipeline, files):
    """(train, eval, drawn) of a ``--data_path`` spec written with file letters, e.g. ``a:0.5,b:0.3``."""
    from vlmtune.config import DataArguments
    from vlmtune.stages.sft import sft_datasets

    p = pipeline()

    def spell(spec: str | None) -> str | None:
        if spec is None:
            return None
        return ",".join(files[part[0]] + part[1:] for part in spec.split(","))

    def make(spec: str, seed: int = 1, eval_spec: str | None = None, val_ratio: float = 0.0):
        drawn: dict = {}
        args = DataArguments(data_path=spell(spec), eval_data_path=spell(eval_spec), val_ratio=val_ratio)
        train, evaluation = sft_datasets(args, p.processor, p.family, p.budget, seed, drawn)
        return train, evaluation, drawn

    return make


def ids(dataset) -> list[str]:
    return [record.id for record in dataset.records]


def per_file(names: list[str]) -> Counter:
    return Counter(name[0] for name in names)


def test_weights_draw_the_requested_shares_reproducibly_under_a_seed(build):
    train, evaluation, drawn = build("a:0.5,b:0.3,c:0.2", seed=1)
    names = ids(train)
    total = sum(SIZES.values())
    assert evaluation is None and len(names) == total  # weights share out as many records as the files hold
    counts = per_file(names)
    for name, weight in {"a": 0.5, "b": 0.3, "c": 0.2}.items():  # within sampling error of the asked share
        assert abs(counts[name] - weight * total) <= 3 * math.sqrt(total * weight * (1 - weight))
    assert counts == {"a": 2000, "b": 1200, "c": 800}  # the documented rule: shares of the total, exactly
    seen = Counter(names)
    assert all(seen[f"a{i}"] == 1 for i in range(2000))  # its share is its size: every record once
    assert sorted(Counter(seen[f"b{i}"] for i in range(1000)).items()) == [(1, 800), (2, 200)]  # repeats even
    assert all(seen[n] == 1 for n in names if n[0] == "c")  # a subset, without replacement
    # the record of the draw names the same records (file indices, read from the ids)
    rows = {Path(r["path"]).stem: r for r in drawn["train"]}
    assert drawn["seed"] == 1 and set(rows) == {"a", "b", "c"}
    for name, row in rows.items():
        assert row["indices"] == sorted(int(n[1:]) for n in names if n[0] == name)
        assert (row["drawn"], row["valid_records"], row["held_out"]) == (counts[name], SIZES[name], 0)

    again, _, drawn_again = build("a:0.5,b:0.3,c:0.2", seed=1)
    assert ids(again) == names and drawn_again == drawn
    other, _, drawn_other = build("a:0.5,b:0.3,c:0.2", seed=2)
    assert per_file(ids(other)) == counts  # the same shares ...
    assert {n for n in ids(other) if n[0] == "c"} != {n for n in names if n[0] == "c"}  # ... other records
    assert drawn_other["train"][2]["indices_sha256"] != drawn["train"][2]["indices_sha256"]


def test_counts_and_eval_splits_per_file(build):
    train, evaluation, drawn = build("a:500,b:1500", val_ratio=0.1)
    names, held = ids(train), ids(evaluation)
    assert per_file(names) == {"a": 500, "b": 1500}
    assert per_file(held) == {"a": 200, "b": 100}  # --val_ratio of each file
    assert not set(names) & set(held)  # held-out records never train
    assert len(set(n for n in names if n[0] == "b")) == 900  # b gives more than it keeps: all 900, some twice
    assert [r["held_out"] for r in drawn["eval"]] == [200, 100]
    assert sorted(int(n[1:]) for n in held if n[0] == "a") == drawn["eval"][0]["indices"]

    train, evaluation, drawn = build("a,c", eval_spec="b:50,c:30")
    assert per_file(ids(train)) == {"a": 2000, "c": 1000}  # entries without a number: every record once
    assert per_file(ids(evaluation)) == {"b": 50, "c": 30}  # --eval_data_path takes the same list
    assert [r["drawn"] for r in drawn["eval"]] == [50, 30]


def test_a_plain_path_is_read_as_before(build, files):
    train, evaluation, drawn = build("a", val_ratio=0.25)
    assert drawn == {} and len(train) == 1500 and len(evaluation) == 500


def test_a_yaml_list_of_files(tmp_path, files):
    from vlmtune.config import parse_train_args
    from vlmtune.data.mixture import Entry, parse_mixture

    config = tmp_path / "train.yaml"
    config.write_text(f"data_path:\n  - {{path: {files['a']}, weight: 0.7}}\n  - {{path: {files['b']}, weight: 3}}\n"
                      f"eval_data_path: [{{path: {files['c']}, count: 20}}]\n")
    data_args = parse_train_args([str(config)])[1]
    assert parse_mixture(data_args.data_path) == [Entry(files["a"], weight=0.7), Entry(files["b"], weight=3.0)]
    assert parse_mixture(data_args.eval_data_path, "--eval_data_path") == [Entry(files["c"], count=20)]


@pytest.mark.parametrize("spec, fragment", [
    ("a:abc,b:0.5", "entry A:abc: weight 'abc' is not a number"),
    ("a:-0.3,b:0.5", "entry A:-0.3: weight '-0.3' must be a finite number >= 0"),
    ("a:nan,b:0.5", "entry A:nan: weight 'nan' must be a finite number >= 0"),
    ("a:inf,b:0.5", "must be a finite number >= 0"),
    ("a:0.0,b:0", "mixes count and weight"),
    ("a:0.0,b:0.0", "the weights add up to 0"),
    ("a:0,b:0", "the weights add up to 0"),
    ("a:0.5,missing.json:0.5", "entry 'missing.json': no such file or folder"),
    ("a:0.5,b:500", "mixes count and weight"),
    ("a:0.5,b", "mixes entries without a number and weight"),
    ("a:0.5,a:0.5", "A is listed twice"),
    ('[{"path": "A", "weight": "x"}]', "weight 'x' is not a number"),
    ('[{"path": "A", "weight": 1, "count": 2}]', "expected {path, weight} or {path, count}"),
    ('[{"path": "A", "count": 2.5}]', "count 2.5 must be a whole number"),
    ('[{"path": "A"', "a list of files must be JSON"),
])
def test_bad_mixture_entries_name_the_flag_and_the_entry(files, spec, fragment):
    from vlmtune.data.mixture import parse_mixture
    from vlmtune.errors import MixtureError

    def spell(text: str) -> str:
        return text.replace('"A"', json.dumps(files["a"])).replace("A", files["a"])

    if not spec.startswith("["):
        spec = ",".join(files[p[0]] + p[1:] if p[0] in files and p[1:2] in ("", ":") else p for p in spec.split(","))
    with pytest.raises(MixtureError) as info:
        parse_mixture(spec, "--eval_data_path")
    message = str(info.value)
    assert message.startswith("--eval_data_path: ") and spell(fragment) in message and "\n" not in message


def test_an_empty_file_and_a_bad_weight_stop_the_run_in_one_line(files, tmp_path, capsys):
    from vlmtune.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [(f"{files['a']}:0.5,{empty}:0.5", f"--data_path: entry {empty}: the data file holds no records"),
             (f"{files['a']}:x,{files['b']}:0.5", f"--data_path: entry {files['a']}:x: weight 'x'")]
    for spec, fragment in cases:
        code = main(["train", "--data_path", spec, "--output_dir", str(tmp_path / "out"), "--use_cpu", "True"])
        err = capsys.readouterr().err
        assert code == 1 and fragment in err and "Traceback" not in err, err
        assert len([line for line in err.splitlines() if not line.startswith("[vlmtune]")]) == 1, err


def test_check_data_reports_each_file_and_the_mixture(files, capsys):
    from vlmtune.cli import main

    assert main(["check-data", f"{files['b']}:300,{files['c']}:1500", "--processes", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{files['b']}: 1,000 valid records" in out and f"{files['c']}: 1,000 valid records" in out
    assert "mixture of 2 files: 1,800 records" in out
    assert f"{files['b']} (count 300): 300 of 1,000 valid records, 16.7% of the mixture (subset)" in out
    assert f"{files['c']} (count 1500): 1,500 of 1,000 valid records, 83.3% of the mixture (repeated)" in out


@pytest.mark.slow
def test_a_one_step_run_records_what_it_drew(tmp_path):
    from vlmtune.cli import main

    a = write_text_records(tmp_path / "a.jsonl", "a", 12)
    b = write_text_records(tmp_path / "b.jsonl", "b", 8)
    out = tmp_path / "out"
    code = main(["train", "--data_path", f"{a}:0.75,{b}:0.25", "--val_ratio", "0.25", "--output_dir", str(out),
                 "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "True", "--report_to", "none",
                 "--save_strategy", "no", "--eval_strategy", "no", "--disable_tqdm", "True", "--seed", "7"])
    assert code == 0
    drawn = json.loads((out / "mixture.json").read_text())
    assert drawn["seed"] == 7
    # 3 of a and 2 of b held out; the 15 left share out 0.75 / 0.25 -> 11.25 / 3.75 -> 11 and 4 (largest remainder)
    assert [(r["path"], r["weight"], r["valid_records"], r["held_out"], r["drawn"]) for r in drawn["train"]] == [
        (str(a.resolve()), 0.75, 12, 3, 11), (str(b.resolve()), 0.25, 8, 2, 4)]
    assert [(r["path"], r["drawn"]) for r in drawn["eval"]] == [(str(a.resolve()), 3), (str(b.resolve()), 2)]
    for train_row, eval_row, n in zip(drawn["train"], drawn["eval"], (12, 8)):
        assert not set(train_row["indices"]) & set(eval_row["indices"])
        assert all(0 <= i < n for i in train_row["indices"] + eval_row["indices"])
