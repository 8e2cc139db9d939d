"""Flags from argument fields, checked where they enter and before anything heavy loads: argparse declarations
made from dataclass fields (name, type, default, choices and help written once), YAML config files read as flags
with their keys checked, numbers (finite, in range) declared once on the fields, and the files and folders that
flags name.

A field declares its range in its metadata, ``field(default=0.1, metadata={"help": "...", **within(0, 1)})``, and
its dataclass calls ``check_fields(self)`` in ``__post_init__``: every float of every field (lists too) must be
finite, and each declared range holds, or a ``ConfigError`` names the flag. New stages' fields get the same checks
by declaring them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path

from vlmtune.errors import ConfigError

RANGE = "vlmtune_range"
"""The metadata key ``within`` sets: (low, high, low_open, high_open)."""


def within(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> dict:
    """Field metadata: the value (each value of a list) lies in [low, high] (ends open when asked; None: no
    bound). None values are not checked (they mean "the default")."""
    return {RANGE: (low, high, low_open, high_open)}


def describe_range(low, high, low_open: bool, high_open: bool) -> str:
    """'positive', 'at least 1', 'in [0, 0.5)', ... for a message."""
    if high is None:
        if low == 0:
            return "positive" if low_open else "0 or more"
        return f"above {low:g}" if low_open else f"at least {low:g}"
    if low is None:
        return f"below {high:g}" if high_open else f"at most {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def range_problem(value, low, high, low_open: bool = False, high_open: bool = False) -> str | None:
    """Why a number is not finite or not in the range (None when it is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    return describe_range(low, high, low_open, high_open) if too_low or too_high else None


def check_value(flag: str, value, bounds: tuple | None = None) -> None:
    """``value`` (or each of a list) finite and within ``bounds`` (``within``'s tuple), else a ``ConfigError``
    naming ``flag``."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        problem = range_problem(item, *(bounds or (None, None, False, False)))
        if problem:
            shown = f"{value}" if isinstance(value, (list, tuple)) else f"{item}"
            held = f" (it holds {item})" if isinstance(value, (list, tuple)) else ""
            raise ConfigError(f"{flag} must be {problem}{' each' if held else ''}, got {shown}{held}")


def check_fields(obj, extra: dict[str, dict] | None = None) -> None:
    """Every field of the dataclass ``obj``: floats finite, declared ranges (``within``, or ``extra`` by field name
    for fields declared elsewhere) held; a ``ConfigError`` names the first flag that is not."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name, None)
        if value is None:
            continue
        meta = (extra or {}).get(f.name) or f.metadata
        check_value(f"--{f.name}", value, meta.get(RANGE))


def need_file(path: str | Path | None, flag: str, what: str = "file") -> None:
    """``path`` is an existing file, else a ``ConfigError`` naming ``flag``."""
    if path is None:
        return
    p = Path(path)
    if p.is_file():
        return
    state = "is a folder" if p.is_dir() else "does not exist"
    raise ConfigError(f"{flag} {path} {state}; give the {what}")


def need_folder(path: str | Path | None, flag: str, what: str = "folder") -> None:
    """``path`` is an existing folder, else a ``ConfigError`` naming ``flag``."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        return
    state = "is a file" if p.exists() else "does not exist"
    raise ConfigError(f"{flag} {path} {state}; give the {what}")


# ---------------------------------------------------------------- argparse flags from dataclass fields


def boolean_flag(value: str) -> bool:
    """An argparse type: true / false (any case; also yes / no, 1 / 0), as ``vlmtune train``'s flags take them."""
    lowered = str(value).lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _flag_kind(hint) -> tuple[type | None, tuple | None, bool]:
    """(scalar type, choices, whether a list) of a field's type hint; Optional is unwrapped."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return type(args[0]), tuple(args), False
    if typing.get_origin(hint) is list:
        return _flag_kind(args[0])[0], None, True
    if args:  # X | None
        return _flag_kind(args[0])
    return (hint if isinstance(hint, type) else str), None, False


def add_fields(parser: argparse.ArgumentParser, cls, *names: str, helps: dict[str, str] | None = None) -> None:
    """Declare ``--NAME`` for each field ``names`` of the dataclass ``cls`` (all its fields when none are named),
    with the field's type, default, choices and help: the one declaration of a flag that several commands share
    (``helps``: another help text for some, where a command reads the flag its own way). Booleans take true /
    false, or nothing for true; lists one value or more."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names or tuple(fields):
        f = fields[name]
        kind, choices, many = _flag_kind(hints[name])
        default = f.default if f.default is not dataclasses.MISSING else None
        options: dict = {"default": default, "help": (helps or {}).get(name, f.metadata.get("help"))}
        if kind is bool:
            options.update(type=boolean_flag, nargs="?", const=True, metavar="{true,false}")
        else:
            options.update(type=kind, choices=choices, **({"nargs": "+"} if many else {}))
        parser.add_argument(f"--{name}", **options)


def fields_of(args: argparse.Namespace, cls, *names: str):
    """``cls`` built from the parsed flags ``names`` (default: all its fields), so its checks run on them."""
    names = names or tuple(f.name for f in dataclasses.fields(cls))
    return cls(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})


# ---------------------------------------------------------------- YAML config files


_TYPE_WORDS = {int: "an integer", float: "a number", str: "text", boolean_flag: "true or false"}


def _expected(action: argparse.Action) -> str:
    if action.choices:
        return "one of " + ", ".join(map(str, action.choices))
    return _TYPE_WORDS.get(action.type, getattr(action.type, "__name__", "a value"))


def _check_yaml_value(path: Path, key: str, value, action: argparse.Action) -> None:
    many = action.nargs in ("+", "*")
    if isinstance(value, list) and not many:
        raise ConfigError(f"{path}: {key}: expected {_expected(action)}, got a list {value}; give one value")
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, (list, dict)):
            raise ConfigError(f"{path}: {key}: expected {_expected(action)}, got {item!r}")
        try:
            converted = action.type(str(item)) if action.type else str(item)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise ConfigError(f"{path}: {key}: expected {_expected(action)}, got {item!r}") from None
        if action.choices and converted not in action.choices and str(item) not in map(str, action.choices):
            raise ConfigError(f"{path}: {key}: expected {_expected(action)}, got {item!r}")


def suggest(parser: argparse.ArgumentParser, flag: str) -> str:
    """``flag``, with the known flag it is closest to: "--vison_lr (did you mean --vision_lr?)"."""
    import difflib

    known = [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.8)
    return f"{flag}" + (f" (did you mean {close[0]}?)" if close else "")


def yaml_to_argv(path: Path, parser: argparse.ArgumentParser | None = None, prog: str = "vlmtune train") -> list[str]:
    """A flat YAML mapping as command-line flags, so flags given after it override it. With ``parser``, each key
    must be one of its flags and its value fit the flag (type, choices, one value or a list); an error names the
    file and the key."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where} invalid YAML ({problem}); write one `option: value` per line") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; give a YAML file of `option: value` lines") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    actions = {opt: a for a in (parser._actions if parser else []) for opt in a.option_strings}
    argv: list[str] = []
    for key, value in values.items():
        action = actions.get(f"--{key}")
        if parser is not None and action is None:
            raise ConfigError(f"{path}: unknown option {suggest(parser, f'--{key}')}; `{prog} --help` lists them")
        if isinstance(value, dict) or (isinstance(value, list) and key in ("data_path", "eval_data_path")):
            import json  # a dict flag, or a mixture of data files (vlmtune/data/mixture.py) as one JSON value

            argv += [f"--{key}", json.dumps(value)]
            continue
        if action is not None and value is not None:
            _check_yaml_value(path, key, value, action)
        if isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def check_paths(args, files: tuple[str, ...] = ("data_path", "eval_data_path"),
                folders: tuple[str, ...] = ("image_folder", "video_folder")) -> None:
    """The files and folders an arguments object names (``--data_path`` ...) exist, checked before anything
    loads; a ``ConfigError`` names the flag."""
    from vlmtune.data.mixture import parse_mixture

    for name in files:  # a mixture's files are checked where it is parsed
        if parse_mixture(getattr(args, name, None), f"--{name}") is None:
            need_file(getattr(args, name, None), f"--{name}", "data file (JSON or JSONL)")
    for name in folders:
        need_folder(getattr(args, name, None), f"--{name}")


def dataclass_parser(classes, **kwargs):
    """transformers' ``HfArgumentParser`` over ``classes``, taking fields that declare a range (``within``):
    it passes a field's metadata to argparse, which knows no range."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, field: dataclasses.Field):
            if RANGE in field.metadata:
                import copy

                field = copy.copy(field)
                field.metadata = {k: v for k, v in field.metadata.items() if k != RANGE}
            HfArgumentParser._parse_dataclass_field(parser, field)

    return Parser(classes, **kwargs)
