"""``vlmtune view PATH``: a local web page over a data file (what trains, token by token) or a run folder (its plots,
facts and eval predictions). See ``server.py`` for what it serves, ``data_pages.py`` and ``run_pages.py`` for
where each answer comes from."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

DATA_FLAGS = ("image_folder", "video_folder", "max_seq_length", "allow_urls", "box_format", "label_mode",
              "enable_thinking", "keep_earlier_reasoning")
"""The flags ``vlmtune check-data`` and ``vlmtune train`` share: the same records, labels and lengths."""


def build_parser() -> argparse.ArgumentParser:
    from vlmtune.config import DataArguments
    from vlmtune.data.formats import FORMATS
    from vlmtune.flags import add_fields
    from vlmtune.stage_config import REWARD_FIELDS, GRPOArguments

    parser = argparse.ArgumentParser(
        prog="vlmtune view",
        description="See a data file (every record's tokens, which of them train, its images and problems) or a "
                    "run folder (its plots, refreshing while it trains; its facts; eval predictions) in a browser.")
    parser.add_argument("path", help="a data file (as check-data takes it, with the same flags) or a run folder "
                        "(train / dpo / grpo --output_dir, or eval --output_dir)")
    parser.add_argument("--port", type=int, default=8765, help="port to serve on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine "
                        "only; the page shows your data to whoever can reach it)")
    parser.add_argument("--model", help="model whose processor and template render the data (default: the "
                        "embedded tiny model)")
    parser.add_argument("--data_format", choices=FORMATS, help="format of the records (default: detected)")
    parser.add_argument("--stage", choices=["sft", "dpo", "grpo", "cpt"], default="sft",
                        help="what the records are for, as check-data --stage")
    add_fields(parser, DataArguments, *DATA_FLAGS)
    grpo = parser.add_argument_group("GRPO prompts (--stage grpo): the reward settings each prompt is shown with, "
                                     "as vlmtune grpo takes them")
    add_fields(grpo, GRPOArguments, *REWARD_FIELDS)
    return parser


def _rewards(args: argparse.Namespace) -> dict:
    """``DataView``'s reward arguments: for ``--stage grpo``, the rewards as ``vlmtune grpo`` loads them from its
    flags (checked as it checks them); reward flags with another stage are an error, not ignored."""
    import dataclasses

    from vlmtune.errors import ConfigError
    from vlmtune.flags import fields_of
    from vlmtune.rewards import load_rewards
    from vlmtune.stage_config import REWARD_FIELDS, GRPOArguments
    from vlmtune.view.reward_pages import reward_settings

    if args.stage != "grpo":
        defaults = {f.name: f.default for f in dataclasses.fields(GRPOArguments)}
        given = [name for name in REWARD_FIELDS if getattr(args, name) != defaults[name]]
        if given:
            raise ConfigError(f"--{given[0]} is a GRPO reward setting: give it with --stage grpo")
        return {}
    grpo = fields_of(args, GRPOArguments, *REWARD_FIELDS)
    if grpo.reward_model:
        from vlmtune.model.reward import check_folder

        check_folder(grpo.reward_model, "--reward_model")
    return {"rewards": load_rewards(grpo.reward_funcs, grpo.reward_weights),
            "reward_settings": reward_settings(vars(grpo))}


def open_site(args: argparse.Namespace):
    """The ``RunView`` of a run folder, or the ``DataView`` of a data file (checked as ``check-data`` checks it)."""
    from vlmtune.view.run_pages import RunView, is_run_folder

    if is_run_folder(args.path):
        return RunView(args.path)
    from vlmtune.config import DataArguments
    from vlmtune.data import media
    from vlmtune.errors import ConfigError
    from vlmtune.flags import fields_of, need_file, need_folder
    from vlmtune.model.load import load_config, load_family, load_processor, resolve_model_path
    from vlmtune.view.data_pages import DataView

    if Path(args.path).is_dir():
        raise ConfigError(f"{args.path} is a folder without a training log, vlmtune_run.json or predictions: give "
                          "a data file or a run folder")
    need_file(args.path, "data file", "data file (JSON or JSONL)")
    fields_of(args, DataArguments, *DATA_FLAGS)  # ranges, as in training
    need_folder(args.image_folder, "--image_folder")
    need_folder(args.video_folder, "--video_folder")
    model_path = resolve_model_path(args.model)
    family = load_family(model_path, f"--model {model_path}")
    processor = load_processor(model_path)
    budget = media.budget_from_processor(processor, family.factor)
    return DataView(args.path, processor, family, load_config(model_path), budget, stage=args.stage,
                    max_seq_length=args.max_seq_length, label_mode=args.label_mode or "assistant",
                    enable_thinking=args.enable_thinking, keep_earlier_reasoning=bool(args.keep_earlier_reasoning),
                    image_folder=args.image_folder, video_folder=args.video_folder, allow_urls=args.allow_urls,
                    box_format=args.box_format, data_format=args.data_format, **_rewards(args))


def main(argv: list[str] | None = None) -> int:
    """``vlmtune view PATH [--port N] [--host H] [data flags]``: serve until interrupted."""
    from vlmtune.flags import check_value
    from vlmtune.view.server import make_server

    args = build_parser().parse_args(argv)
    check_value("--port", args.port, (0, 65535, False, False))
    site = open_site(args)
    server = make_server(site, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"vlmtune view: {args.path} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
