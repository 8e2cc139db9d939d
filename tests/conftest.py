"""Shared fixtures: the embedded tiny models (built once per session) and the example data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "data_examples"
DATA_JSON = EXAMPLES / "data.json"
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
MOE_FAMILIES = ("qwen3_vl_moe", "qwen3_5_moe")
LINEAR_ATTENTION_FAMILIES = ("qwen3_5", "qwen3_5_moe")
"""Qwen3.5's hybrid models: Gated DeltaNet layers that carry state along the sequence (packing refused)."""
PACKABLE_FAMILIES = tuple(f for f in FAMILIES if f not in LINEAR_ATTENTION_FAMILIES)
THINKING_TEMPLATE_FAMILIES = ("qwen3_5", "qwen3_5_moe")
"""Tiny models with Qwen3.5's official template: the last assistant turn is written after an empty
``<think>\n\n</think>\n\n`` block that the reply does not contain."""

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory):
    """Keep the tiny models tests build out of the user's cache."""
    os.environ.setdefault("VLMTUNE_CACHE", str(tmp_path_factory.mktemp("vlmtune-cache")))


@pytest.fixture(scope="session")
def tiny_model_dir(_tiny_cache):
    """Path of the tiny model of a family (built on first use, cached for the session)."""
    from vlmtune.testing.tiny import tiny_model_path

    return lambda family="qwen2_vl": tiny_model_path(family)


class Pipeline:
    """Processor, family, budget and dataset of one tiny model over data_examples/."""

    def __init__(self, model_dir: Path, label_mode: str = "assistant"):
        from vlmtune.data import media
        from vlmtune.data.conversation import Conversation
        from vlmtune.data.dataset import VisionLanguageDataset
        from vlmtune.data.records import load_records
        from vlmtune.model.load import load_family, load_processor

        self.model_dir = model_dir
        self.family = load_family(str(model_dir))
        self.processor = load_processor(str(model_dir))
        self.budget = media.budget_from_processor(self.processor, self.family.factor)
        self.records = load_records(DATA_JSON, EXAMPLES, budget=self.budget, min_image_side=self.family.factor)
        self.conversation = Conversation(self.processor, label_mode)
        self.dataset = VisionLanguageDataset(self.records, self.processor, self.family, self.budget,
                                             self.conversation)

    def model(self):
        from transformers import AutoModelForImageTextToText

        torch.manual_seed(0)
        return AutoModelForImageTextToText.from_pretrained(self.model_dir).eval()


@pytest.fixture(scope="session")
def pipeline(tiny_model_dir):
    cache: dict = {}

    def make(family: str = "qwen2_vl", label_mode: str = "assistant") -> Pipeline:
        key = (family, label_mode)
        if key not in cache:
            cache[key] = Pipeline(tiny_model_dir(family), label_mode)
        return cache[key]

    return make
