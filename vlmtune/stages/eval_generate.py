"""``--eval_generate True``: at every evaluation, generate a reply for each eval record and add task metrics
(``eval_exact_match``, ``eval_anls``, ...) to the eval metrics, where ``--metric_for_best_model``, early
stopping, the logs, TensorBoard and W&B see them.

With several processes each rank generates a share of the records (padded to the same number of batches, so
ZeRO-3's collective generation stays in step) and the replies are gathered before scoring.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from vlmtune import metrics as M
from vlmtune.data import media
from vlmtune.data.records import Record
from vlmtune.families import Family
from vlmtune.generation import Predictor, prediction_lines, prompt_of, score
from vlmtune.run import PREDICTIONS_FILE

logger = logging.getLogger(__name__)



class EvalGenerator:
    """Generates on the eval records with the model being trained and scores the replies."""

    def __init__(self, records: list[Record], processor, family: Family, budget: media.MediaBudget, *,
                 metric_names: list[str] | None, max_new_tokens: int, batch_size: int, output_dir: str | Path,
                 limit: int | None = None, enable_thinking: bool | None = None):
        self.records = records[:limit] if limit else records
        self.processor = processor
        self.family = family
        self.budget = budget
        self.metric_names = metric_names
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.predictions_path = Path(output_dir) / PREDICTIONS_FILE
        self.enable_thinking = enable_thinking  # the template switch the run trains with

    def __call__(self, model, prefix: str, is_main: bool) -> dict[str, float]:
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        prompts = [prompt_of(r) for r in self.records]
        share = prompts[rank::world]
        per_rank = -(-len(prompts) // world)
        padded = share + [prompts[0]] * (per_rank - len(share))  # same batch count on every rank
        predictor = Predictor(model, self.processor, self.family, self.budget, self.max_new_tokens,
                              enable_thinking=self.enable_thinking)
        replies = predictor.replies(padded, self.batch_size, desc="eval generate", progress=is_main)[:len(share)]
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, replies)
            replies = [gathered[i % world][i // world] for i in range(len(prompts))]
        scores = score(self.records, replies, self.family, self.budget, self.metric_names)
        if self.metric_names is None:  # fixed after the first evaluation, so every evaluation reports the same
            self.metric_names = list(scores.summary)
        if is_main:
            self.predictions_path.parent.mkdir(parents=True, exist_ok=True)
            with self.predictions_path.open("w", encoding="utf-8") as out:
                for line in prediction_lines(self.records, replies, scores):
                    out.write(json.dumps(line, ensure_ascii=False) + "\n")
        return {f"{prefix}_{name}": s["score"] for name, s in scores.summary.items() if s["score"] is not None}


def generation_metric_names(eval_metrics: str | None) -> list[str] | None:
    """The ``--eval_metrics`` list, checked (None: what fits the references)."""
    if not eval_metrics:
        return None
    return M.check_metrics([n.strip() for n in eval_metrics.split(",") if n.strip()])
