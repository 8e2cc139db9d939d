"""Model loading: attention choice, Liger switched off with a reason where it cannot run, and (on CUDA)
Liger / flash-attention / QLoRA for real. CUDA tests skip without a GPU."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from conftest import FAMILIES, cuda

from vlmtune.data.collator import Collator
from vlmtune.families import FAMILIES as FAMILY_TABLE
from vlmtune.model.load import (
    apply_liger,
    choose_attention,
    liger_unavailable_reason,
    load_model,
    quantization_skip_modules,
)


def test_attention_defaults_to_sdpa_without_flash_attn_and_keeps_an_explicit_choice():
    if not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        assert choose_attention(None) == "sdpa"
    assert choose_attention("eager") == "eager"


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_quantizes_the_language_model_only(tiny_model_dir, family):
    """Checked with transformers' own matcher, on every Linear of the real module tree (no GPU needed)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    model, fam = load_model(str(tiny_model_dir(family)))
    skip = quantization_skip_modules(fam)
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    converted = {name for name in linears if should_convert_module(name, skip)}
    assert converted == {n for n in linears if n.startswith(fam.language_model + ".")}
    assert any(n.startswith(fam.vision + ".") for n in linears) and "lm_head" in linears


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_liger_is_never_applied_on_cpu_and_says_why_in_one_line(tiny_model_dir, caplog):
    model, family = load_model(str(tiny_model_dir()))
    forward = model.forward
    with caplog.at_level(logging.INFO, logger="vlmtune"):
        assert apply_liger(family, model) is False
    lines = [r.getMessage() for r in caplog.records if "Liger" in r.getMessage()]
    assert lines == ["Liger kernels off: no CUDA device (Liger's Triton kernels need one)"]
    assert model.forward == forward
    assert liger_unavailable_reason(family) is not None


def _batch(pipeline, family, device):
    p = pipeline(family)
    batch = Collator(p.processor.tokenizer.pad_token_id)([p.dataset[i] for i in range(len(p.dataset))])
    return {k: v.to(device) for k, v in batch.items()}


@cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_liger_loss_matches_plain_loss_in_bf16(tiny_model_dir, pipeline, family):
    pytest.importorskip("liger_kernel")
    batch = _batch(pipeline, family, "cuda")
    plain, _ = load_model(str(tiny_model_dir(family)), dtype=torch.bfloat16)
    fused, fam = load_model(str(tiny_model_dir(family)), dtype=torch.bfloat16)
    assert apply_liger(FAMILY_TABLE[family], fused) is True
    plain.cuda().train()
    fused.cuda().train()
    loss_plain = plain(**batch).loss
    loss_fused = fused(**batch).loss
    assert torch.isfinite(loss_fused)
    assert loss_fused.item() == pytest.approx(loss_plain.item(), rel=2e-2)
    loss_fused.backward()


@cuda
def test_flash_attention_2_forward_matches_sdpa(tiny_model_dir, pipeline):
    pytest.importorskip("flash_attn")
    batch = _batch(pipeline, "qwen2_5_vl", "cuda")
    sdpa, _ = load_model(str(tiny_model_dir("qwen2_5_vl")), dtype=torch.bfloat16, attn_implementation="sdpa")
    flash, _ = load_model(str(tiny_model_dir("qwen2_5_vl")), dtype=torch.bfloat16,
                          attn_implementation="flash_attention_2")
    with torch.no_grad():
        a = sdpa.cuda().eval()(**batch).loss
        b = flash.cuda().eval()(**batch).loss
    assert b.item() == pytest.approx(a.item(), rel=2e-2)


@cuda
def test_qlora_4bit_trains_a_step(tiny_model_dir, pipeline):
    pytest.importorskip("bitsandbytes")
    from vlmtune.config import ModeArguments
    from vlmtune.model import modes

    model, family = load_model(str(tiny_model_dir()), dtype=torch.bfloat16, bits=4)
    args = ModeArguments(mode="lora", lora_rank=8)
    model = modes.apply_plan(model, family, modes.plan_from_args(args), args)
    loss = model(**_batch(pipeline, "qwen2_vl", model.device)).loss
    loss.backward()
    assert torch.isfinite(loss)
