"""``vlmtune sample``: rejection sampling, the data step of rejection-sampling fine-tuning.

For each prompt record (as ``vlmtune grpo`` reads them: the prompt turns plus the fields the reward functions
read; an SFT record's last reply becomes its ``answer``), ``--num_samples`` replies are sampled in one ``generate``
call (the prompt's row repeated, GRPO's sampler: ``generation.sample_group``), decoded, and scored as GRPO scores
them: each reward function on the replies and the record's fields, ``--reward_model`` on the prompt + reply rows,
summed with the weights. The best reply of each prompt (``--keep best``), or every reply scoring at least
``--min_score`` (``--keep all``), is written as an SFT record (the prompt turns, then the reply) with its ``score``
and ``rewards``, in LLaVA JSON (or Parquet); ``vlmtune train`` trains on it as it is.

Resumable: each prompt's replies and scores are appended to ``OUTPUT.samples.jsonl`` as one line once the prompt
is done (a line cut by a kill is dropped when the run starts again). A rerun with the same sampling settings
samples only the prompts that file lacks; the random draws of prompt i depend on ``--seed`` and i alone, so the
records equal an uninterrupted run's. ``--keep`` and ``--min_score`` select from the samples at the end, so a rerun
with other values samples nothing again. The output file is written whole at the end, by a rename.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch

from vlmtune import rewards as reward_lib
from vlmtune import run
from vlmtune.config import INFERENCE_DATA_FIELDS, DataArguments, InferenceArguments
from vlmtune.data import frames, media
from vlmtune.data.collator import Collator
from vlmtune.data.convert import llava_record, write_parquet
from vlmtune.data.formats import FORMATS
from vlmtune.data.prompts import completion_row
from vlmtune.data.records import Message, Record, load_records
from vlmtune.errors import ConfigError
from vlmtune.flags import add_fields, fields_of, need_file, need_folder
from vlmtune.generation import (
    VISION_TOKENS,
    Predictor,
    Progress,
    cut_before,
    eos_ids,
    load_predictor,
    on_model,
    sample_group,
)
from vlmtune.model.reward import check_folder
from vlmtune.scoring import load_reward_model, score_rows
from vlmtune.stage_config import GRPOArguments, SampleArguments

logger = logging.getLogger(__name__)

INFERENCE_FIELDS = ("model", "adapter", "limit", "max_new_tokens", "dtype", "device")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "reward_funcs", "reward_weights", "reward_model",
                   "reward_model_weight")
"""``vlmtune grpo``'s flags that ``sample`` takes, with their help and checks."""
REWARD_FUNCS_HELP = ("Reward functions, summed with --reward_weights: built-ins exact_match, math, format, box_iou, "
                     "or FILE.py:FUNCTION (called as FUNCTION(completions, **fields) -> list of floats). Give them, "
                     "--reward_model, or both.")
FORMAT_VERSION = 1


def samples_path(output: Path) -> Path:
    """Every reply and its scores, one line per prompt: ``OUTPUT.samples.jsonl``."""
    return output.with_suffix(".samples.jsonl")


def summary_path(output: Path) -> Path:
    return output.with_suffix(".summary.json")


def append_line(handle, line: dict) -> None:
    """Append one prompt's line and make it durable: after a kill, the file holds it whole or not at all."""
    handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def read_samples(path: Path, settings: dict, records: list[Record]) -> dict[int, dict]:
    """The prompts already sampled, by position, from a previous run's ``samples.jsonl`` (none when absent). A last
    line without its newline (the run was killed while writing it) is cut off the file. A file sampled with other
    settings, or from other records, stops the run with one line."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        logger.info("%s: dropping an unfinished last line (the run was stopped while writing it)", path)
        with path.open("r+b") as f:
            f.truncate(len(whole))
    lines = [json.loads(text) for text in whole.decode("utf-8").splitlines() if text.strip()]
    if not lines:
        return {}
    header = lines[0].get("vlmtune_sample")
    if header != settings:
        old = header or {}
        diff = "; ".join(f"{k} {old.get(k)!r} then, {v!r} now" for k, v in settings.items() if old.get(k) != v)
        raise ConfigError(f"{path} holds samples drawn with other settings ({diff or 'not a samples file'}); pass "
                          "the same settings to continue it, or delete it (or choose another --output) to sample "
                          "anew")
    done = {}
    for line in lines[1:]:
        position = line["position"]
        if position >= len(records):  # beyond this run's --limit
            continue
        if records[position].id != line["id"]:
            raise ConfigError(f"{path}: prompt {position} was record id {line['id']!r}, but --data now holds "
                              f"{records[position].id!r} there; the data changed: delete the samples file to sample "
                              "anew")
        done[position] = line
    return done


class Sampler:
    """A model, its reward functions and reward model: ``sample(record, position)`` -> the prompt's line."""

    def __init__(self, predictor: Predictor, rewards: list[reward_lib.Reward], reward_model, grpo: GRPOArguments,
                 args: SampleArguments, max_new_tokens: int):
        self.predictor, self.rewards, self.reward_model = predictor, rewards, reward_model
        self.grpo, self.args, self.max_new_tokens = grpo, args, max_new_tokens
        tokenizer = predictor.processor.tokenizer
        self.tokenizer = tokenizer
        self.eos = eos_ids(predictor.model, tokenizer)
        self.vision_ids = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
        self.collate = Collator(tokenizer.pad_token_id)
        self.names = reward_names(rewards) + ["reward_model"] * (reward_model is not None)
        self.weights = [r.weight for r in rewards] + [grpo.reward_model_weight] * (reward_model is not None)

    def sample(self, record: Record, position: int) -> dict:
        """``--num_samples`` replies to one prompt, their end flags, each reward's values, the weighted total and the
        sampled token ids (what a reward model scored, after the prompt's)."""
        item = self.predictor.encode(record)
        n = self.args.num_samples
        torch.manual_seed(self.args.seed * 2**32 + position)  # prompt i's draws: seed and i alone
        completions = sample_group(self.predictor.model, on_model(self.collate([item] * n), self.predictor.model),
                                   self.eos, self.tokenizer.pad_token_id, self.vision_ids, self.grpo.temperature,
                                   self.grpo.top_p, self.grpo.top_k, self.max_new_tokens)
        completions = [cut_before(c, self.vision_ids).cpu() for c in completions]
        replies = [t.strip() for t in self.tokenizer.batch_decode(completions, skip_special_tokens=True)]
        meta = {"index": record.index, "id": record.id, "fields": record.fields}
        values = [reward_lib.score(reward, replies, meta) for reward in self.rewards]
        if self.reward_model is not None:
            values.append(score_rows(self.reward_model, self.collate([completion_row(item, c) for c in completions]))
                          .tolist())
        totals = [sum(w * v[k] for w, v in zip(self.weights, values)) for k in range(n)]
        ended = [bool(len(c)) and int(c[-1]) in self.eos for c in completions]
        return {"position": position, "id": record.id, "replies": replies, "ended": ended,
                "rewards": dict(zip(self.names, values)), "scores": totals,
                "tokens": [c.tolist() for c in completions]}


def reward_names(rewards: list[reward_lib.Reward]) -> list[str]:
    """The names the records give the rewards: a built-in's, a user function's own name (its FILE.py:FUNCTION
    spec where two share a name)."""
    short = [r.name.rpartition(":")[2] for r in rewards]
    return [s if short.count(s) == 1 else r.name for s, r in zip(short, rewards)]


def select(line: dict, keep: str, min_score: float | None) -> list[int]:
    """The replies of a prompt's line to write: the best non-empty one (the first on ties) or all, each scoring at
    least ``min_score``."""
    scores = line["scores"]
    candidates = [k for k, reply in enumerate(line["replies"]) if reply]
    if keep == "best" and candidates:
        candidates = [max(candidates, key=lambda k: (scores[k], -k))]
    return [k for k in candidates if min_score is None or scores[k] >= min_score]


def sft_record(record: Record, line: dict, k: int, keep: str) -> Record:
    """The prompt record with reply ``k`` as the assistant's turn, its scores in ``fields``."""
    return dataclasses.replace(
        record, id=record.id if keep == "best" else f"{record.id}-{k}",
        messages=[*record.messages, Message("assistant", line["replies"][k])],
        fields={"score": line["scores"][k], "rewards": {name: v[k] for name, v in line["rewards"].items()}})


def _relative(path: str, folder: Path) -> str:
    """A media path as the output file's records name it: relative to its folder when it lies under it, else
    absolute (URLs and inline data as they are)."""
    if media.is_url(path) or media.is_inline(path):
        return path
    resolved = Path(path).resolve()
    return str(resolved.relative_to(folder)) if resolved.is_relative_to(folder) else str(resolved)


def _video(path: str, folder: Path):
    """A video as the output file's records name it: a file as ``_relative`` names it; a frame list as a list of
    its frames so named (``vlmtune.data.frames``)."""
    if frames.is_frame_list(path):
        return frames.as_entry(path, [_relative(f, folder) for f in frames.frame_list(path)[0]])
    return _relative(path, folder)


def write_records(records: list[Record], output: Path) -> None:
    """The SFT records, whole, by a rename: Parquet (``.parquet``), JSON lines (``.jsonl``) or a LLaVA JSON
    array."""
    tmp = output.with_name(output.name + ".tmp")
    if output.suffix.lower() == ".parquet":
        write_parquet(records, tmp)
    else:
        folder = output.parent.resolve()
        rows = [llava_record(r, [_relative(p, folder) for p in r.images], [_video(p, folder) for p in r.videos])
                for r in records]
        if output.suffix.lower() == ".jsonl":
            tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        else:
            tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, output)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def summarize(records: list[Record], lines: dict[int, dict], chosen: dict[int, list[int]], args: SampleArguments,
              sampled: int, seconds: float) -> dict:
    """The run's figures: counts, mean scores (all replies, kept ones, per reward), prompts left out, speed."""
    every = [s for line in lines.values() for s in line["scores"]]
    kept = [lines[p]["scores"][k] for p, ks in chosen.items() for k in ks]
    none = [records[p].id for p, ks in chosen.items() if not ks]
    names = next(iter(lines.values()))["rewards"].keys() if lines else []
    return {
        "prompts": len(records), "samples_per_prompt": args.num_samples, "keep": args.keep,
        "min_score": args.min_score, "records_written": len(kept),
        "prompts_without_a_kept_reply": len(none), "their_ids": none[:20],
        "empty_replies": sum(not r for line in lines.values() for r in line["replies"]),
        "replies_cut_at_max_new_tokens": sum(not e for line in lines.values() for e in line["ended"]),
        "mean_score_all": _mean(every), "mean_score_kept": _mean(kept),
        "mean_reward": {name: _mean([v for line in lines.values() for v in line["rewards"][name]]) for name in names},
        "prompts_sampled_now": sampled, "prompts_read_from_samples_file": len(records) - sampled,
        "sampling_seconds": round(seconds, 3),
        "prompts_per_second": round(sampled / seconds, 4) if sampled and seconds else None,
    }


def rejection_sample(predictor: Predictor, records: list[Record], rewards: list[reward_lib.Reward], reward_model,
                     grpo: GRPOArguments, args: SampleArguments, max_new_tokens: int, settings: dict) -> dict:
    """Sample the prompts ``samples.jsonl`` lacks, select, write the output and the summary; the summary."""
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    path = samples_path(output)
    lines = read_samples(path, settings, records)
    todo = [p for p in range(len(records)) if p not in lines]
    if lines:
        logger.info("%s: %d of %d prompts sampled already; sampling the other %d", path, len(lines), len(records),
                    len(todo))
    sampler = Sampler(predictor, rewards, reward_model, grpo, args, max_new_tokens)
    start = time.perf_counter()
    bar = Progress(len(todo), "sampling")
    try:
        with path.open("a", encoding="utf-8") as handle:
            if not path.stat().st_size:
                append_line(handle, {"vlmtune_sample": settings, "version": FORMAT_VERSION})
            for position in todo:
                lines[position] = sampler.sample(records[position], position)
                append_line(handle, lines[position])
                bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    chosen = {p: select(lines[p], args.keep, args.min_score) for p in range(len(records))}
    out = [sft_record(records[p], lines[p], k, args.keep) for p in range(len(records)) for k in chosen[p]]
    summary = summarize(records, lines, chosen, args, len(todo), seconds)
    summary_path(output).write_text(json.dumps(summary, indent=1) + "\n")
    if not out:
        replies = len(records) * args.num_samples
        if args.min_score is None:
            raise ConfigError(f"all {replies} replies to {len(records)} prompts are empty (the model ended its turn "
                              f"at once); nothing written to {output}")
        best = max(s for line in lines.values() for s, r in zip(line["scores"], line["replies"]) if r) if (
            summary["empty_replies"] < replies) else None
        raise ConfigError(f"--min_score {args.min_score:g}: none of the {replies} replies to {len(records)} prompts "
                          f"scored that much (the best non-empty one: {best}); nothing written to {output}. Lower "
                          f"it: the samples stay in {path}, and a rerun selects without sampling again")
    if summary["prompts_without_a_kept_reply"]:
        logger.warning("%d of %d prompts have no non-empty reply%s: left out (ids %s; all in %s)",
                       summary["prompts_without_a_kept_reply"], len(records),
                       "" if args.min_score is None else f" scoring at least {args.min_score:g}",
                       summary["their_ids"][:5], summary_path(output))
    write_records(out, output)
    return summary


def check_inputs(args: argparse.Namespace) -> None:
    """Flags and files, checked before a model loads."""
    if args.data is None or args.output is None:
        raise ConfigError("give --data (prompt records) and --output (the SFT records to write)")
    need_file(args.data, "--data", "data file of prompt records (JSON, JSONL or Parquet)")
    need_folder(args.image_folder, "--image_folder")
    need_folder(args.video_folder, "--video_folder")
    output = Path(args.output)
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name (OUTPUT.json, .jsonl or .parquet)")
    if output.resolve() == Path(args.data).resolve():
        raise ConfigError(f"--output {output} is the input --data; give another file (the prompts must stay)")
    if output.suffix.lower() not in (".json", ".jsonl", ".parquet"):
        raise ConfigError(f"--output {output}: name it .json (LLaVA JSON), .jsonl (JSON lines) or .parquet")
    if args.keep == "all" and args.min_score is None:
        logger.info("--keep all without --min_score: every non-empty reply is written")
    run.check_inference_source(args.model, args.adapter)
    if args.reward_model:
        check_folder(args.reward_model, "--reward_model")


def main(argv: list[str] | None = None) -> int:
    """``vlmtune sample``."""
    parser = argparse.ArgumentParser(
        prog="vlmtune sample",
        description="Rejection sampling: sample --num_samples replies to each prompt of --data, score them with "
                    "reward functions and / or a reward model (as vlmtune grpo does), and write the best reply of "
                    "each prompt (--keep best) or every reply scoring at least --min_score (--keep all) as SFT "
                    "records with their scores, for `vlmtune train`. A killed run continues where it stopped.")
    add_fields(parser, SampleArguments)
    add_fields(parser, InferenceArguments, *INFERENCE_FIELDS)
    add_fields(parser, GRPOArguments, *SAMPLING_FIELDS, helps={"reward_funcs": REWARD_FUNCS_HELP})
    add_fields(parser, DataArguments, *INFERENCE_DATA_FIELDS)
    parser.add_argument("--data_format", choices=FORMATS, help="format of the records (default: detected)")
    args = parser.parse_args(argv)
    sample_args = fields_of(args, SampleArguments)
    inference = fields_of(args, InferenceArguments, *INFERENCE_FIELDS)
    budget = fields_of(args, DataArguments, *INFERENCE_DATA_FIELDS).budget_overrides()
    if args.reward_funcs is None and args.reward_model is None:
        raise ConfigError("no reward: give --reward_funcs (e.g. exact_match), --reward_model, or both; sample keeps "
                          "the replies they score best")
    grpo = fields_of(args, GRPOArguments, *SAMPLING_FIELDS)
    check_inputs(args)
    rewards = reward_lib.load_rewards(grpo.reward_funcs, grpo.reward_weights)

    predictor = load_predictor(args.model, args.adapter, dtype=args.dtype, device=args.device,
                               budget_overrides=budget, max_new_tokens=inference.max_new_tokens,
                               enable_thinking=args.enable_thinking)
    records = load_records(args.data, args.image_folder, args.video_folder, budget=predictor.budget,
                           min_image_side=predictor.family.factor, box_target=predictor.family.box_format,
                           box_format=args.box_format, stage="grpo", data_format=args.data_format)
    records = records[: inference.limit] if inference.limit else records
    reward_lib.check_fields(rewards, records, args.data)
    reward_model = None
    if grpo.reward_model:
        device = next(predictor.model.parameters()).device
        reward_model = load_reward_model(grpo.reward_model, predictor.processor, predictor.family, device)
    settings = {"model": predictor.source, "data": str(Path(args.data).resolve()),
                "num_samples": sample_args.num_samples, "seed": sample_args.seed,
                "max_new_tokens": inference.max_new_tokens, "temperature": grpo.temperature, "top_p": grpo.top_p,
                "top_k": grpo.top_k, "rewards": [r.name for r in rewards], "weights": [r.weight for r in rewards],
                "reward_model": grpo.reward_model, "reward_model_weight": grpo.reward_model_weight,
                "enable_thinking": args.enable_thinking}
    summary = rejection_sample(predictor, records, rewards, reward_model, grpo, sample_args,
                               inference.max_new_tokens, settings)
    speed = (f"{summary['prompts_per_second']} prompts/s" if summary["prompts_sampled_now"] else
             "all read from the samples file")
    print(f"{summary['records_written']} records ({args.keep}) from {summary['prompts']} prompts x "
          f"{sample_args.num_samples} replies written to {args.output}; mean score {summary['mean_score_kept']} "
          f"kept, {summary['mean_score_all']} all; {speed}; summary in {summary_path(Path(args.output))}")
    return 0
