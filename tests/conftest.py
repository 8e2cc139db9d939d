"""Shared fixtures: the embedded tiny models (built once per session) and the example data.

Under pytest-xdist (``-n 2``) the workers share one cache folder (the tiny models are built under a file lock by
whichever worker asks first), and every multi-process test takes a port that is free at run time (``free_port``).
"""

from __future__ import annotations

import gc
import os
import socket
import sys
from pathlib import Path
from unittest import mock

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

# DeepSpeed builds its CPU ops (shm_comm, cpu_adam) on first use into torch's extension folder, and rebuilds them
# whenever the include paths change: one folder per Python environment, inside it, so checkouts that share a machine
# do not rebuild each other's ops (the tests' subprocesses inherit it). scripts/setup.sh builds both there once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
# ... compiled as scripts/setup.sh compiles them (the same command, or ninja rebuilds): c++ without debug info.
os.environ.setdefault("CXX", str(ROOT / "tests" / "cxx_without_debug_info.sh"))


def pytest_collection_finish(session):
    """What the test modules imported (torch, transformers, vlmtune, ...) is never garbage: frozen out of the
    collector's reach (``gc.freeze``), so that the full collection each training run in this process triggers
    (accelerate's ``free_memory``, the automatic ones) does not walk it again: about 0.5 s of CPU each."""
    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session):
    """Stop this pytest process's fork server (tests/forkserver.py), if a test started it, and what still runs."""
    import forkserver

    forkserver.stop()


FORKRUN = [sys.executable, str(ROOT / "tests" / "forkrun.py")]
"""In place of ``python -m torch.distributed.run`` (same arguments): the ranks are forked from one process that
imported the training stack once (tests/forkrun.py). Tests about the launcher, and one ZeRO-3 run, keep torchrun.
The tests launch it, and ``python -m vlmtune.cli``, through tests/forkserver.py: forked from one process that
imported the stack once, so that no launch imports it again."""


def free_port() -> int:
    """A TCP port that is free now (the system picks it): each multi-process test takes its own, so tests that
    run at once (xdist workers, other users of the machine) never meet on a fixed number."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_root(tmp_path_factory) -> Path:
    """The folder of this test session that every xdist worker shares (each worker's own temp folder without it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory) -> Path:
    """Keep the tiny models tests build out of the user's cache: one cache for the session, shared by the xdist
    workers (what goes in it, tiny models and data stores, is built under file locks and keyed by content)."""
    cache = session_root(tmp_path_factory) / "vlmtune-cache"
    cache.mkdir(exist_ok=True)
    os.environ.setdefault("VLMTUNE_CACHE", str(cache))
    return Path(os.environ["VLMTUNE_CACHE"])


@pytest.fixture(scope="session")
def tiny_model_dir(_tiny_cache):
    """Path of the tiny model of a family (built on first use, cached for the session), in the session's cache
    even when a test has pointed ``VLMTUNE_CACHE`` elsewhere."""
    from vlmtune.testing.tiny import tiny_model_path

    def get(family: str = "qwen2_vl") -> Path:
        with mock.patch.dict(os.environ, {"VLMTUNE_CACHE": str(_tiny_cache)}):
            return tiny_model_path(family)

    return get


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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's ``--dist loadgroup``, tests that share a module-scoped fixture (directly or through
    another fixture) form one group, so that one worker runs them and the fixture is built once; the other tests
    spread over the workers one by one. Without xdist the marks change nothing."""
    group: dict[str, str] = {}

    def find(key: str) -> str:
        while group.setdefault(key, key) != key:
            key = group[key]
        return key

    shared = {}
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        names = [f"{item.module.__name__}::{name}" for name, fixturedefs in (defs.name2fixturedefs.items() if defs
                 else ()) if fixturedefs and fixturedefs[-1].scope in ("module", "class", "package")]
        if names and not item.get_closest_marker("xdist_group"):
            shared[item] = names[0]
            for name in names[1:]:
                group[find(name)] = find(names[0])
    for item, name in shared.items():
        item.add_marker(pytest.mark.xdist_group(find(name)))
    if getattr(config.option, "loadgroup", False):
        # The workers take work in collection order: the slow tests first, so that the suite does not end with one
        # worker on a long test while the other has nothing left (the order within each kind is kept).
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
        # xdist 3.8 tells the scheduler a test's group by renaming `item._nodeid`, which pytest 9 no longer reads
        # (it keeps `_id`): without this every worker built every module fixture (seen: test_resume's chains ran
        # twice). The same suffix, where pytest 9 reads it.
        from _pytest.nodeid import coerce_node_id

        for item in items:
            marker = item.get_closest_marker("xdist_group")
            if marker and "@" not in item.nodeid and hasattr(item, "_id"):
                item._id = coerce_node_id(f"{item.nodeid}@{marker.args[0]}")
