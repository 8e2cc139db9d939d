"""Mixtures: several data files in one run, each with a weight (a share of the mixture) or a record count.

``--data_path a.json:0.3,b.parquet:0.7`` (weights, written with a decimal point), ``a.json:500,b.json:2000``
(record counts, whole numbers), ``a.json,b.json`` (every record of each file, once), or a list of
``{path, weight}`` / ``{path, count}`` mappings (a YAML train config, or JSON on the command line). Weights and
counts do not mix in one list.

What is drawn from each file, with the run's seed:

* weights: the mixture holds as many records as the files together; each file gives its share of that total
  (largest remainders, so the shares add up to it exactly);
* counts: each file gives that many records;
* a file that gives fewer records than it holds gives a subset drawn without replacement; one that must give
  more repeats each of its records the same number of times and draws the rest without replacement
  (never more than one repeat apart), so records are repeated only when a count or share asks for more than the
  file holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmtune.errors import MixtureError

INDICES_KEPT = 100_000
"""Above this many drawn records per file, the run folder keeps their digest only, not the list."""

_COUNT = re.compile(r"^\+?\d+$")


@dataclass(frozen=True)
class Entry:
    """One file of a mixture, with its weight or record count (neither: every record once)."""

    path: str
    weight: float | None = None
    count: int | None = None

    def asked(self) -> dict:
        if self.weight is not None:
            return {"weight": self.weight}
        return {"count": self.count} if self.count is not None else {"all": True}


def parse_mixture(value, flag: str = "--data_path") -> list[Entry] | None:
    """The entries of a ``--data_path`` / ``--eval_data_path`` value, or None for one plain path (read as
    always). Each bad entry raises ``MixtureError`` naming ``flag`` and the entry."""
    if value is None:
        return None
    shown = _show(value)
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise MixtureError(f"{flag}: a list of files must be JSON ({exc.msg} at column {exc.colno})") from None
        elif Path(value).exists() or ("," not in value and not _weighted(value)):
            return None
        else:
            value = [part.strip() for part in value.split(",")]
    if not isinstance(value, list) or not value:
        raise MixtureError(f"{flag}: expected a path, PATH:WEIGHT,... or a list of {{path, weight}} entries")
    entries = [_entry(item, flag) for item in value]
    kinds = {("weight" if e.weight is not None else "count" if e.count is not None else "all") for e in entries}
    if len(kinds) > 1:
        raise MixtureError(f"{flag}: {shown} mixes " + " and ".join(sorted(kinds)).replace("all", "entries "
                           "without a number") + "; give every file a weight (a.json:0.3), or every file a record "
                           "count (a.json:500)")
    weights = [e.weight for e in entries if e.weight is not None] or [e.count for e in entries if e.count is not None]
    if weights and sum(weights) <= 0:
        raise MixtureError(f"{flag}: {shown}: the weights add up to 0; give at least one file a positive "
                           "weight or count")
    seen = set()
    for e in entries:
        if not Path(e.path).exists():
            raise MixtureError(f"{flag}: entry {e.path!r}: no such file or folder")
        if e.path in seen:
            raise MixtureError(f"{flag}: {e.path} is listed twice; give it one weight or count")
        seen.add(e.path)
    return entries


def _weighted(value: str) -> bool:
    """Whether a single entry ends in ``:NUMBER``-like text (a weight or count given to one file)."""
    return ":" in value and bool(value.rsplit(":", 1)[1].strip())


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _entry(item, flag: str) -> Entry:
    if isinstance(item, dict):
        unknown = set(item) - {"path", "weight", "count"}
        if "path" not in item or unknown or ("weight" in item and "count" in item):
            raise MixtureError(f"{flag}: entry {_show(item)}: expected {{path, weight}} or {{path, count}}")
        path, number = str(item["path"]), item.get("weight", item.get("count"))
        return _checked(flag, _show(item), path, number, as_count="count" in item)
    if not isinstance(item, str) or not item:
        raise MixtureError(f"{flag}: entry {_show(item)}: expected a path or PATH:WEIGHT")
    if Path(item).exists() or ":" not in item:
        return Entry(item)
    path, text = item.rsplit(":", 1)
    return _checked(flag, item, path, text.strip(), as_count=bool(_COUNT.match(text.strip())))


def _checked(flag: str, shown: str, path: str, number, as_count: bool) -> Entry:
    if number is None:
        return Entry(path)
    what = "count" if as_count else "weight"
    if isinstance(number, bool):
        number = str(number)
    try:
        value = float(number)
    except (TypeError, ValueError):
        raise MixtureError(f"{flag}: entry {shown}: {what} {number!r} is not a number; write PATH:WEIGHT "
                           "(a share, e.g. a.json:0.3) or PATH:COUNT (records, e.g. a.json:500)") from None
    if not math.isfinite(value) or value < 0:
        raise MixtureError(f"{flag}: entry {shown}: {what} {number!r} must be a finite number >= 0")
    if as_count:
        if value != int(value):
            raise MixtureError(f"{flag}: entry {shown}: count {number!r} must be a whole number of records")
        return Entry(path, count=int(value))
    return Entry(path, weight=value)


def targets(entries: Sequence[Entry], sizes: Sequence[int]) -> list[int]:
    """How many records each file gives: its count, its share of the files' total (largest remainders), or all."""
    if entries[0].weight is None:
        return [e.count if e.count is not None else n for e, n in zip(entries, sizes)]
    total, weight = sum(sizes), sum(e.weight for e in entries)
    exact = [total * e.weight / weight for e in entries]
    out = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: out[i] - exact[i])[: total - sum(out)]:
        out[i] += 1
    return out


def draw(size: int, target: int, rng: np.random.Generator) -> np.ndarray:
    """``target`` positions out of ``size``, sorted: a subset without replacement, or every position the same
    number of times plus a subset for the rest."""
    repeats, rest = divmod(target, size) if size else (0, 0)
    rest_at = rng.choice(size, rest, replace=False) if rest else np.zeros(0, np.int64)
    return np.sort(np.concatenate([np.tile(np.arange(size), repeats), rest_at]).astype(np.int64))


def rng_for(seed: int, file: int, purpose: int) -> np.random.Generator:
    """The generator of one file's draw: ``purpose`` 0 the training draw, 1 the eval draw, 2 the held-out split.
    A file's draw does not change when another file of the list changes."""
    return np.random.default_rng([seed, file, purpose])


def split_off(size: int, ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) positions of one file: ``ratio`` of its records (at least 1), drawn with ``rng``."""
    order = rng.permutation(size)
    n_eval = max(1, int(size * ratio))
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def file_indices(records: Sequence, positions: np.ndarray) -> list[int]:
    """The records' indices in their file (stored records know them without decoding)."""
    if hasattr(records, "positions"):
        return [int(i) for i in np.asarray(records.positions)[positions]]
    return [int(records[int(i)].index) for i in positions]


def drawn_record(entry: Entry, valid: int, held_out: int, indices: list[int]) -> dict:
    """What the run folder keeps of one file's draw: asked, valid records, held out, drawn, and which."""
    digest = hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()
    row = {"path": str(Path(entry.path).resolve()), **entry.asked(), "valid_records": valid,
           "held_out": held_out, "drawn": len(indices), "distinct": len(set(indices)), "indices_sha256": digest}
    if len(indices) <= INDICES_KEPT:
        row["indices"] = indices
    return row


class Concat(Sequence):
    """Several record sequences read as one, lazily (a stored file's records stay in its store)."""

    def __init__(self, parts: list[Sequence]):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        i = int(i) + (len(self) if int(i) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]

    def take(self, positions) -> Sequence:
        """The records at ``positions``, still lazy when the positions are in order (as filters keep them)."""
        positions = np.asarray(positions, dtype=np.int64)
        part_of = np.searchsorted(self.starts, positions, side="right") - 1
        if len(positions) > 1 and np.any(np.diff(part_of) < 0):
            return [self[int(i)] for i in positions]
        pieces = []
        for k in np.unique(part_of):
            at = positions[part_of == k] - self.starts[k]
            part = self.parts[int(k)]
            pieces.append(part.take(at) if hasattr(part, "take") else [part[int(j)] for j in at])
        return Concat(pieces)


def plan_lines(entries: Sequence[Entry], valid: Sequence[int]) -> list[str]:
    """``check-data``'s report of a mixture: what each file would give a run (before any held-out split)."""
    wanted = targets(entries, valid)
    total = sum(wanted)
    lines = [f"mixture of {len(entries)} files: {total:,} records"]
    for e, n, got in zip(entries, valid, wanted):
        asked = ", ".join(f"{k} {v:g}" if k == "weight" else f"{k} {v}" for k, v in e.asked().items())
        share = f"{100 * got / total:.1f}%" if total else "-"
        how = "repeated" if got > n else "subset" if got < n else "every record once"
        lines.append(f"  {e.path} ({asked}): {got:,} of {n:,} valid records, {share} of the mixture ({how})")
    return lines
