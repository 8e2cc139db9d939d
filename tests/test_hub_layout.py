"""Qwen3-VL-MoE folders vlmtune writes (merged, end of a full run) store the experts in the hub checkpoints'
layout ([E, H, 2I] / [E, I, H]): transformers loads them (transposing), and so does a ZeRO-3 run, which only can
with that layout; vLLM's loader expects it too (bench/serve_vllm.sh)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import forkserver
import pytest
import torch
from conftest import DATA_JSON, EXAMPLES, FORKRUN, ROOT
from safetensors import safe_open

EXPERTS = "model.language_model.layers.0.mlp.experts"
GATE_UP, DOWN = f"{EXPERTS}.gate_up_proj", f"{EXPERTS}.down_proj"
FLAGS = ["--data_path", str(DATA_JSON), "--image_folder", str(EXAMPLES), "--tiny_family", "qwen3_vl_moe",
         "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "True",
         "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "0", "--logging_steps", "1"]


def shapes(folder: Path) -> dict[str, list[int]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys() if k in (GATE_UP, DOWN)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def merged_moe(tmp_path_factory):
    """A one-step LoRA run of the tiny Qwen3-VL-MoE with LoRA on the experts, merged."""
    from vlmtune.config import parse_train_args
    from vlmtune.merge import merge
    from vlmtune.stages.sft import train

    root = tmp_path_factory.mktemp("hub-layout")
    run = train(*parse_train_args([*FLAGS, "--mode", "lora", "--lora_rank", "4", "--lora_alpha", "8",
                                   "--lora_dropout", "0", "--max_steps", "1", "--output_dir", str(root / "run")]))
    return merge(run, root / "merged"), run


def test_a_merged_qwen3_vl_moe_folder_stores_the_experts_in_the_hub_layout(merged_moe):
    from transformers import AutoConfig, AutoModelForImageTextToText

    result, _ = merged_moe
    text = AutoConfig.from_pretrained(result.output_dir).text_config
    experts, hidden, inter = text.num_experts, text.hidden_size, text.moe_intermediate_size
    assert 2 * inter != hidden  # the two layouts are told apart by their shapes
    assert shapes(result.output_dir) == {GATE_UP: [experts, hidden, 2 * inter], DOWN: [experts, inter, hidden]}
    model = AutoModelForImageTextToText.from_pretrained(result.output_dir)  # transformers transposes on load
    experts_module = model.model.language_model.layers[0].mlp.experts
    assert experts_module.gate_up_proj.shape == (experts, 2 * inter, hidden)
    with safe_open(str(result.output_dir / "model.safetensors"), "pt") as f:  # the same numbers, transposed
        assert torch.equal(f.get_tensor(GATE_UP).transpose(1, 2), experts_module.gate_up_proj.detach())
    assert json.loads((result.output_dir / "config.json").read_text())["text_config"]["norm_topk_prob"] is True


@pytest.mark.slow
def test_a_full_run_ends_in_the_hub_layout_and_a_zero3_run_starts_from_a_merged_folder(merged_moe, tmp_path):
    from vlmtune.config import parse_train_args
    from vlmtune.stages.sft import train

    result, _ = merged_moe
    full = train(*parse_train_args([*FLAGS, "--mode", "full", "--max_steps", "1",
                                    "--output_dir", str(tmp_path / "full")]))
    assert shapes(full) == shapes(result.output_dir)  # the end of a full run is a model folder too

    out = tmp_path / "zero3"
    cmd = [*FORKRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "vlmtune.cli", "train", *[f for f in FLAGS if f not in ("--tiny_family", "qwen3_vl_moe")],
           "--model_name_or_path", str(result.output_dir), "--mode", "lora", "--lora_rank", "4",
           "--per_device_train_batch_size", "1", "--deepspeed", "scripts/zero3.json", "--max_steps", "2",
           "--output_dir", str(out)]
    proc = forkserver.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
