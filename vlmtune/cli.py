"""``vlmtune train | dpo | grpo | distill | reward-model | sample | check-data | convert | tiny-model | merge |
predict | eval | plot | view | estimate-memory``: parse, call, report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

USAGE = """usage: vlmtune [--debug] COMMAND [options]

commands:
  train            fine-tune a Qwen-VL model (vlmtune train --help; a YAML config may come first);
                   --stage cpt: continued pre-training on documents (text with images / videos, no chat)
  dpo              preference-tune on chosen / rejected replies (vlmtune dpo --help)
  grpo             reinforce with reward functions on sampled replies (vlmtune grpo --help)
  distill          distil a teacher's token distributions into the model (vlmtune distill --teacher PATH --help)
  reward-model     train a reward model (scalar head) on chosen / rejected replies (vlmtune reward-model --help)
  sample           rejection sampling: sample replies, score them, write the best as SFT records (--help)
  check-data       validate a data file and summarise it
  convert          write a data file as LLaVA JSON plus images, or as Parquet with embedded images
  merge            merge LoRA adapters and trained parts into a standalone model folder
  predict          generate replies with a model (and adapters) for images, videos or a data file
  eval             score a model (or two, --compare) on a data file with task metrics
  plot             draw the plots of a training run (loss, learning rates, grad norm, tokens/s, eval)
  view             see a data file (what trains, token by token) or a run (plots, predictions) in a browser
  estimate-memory  estimate GPU memory per device for a training setup
  tiny-model       write the embedded tiny model (random weights) to a folder

Errors are one line; --debug (or VLMTUNE_DEBUG=1 in the environment) shows their Python traceback.
"""


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(format="[vlmtune] %(message)s", level=logging.WARNING)
    logging.getLogger("vlmtune").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # bitsandbytes' CPU backend warns at import that an optional kernel package is missing; it falls back by itself
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # DeepSpeed warns "Setting accelerator to CPU" on every import without a GPU; vlmtune says what it runs on.
    # The filter sits on DeepSpeed's named logger before DeepSpeed is imported (it keeps the logger's filters).
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())


def _close_progress_bars() -> None:
    """End a progress bar the error interrupted, so the error starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):
        bar.close()


def cmd_train(argv: list[str]) -> int:
    from vlmtune.config import parse_train_args
    from vlmtune.stages.sft import train

    train(*parse_train_args(argv))
    return 0


def cmd_dpo(argv: list[str]) -> int:
    from vlmtune.config import parse_train_args
    from vlmtune.stages.dpo import dpo

    dpo(*parse_train_args(argv, prog="vlmtune dpo", stage="dpo"))
    return 0


def cmd_grpo(argv: list[str]) -> int:
    from vlmtune.config import parse_train_args
    from vlmtune.stages.grpo import grpo

    grpo(*parse_train_args(argv, prog="vlmtune grpo", stage="grpo"))
    return 0


def cmd_distill(argv: list[str]) -> int:
    from vlmtune.config import parse_train_args
    from vlmtune.stages.distill import distill

    distill(*parse_train_args(argv, prog="vlmtune distill", stage="distill"))
    return 0


def cmd_reward_model(argv: list[str]) -> int:
    from vlmtune.config import parse_train_args
    from vlmtune.stages.reward_model import reward_model

    reward_model(*parse_train_args(argv, prog="vlmtune reward-model", stage="reward_model"))
    return 0


def cmd_sample(argv: list[str]) -> int:
    from vlmtune.sample import main

    return main(argv)


def cmd_check_data(argv: list[str]) -> int:
    from vlmtune.data import mixture
    from vlmtune.data.check import check_data
    from vlmtune.data.conversation import Conversation
    from vlmtune.data.formats import FORMATS
    from vlmtune.data_arguments import DataArguments  # not vlmtune.config: no training imports
    from vlmtune.flags import add_fields, check_value, fields_of, need_file, need_folder
    from vlmtune.model.load import load_for_data

    parser = argparse.ArgumentParser(prog="vlmtune check-data",
                                     description="Validate a data file (LLaVA, ShareGPT or messages records).")
    parser.add_argument("data_path", help="a data file, or a mixture as `vlmtune train --data_path` takes it "
                        "(a.json:0.3,b.parquet:0.7): each file is checked and reported, then what each gives")
    parser.add_argument("--model", help="model whose tokenizer and pixel budgets measure lengths "
                        "(default: the embedded tiny model)")
    parser.add_argument("--deep", action="store_true", help="decode every image and video (slower)")
    parser.add_argument("--data_format", choices=FORMATS, help="format of the records (default: detected from "
                        "the first record): llava, sharegpt (LLaMA-Factory / ms-swift) or messages (typed parts)")
    parser.add_argument("--stage", choices=["sft", "dpo", "grpo", "cpt"], default="sft",
                        help="what the records are for: sft (conversations with replies), dpo (prompt turns plus "
                        "'chosen' and 'rejected'), grpo (prompt turns plus reward fields), cpt (documents: 'text' "
                        "with media, no chat)")
    # as in `vlmtune train`: every record's labels are checked under the label mode and template switches
    shared = ("image_folder", "video_folder", "max_seq_length", "allow_urls", "box_format", "label_mode",
              "enable_thinking", "keep_earlier_reasoning")
    add_fields(parser, DataArguments, *shared)
    parser.add_argument("--processes", type=int, help="worker processes measuring a file the first time "
                        "(default: every core); later checks of the same file read the stored results")
    args = parser.parse_args(argv)
    fields_of(args, DataArguments, *shared)  # ranges, as in training
    check_value("--processes", args.processes, (1, None, False, False))
    entries = mixture.parse_mixture(args.data_path, "check-data DATA_PATH")  # None: one plain file
    if entries is None:
        need_file(args.data_path, "data file", "data file (JSON or JSONL)")
    need_folder(args.image_folder, "--image_folder")
    need_folder(args.video_folder, "--video_folder")
    _, family, processor, budget = load_for_data(args.model)
    if args.stage == "cpt":
        from vlmtune.data.document import Document

        conversation = Document(processor)
    else:
        conversation = Conversation(processor, args.label_mode, enable_thinking=args.enable_thinking,
                                    keep_earlier_reasoning=args.keep_earlier_reasoning)
    results = [check_data(path, processor, family, budget, image_folder=args.image_folder,
                          video_folder=args.video_folder, allow_urls=args.allow_urls, deep=args.deep,
                          max_seq_length=args.max_seq_length, conversation=conversation, processes=args.processes,
                          stage=args.stage, box_format=args.box_format, data_format=args.data_format)
               for path in ([e.path for e in entries] if entries else [args.data_path])]
    print("\n".join(result.summary() for result in results))
    if entries:
        print("\n".join(mixture.plan_lines(entries, [len(r.records) for r in results])))
    return 1 if any(result.errors for result in results) else 0


def cmd_tiny_model(argv: list[str]) -> int:
    from vlmtune.families import FAMILIES
    from vlmtune.testing.tiny import build_tiny_model

    parser = argparse.ArgumentParser(prog="vlmtune tiny-model", description="Write the embedded tiny model.")
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="qwen2_vl", choices=list(FAMILIES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.out_dir).is_file():
        from vlmtune.errors import ConfigError

        raise ConfigError(f"{args.out_dir} is a file; give a folder for the tiny model")
    print(build_tiny_model(args.out_dir, args.family, args.seed))
    return 0


def cmd_merge(argv: list[str]) -> int:
    from vlmtune.merge import main

    return main(argv)


def cmd_predict(argv: list[str]) -> int:
    from vlmtune.predict import main

    return main(argv)


def cmd_eval(argv: list[str]) -> int:
    from vlmtune.evaluate import main

    return main(argv)


def cmd_plot(argv: list[str]) -> int:
    from vlmtune.plots import main

    return main(argv)


def cmd_view(argv: list[str]) -> int:
    from vlmtune.view import main

    return main(argv)


def cmd_convert(argv: list[str]) -> int:
    from vlmtune.data.convert import main

    return main(argv)


def cmd_estimate_memory(argv: list[str]) -> int:
    from vlmtune.memory import main

    return main(argv)


COMMANDS = {"train": cmd_train, "dpo": cmd_dpo, "grpo": cmd_grpo, "reward-model": cmd_reward_model,
            "distill": cmd_distill, "sample": cmd_sample, "check-data": cmd_check_data, "convert": cmd_convert,
            "tiny-model": cmd_tiny_model, "merge": cmd_merge, "predict": cmd_predict, "eval": cmd_eval,
            "plot": cmd_plot, "view": cmd_view, "estimate-memory": cmd_estimate_memory}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("VLMTUNE_DEBUG", "") not in ("", "0")
    while argv and argv[0] == "--debug":
        debug = True
        argv.pop(0)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _setup_logging()
    try:
        code = COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:
        if debug:
            raise
        _close_progress_bars()
        print(f"vlmtune {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from vlmtune.errors import USER_ERRORS, Stopped

        _close_progress_bars()
        if not isinstance(exc, Stopped):
            if debug:
                raise
            if isinstance(exc, USER_ERRORS):
                print(f"vlmtune {argv[0]}: error: {exc}", file=sys.stderr)
            else:  # a fault vlmtune did not foresee: one line still, the traceback on request
                message = " ".join(str(exc).split())[:500]
                print(f"vlmtune {argv[0]}: error: {type(exc).__name__}: {message} (unexpected: run again with "
                      "`vlmtune --debug ...` for the traceback, and report it)", file=sys.stderr)
            return 1
        print(f"vlmtune {argv[0]}: {exc}", file=sys.stderr)  # a clean stop (SIGTERM): a checkpoint was saved
        code = exc.exit_code
    _close_process_groups()  # here, where nothing of the command is left to hold them
    return code


def _close_process_groups() -> None:
    """A distributed run's process groups end here, once the command has returned (``stages.fit``)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from vlmtune.stages.fit import close_process_groups

        close_process_groups()


if __name__ == "__main__":
    sys.exit(main())
