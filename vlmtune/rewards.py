"""Reward functions for GRPO: the built-ins, and the loader of a user's own (``--reward_funcs my_rewards.py:score``).

A reward function is called once per prompt, with the completions sampled for it and the record's fields (every
key of a GRPO record besides ``id``, ``image``, ``video`` and ``conversations``) as keyword arguments, plus
``record_id``; it returns one float per completion::

    def score(completions: list[str], answer: str, **kwargs) -> list[float]:
        return [1.0 if answer in c else 0.0 for c in completions]

Parameters without a default (after ``completions``) name the fields the function reads: every record must have
them, which is checked before training starts. A function that raises, or returns anything but one finite number
per completion, stops the run with one line naming the function and the record.

The built-ins read the answer from ``<answer>...</answer>`` when the completion has one, else the whole text:

* ``exact_match``: 1 when the answer equals the record's ``answer`` after normalisation (case, punctuation,
  articles, spaces), else 0.
* ``similarity``: partial credit, 0 to 1: how close the answer is to ``answer`` after normalisation (rapidfuzz's
  normalised Indel similarity of the two strings). A model far from the answer still earns more for closer
  completions, so the groups' rewards differ and there is something to learn from (the CPU demo's tiny model
  never earns exact_match).
* ``math``: 1 when the answer and ``answer`` are the same number or formula by math-verify, else 0.
* ``format``: 1 when the completion is ``<think>...</think><answer>...</answer>``, else 0.
* ``box_iou``: the IoU of the first four numbers of the answer, read as [x1, y1, x2, y2], with the record's
  ``box`` (the same coordinates the model is taught to answer in), 0 when there are fewer.

exact_match and box_iou are thin: once ``vlmtune.evaluate`` has its metrics (exact match, box IoU with the
family's box convention), they should call those, so that training and evaluation score answers one way.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.errors import ConfigError, DataError, Problem, RewardError

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def answer_part(completion: str) -> str:
    """The text inside the first ``<answer>...</answer>``, or the whole completion."""
    found = _ANSWER.search(completion)
    return found.group(1) if found else completion


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's answer normalisation)."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(completions: list[str], answer, **kwargs) -> list[float]:
    """1.0 where the normalised answer equals the normalised gold ``answer``."""
    gold = normalize(answer)
    return [float(normalize(answer_part(c)) == gold) for c in completions]


def similarity(completions: list[str], answer, **kwargs) -> list[float]:
    """0 to 1: the normalised Indel similarity of each normalised answer to the normalised gold ``answer``."""
    from rapidfuzz import fuzz

    gold = normalize(answer)
    return [fuzz.ratio(normalize(answer_part(c)), gold) / 100 for c in completions]


def math_answer(completions: list[str], answer, **kwargs) -> list[float]:
    """1.0 where math-verify finds the answer equal to the gold ``answer`` (numbers, fractions, LaTeX)."""
    from math_verify import parse, verify

    gold = parse(str(answer))
    if not gold:
        raise ValueError(f"the gold answer {answer!r} is not a number or formula math-verify can read")
    return [float(verify(gold, parse(answer_part(c)))) for c in completions]


def format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 where the completion is ``<think>...</think>`` then ``<answer>...</answer>``."""
    return [float(_FORMAT.fullmatch(c) is not None) for c in completions]


def box_iou(completions: list[str], box, **kwargs) -> list[float]:
    """IoU of the first four numbers of each answer ([x1, y1, x2, y2]) with the gold ``box``; 0 without four."""
    return [iou([float(v) for v in _NUMBER.findall(answer_part(c))[:4]], box) for c in completions]


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (0 for anything that is not a box)."""
    if len(a) != 4 or len(b) != 4:
        return 0.0
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


BUILTINS: dict[str, Callable] = {"exact_match": exact_match, "similarity": similarity, "math": math_answer,
                                 "format": format_reward, "box_iou": box_iou}


@dataclass
class Reward:
    """A reward function with its weight and the record fields it needs."""

    name: str
    func: Callable
    weight: float = 1.0
    fields: tuple[str, ...] = field(default_factory=tuple)

    def kwargs(self, record: dict) -> dict:
        """The keyword arguments of one call: the record's fields and ``record_id``, those the function takes."""
        values = {**record["fields"], "record_id": record["id"]}
        params = list(inspect.signature(self.func).parameters.values())[1:]
        if any(p.kind == p.VAR_KEYWORD for p in params):
            return values
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return {k: v for k, v in values.items() if k in names}


def required_fields(func: Callable) -> tuple[str, ...]:
    """The parameters after ``completions`` that have no default: the record fields the function reads."""
    params = list(inspect.signature(func).parameters.values())[1:]
    return tuple(p.name for p in params if p.default is inspect.Parameter.empty and p.name != "record_id"
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _load_user_function(spec: str) -> Callable:
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"--reward_funcs {spec}: {file} does not exist; give FILE.py:FUNCTION or one of "
                          f"{sorted(BUILTINS)}")
    module_spec = importlib.util.spec_from_file_location(f"vlmtune_user_rewards_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"--reward_funcs {spec}: loading {file} raised {type(exc).__name__}: {exc}") from None
    func = getattr(module, name, None)
    if not callable(func):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"--reward_funcs {spec}: {file} has no function {name!r} (it defines {defined})")
    return func


def load_rewards(specs: list[str], weights: list[float] | None = None) -> list[Reward]:
    """Built-in names and ``FILE.py:FUNCTION`` specs -> rewards; unknown names and unloadable files raise
    ``ConfigError``."""
    rewards = []
    for i, spec in enumerate(specs):
        if spec in BUILTINS:
            func = BUILTINS[spec]
        elif ":" in spec:
            func = _load_user_function(spec)
        else:
            raise ConfigError(f"--reward_funcs: unknown reward {spec!r}; built-ins are {sorted(BUILTINS)}, or give "
                              "FILE.py:FUNCTION")
        if spec == "math":
            try:
                import math_verify  # noqa: F401
            except ImportError:
                raise ConfigError("--reward_funcs math needs math-verify: pip install 'vlmtune[rl]'") from None
        rewards.append(Reward(spec, func, 1.0 if weights is None else float(weights[i]), required_fields(func)))
    return rewards


def check_fields(rewards: list[Reward], records, file) -> None:
    """Every record has the fields every reward function reads, or ``DataError`` names each one that lacks one."""
    problems = [Problem("error", f"reward function {reward.name} reads the field {name!r}, which the record "
                                 "lacks; add it, or choose other --reward_funcs", record.index, record.id)
                for record in records for reward in rewards for name in reward.fields
                if name not in record.fields]
    if problems:
        raise DataError(file, problems)


def score(reward: Reward, completions: list[str], record: dict) -> list[float]:
    """``reward``'s values for one record's completions; any failure raises ``RewardError`` in one line."""
    where = f"on record {record['index']} (id {record['id']!r})"
    try:
        returned = reward.func(list(completions), **reward.kwargs(record))
    except Exception as exc:
        raise RewardError(f"reward function {reward.name} raised {type(exc).__name__}: {exc} {where}") from None
    try:
        values = [float(v) for v in returned]
    except (TypeError, ValueError):
        values = None
    if values is None or len(values) != len(completions) or not all(math.isfinite(v) for v in values):
        raise RewardError(f"reward function {reward.name} returned {str(returned)[:80]} {where}; return one "
                          f"finite number per completion ({len(completions)})")
    return values
