"""estimate-memory: each term against hand-computed values for the tiny model, against the tensor memory of a real
tiny-model CPU step, against the published parameter counts, and against the 7B rule of thumb."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import FAMILIES, ROOT

from vlmtune import memory
from vlmtune.cli import main as cli_main
from vlmtune.config import ModeArguments
from vlmtune.data.collator import Collator
from vlmtune.errors import ConfigError
from vlmtune.model import modes
from vlmtune.model.load import load_family

sys.path.insert(0, str(ROOT / "bench"))
import memory_rule_of_thumb as rule_of_thumb  # noqa: E402  (the README table's bench script)

PUBLISHED_PARAMS_B = {"Qwen2-VL-2B": 2.21, "Qwen2-VL-7B": 8.29, "Qwen2.5-VL-3B": 3.75, "Qwen2.5-VL-7B": 8.29,
                      "Qwen2.5-VL-32B": 33.5, "Qwen2.5-VL-72B": 73.4, "Qwen3-VL-2B": 2.13, "Qwen3-VL-4B": 4.44,
                      "Qwen3-VL-8B": 8.77}
"""Parameter counts (billions) on the models' hub pages, to check the built-in shapes against."""

# Tiny Qwen2-VL, by hand (vlmtune/families/qwen2_vl.py): text hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads,
# vocabulary 565, untied lm_head; vision embed 32, MLP 64, 2 blocks, patch 14, merger to 64.
H, MLP, LAYERS, Q, VOCAB = 64, 128, 2, 64, 565
LAYER = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k, v (biases), o, MLP, norms
LLM = VOCAB * H + LAYERS * LAYER + H + VOCAB * H  # embeddings, layers, final norm, lm_head
VISION = 3 * 2 * 14 * 14 * 32 + 2 * (2 * 64 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32))
MERGER = 2 * 32 + (128 * 128 + 128) + (128 * 64 + 64)
PARAMS = VISION + MERGER + LLM
LORA_LLM = LAYERS * 64 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))  # rank 64
LORA_VISION = 2 * 64 * ((32 + 96) + (32 + 32) + (32 + 64) + (64 + 32))
QUANTIZABLE = LAYERS * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # LLM linear weights (lm_head skipped)


@pytest.fixture(scope="module")
def tiny_shape(tiny_model_dir):
    return memory.model_shape(memory.load_config("tiny:qwen2_vl"))


def test_parameter_counts_of_the_tiny_model(tiny_shape):
    assert (PARAMS, VISION, MERGER, LLM) == (226_176, 54_720, 24_832, 146_624)  # the hand sums themselves
    assert tiny_shape.params == PARAMS
    assert tiny_shape.by_part == {"vision": VISION, "merger": MERGER, "llm": LLM}
    assert tiny_shape.quantizable == QUANTIZABLE
    assert tiny_shape.lora("lora", 64) == LORA_LLM
    assert tiny_shape.lora("lora_vision", 64) == LORA_LLM + LORA_VISION
    assert tiny_shape.lora("lora", 8) == LORA_LLM // 8
    assert tiny_shape.trainable == {"full": MERGER + LLM, "lora": 0, "lora_vision": MERGER}


def test_weights_gradients_and_optimizer_terms_by_hand(tiny_shape):
    def est(**kw):
        return memory.estimate("tiny", memory.Setup(**kw), tiny_shape)

    lora = est(mode="lora", precision="fp32")
    assert lora.bytes("weights") == PARAMS * 4
    assert lora.bytes("lora adapters") == LORA_LLM * 4
    assert lora.bytes("gradients") == LORA_LLM * 4
    assert lora.bytes("optimizer states") == 2 * LORA_LLM * 4
    assert lora.bytes("optimizer step temporaries") == 0  # fused AdamW, the Trainer's default
    assert est(mode="lora", optim="adamw_torch").bytes("optimizer step temporaries") == LORA_LLM * 4

    pure = est(mode="full", precision="pure_bf16")
    assert pure.bytes("weights") == PARAMS * 2
    assert pure.bytes("gradients") == (MERGER + LLM) * 2
    assert pure.bytes("optimizer states") == (MERGER + LLM) * 2 * 2
    full = est(mode="full", precision="bf16")  # --bf16: what trains keeps fp32 masters, the rest stays bf16
    assert full.bytes("weights") == VISION * 2 + (MERGER + LLM) * 4
    assert full.bytes("gradients") == (MERGER + LLM) * 4
    assert full.bytes("optimizer states") == (MERGER + LLM) * 4 * 2
    amp = est(mode="full", precision="amp")
    assert amp.bytes("weights") + amp.bytes("gradients") + amp.bytes("optimizer states") == (
        PARAMS * 4 + (MERGER + LLM) * (4 + 8))

    vision = est(mode="lora_vision", precision="bf16")
    assert vision.bytes("gradients") == MERGER * 4 + (LORA_LLM + LORA_VISION) * 4

    qlora = est(mode="lora", bits=4)
    assert qlora.bytes("weights") == pytest.approx(QUANTIZABLE * memory.NF4_BYTES + (PARAMS - QUANTIZABLE) * 4)
    assert est(mode="lora", bits=8).bytes("weights") == QUANTIZABLE + (PARAMS - QUANTIZABLE) * 4

    zero2 = est(mode="full", zero=2, gpus=4)
    assert zero2.bytes("gradients") == (MERGER + LLM) * 2 / 4
    assert zero2.bytes("optimizer states") == (MERGER + LLM) * 12 / 4  # fp32 master + 2 fp32 states
    assert zero2.bytes("weights") == PARAMS * 2
    zero3 = est(mode="full", zero=3, gpus=4)
    assert zero3.bytes("weights") == PARAMS * 2 / 4 + LAYER * 2  # a shard + the largest layer gathered
    offload = est(mode="full", zero=3, gpus=4, offload="all")
    assert offload.bytes("optimizer states") == 0 and offload.bytes("weights") == LAYER * 2


def test_activation_vision_and_logit_terms_by_hand(tiny_shape):
    setup = memory.Setup(mode="lora", precision="fp32", batch_size=2, seq_len=40, images=1, image_pixels=84 * 84,
                         device="cpu")
    est = memory.estimate("tiny", setup, tiny_shape)
    vision_tokens = 84 * 84 // 28**2
    tokens = 2 * (40 + vision_tokens)
    assert (vision_tokens, tokens) == (9, 98)
    # per token and layer, fp32: norm inputs 2*4*64; q, k, v (KV heads repeated: batch of 2 with a mask), attention
    # output; gate, SiLU, up; LoRA on 7 linears: fp32 dropout mask + dropped input per input feature, rank output
    layer = 2 * 4 * H + 4 * (Q + 2 * Q + Q) + 3 * 4 * MLP + (4 + 4) * (6 * H + MLP) + 4 * 64 * 7
    head = (4 + 4) * H  # final norm input + lm_head input
    assert est.alternatives["activations without checkpointing"] == tokens * (LAYERS * layer + head)
    assert est.alternatives["activations with checkpointing"] == tokens * (LAYERS * 4 * H + layer + head)
    assert est.bytes("activations") == est.alternatives["activations without checkpointing"]
    assert est.bytes("vision") == 2 * vision_tokens * H * 4  # frozen tower: only its output
    assert est.alternatives["logits without Liger"] == tokens * VOCAB * (4 + 4 + 4)
    chunk = 2 ** math.ceil(math.log2(math.ceil(tokens / math.ceil(VOCAB / H))))
    assert est.alternatives["logits with Liger"] == 4 * chunk * VOCAB + 4 * tokens * H
    assert est.bytes("attention mask") == 2 * 49 * 49
    gc = memory.estimate("tiny", memory.Setup(**{**setup.__dict__, "gradient_checkpointing": True}), tiny_shape)
    assert gc.bytes("activations") == est.alternatives["activations with checkpointing"]


def saved_and_state_bytes(model, family, batch) -> dict[str, int]:
    """One training step on CPU; the bytes of the tensors autograd saved during the forward (parameters excluded,
    each storage once), and of parameters, gradients and AdamW states after the step."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    optimizer = torch.optim.AdamW(modes.parameter_groups(model, family, 1e-4, 0.0))
    optimizer.step()
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return {
        "saved": sum(saved.values()),
        "weights": sum(storages.values()),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None),
        "optimizer": sum(v.numel() * v.element_size() for state in optimizer.state.values()
                         for v in state.values() if torch.is_tensor(v) and v.dim() > 0),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_matches_a_measured_tiny_training_step(pipeline, family):
    """Two single-image records (one token apart, so the batch is padded), fp32 on CPU, for each mode.
    Weights, gradients and AdamW states: summed tensor bytes after the step must equal the estimate exactly.
    Activations: the bytes autograd saved during the forward (each storage once, parameters excluded) against
    the estimate's activations + vision + attention mask + fp32 log-probs, within 10%."""
    p = pipeline(family)
    chosen = [i for i, r in enumerate(p.dataset.records) if r.id in ("single_red_circle", "single_green_triangle")]
    items = [p.dataset[i] for i in chosen]
    grids = {tuple(it["image_grid_thw"][0].tolist()) for it in items}
    assert len(grids) == 1 and len({len(it["input_ids"]) for it in items}) == 2
    t, gh, gw = grids.pop()
    batch = Collator(p.processor.tokenizer.pad_token_id)(items)
    length = batch["input_ids"].shape[1]
    vision_tokens = t * gh * gw // 4
    shape = memory.model_shape(memory.load_config(str(p.model_dir)))
    family_ = load_family(str(p.model_dir))
    for mode in ("lora", "lora_vision", "full"):
        model = p.model()
        model.config.text_config.use_cache = False
        args = ModeArguments(mode=mode)
        model = modes.apply_plan(model, family_, modes.plan_from_args(args), args)
        measured = saved_and_state_bytes(model, family_, batch)
        setup = memory.Setup(mode=mode, precision="fp32", batch_size=2, seq_len=length - vision_tokens, images=1,
                             image_pixels=gh * gw * (family_.patch_size**2), device="cpu")
        est = memory.estimate(str(p.model_dir), setup, shape)
        assert memory.vision_tokens(shape, setup) == vision_tokens
        assert measured["weights"] == est.bytes("weights") + est.bytes("lora adapters"), mode
        assert measured["gradients"] == est.bytes("gradients"), mode
        assert measured["optimizer"] == est.bytes("optimizer states"), mode
        log_probs = 2 * length * shape.vocab * 4
        state = est.bytes("linear-attention state") if "linear-attention state" in est.rows else 0
        expected = est.bytes("activations") + state + est.bytes("vision") + est.bytes("attention mask") + log_probs
        assert expected == pytest.approx(measured["saved"], rel=0.10), (mode, expected / measured["saved"])


def test_moe_total_and_active_parameters_and_the_recurrent_state_by_hand(pipeline):
    """Tiny Qwen3-VL-MoE: 2 layers of 4 experts [2 x 24, 64] + [64, 24], top 2: a token skips half the experts.
    Tiny Qwen3.5: 2 Gated DeltaNet layers, 4 value heads of 16 x 16; 39 tokens fit one 64-token chunk."""
    moe = pipeline("qwen3_vl_moe")
    shape = memory.model_shape(memory.load_config(str(moe.model_dir)))
    experts = 2 * 4 * (2 * 24 * 64 + 64 * 24)
    assert shape.params == sum(q.numel() for q in moe.model().parameters())
    assert (shape.expert_params, shape.active_params) == (experts, shape.params - experts // 2)
    table = memory.estimate(str(moe.model_dir), memory.Setup(mode="lora"), shape).table()
    assert f"{shape.active_params:,} active per token (2 of 4 experts)" in table
    with pytest.raises(ConfigError, match="refuses QLoRA for MoE"):
        memory.estimate(str(moe.model_dir), memory.Setup(mode="lora", bits=4), shape)

    hybrid = memory.model_shape(memory.load_config(str(pipeline("qwen3_5").model_dir)))
    assert (hybrid.linear_layers, hybrid.recurrent_state) == (2, 4 * 16 * 16)
    assert hybrid.conv_state == (2 * 2 * 16 + 4 * 16) * 4  # (q, k, v channels) x kernel width
    for kernels, layers in ((False, 2), (True, 1)):  # PyTorch path: every layer's chunk states; fla: one layer's
        setup = memory.Setup(mode="lora", batch_size=2, seq_len=39, images=0, linear_kernels=kernels)
        est = memory.estimate("tiny", setup, hybrid)
        assert est.bytes("linear-attention state") == 2 * layers * 1 * 4 * (4 * 16 * 16)
    setup = memory.Setup(mode="lora", seq_len=1000, images=0, linear_kernels=False)
    assert memory.estimate("tiny", setup, hybrid).bytes("linear-attention state") == 2 * 16 * 4 * 1024


def test_built_in_moe_shapes_match_published_counts():
    """Qwen3-VL-30B-A3B: 31.07B on its hub page. Activated parameters of the language models (the Qwen3 MoE model
    cards: 30B-A3B 3.3B, 235B-A22B 22B): all but the vision tower and the experts a token is not routed to."""
    for name, total, active in (("Qwen3-VL-30B-A3B", 31.07, 3.3), ("Qwen3-VL-235B-A22B", None, 22.0)):
        shape = memory.model_shape(memory.load_config(f"Qwen/{name}-Instruct"))
        if total:
            assert shape.params / 1e9 == pytest.approx(total, rel=0.005), name
        llm_active = shape.active_params - shape.by_part["vision"] - shape.by_part["merger"]
        assert llm_active / 1e9 == pytest.approx(active, rel=0.03), name
    big = memory.model_shape(memory.load_config("Qwen/Qwen3.5-397B-A17B"))
    assert (big.experts, big.experts_per_token, big.linear_layers, big.layers) == (512, 10, 45, 60)
    assert big.recurrent_state * 4 == 4 * 2**20  # 64 value heads x 128 x 128 in fp32: 4 MiB per sequence and layer


def test_built_in_shapes_match_the_published_parameter_counts():
    for name, published in PUBLISHED_PARAMS_B.items():
        shape = memory.model_shape(memory.load_config(f"Qwen/{name}-Instruct"))
        assert shape.params / 1e9 == pytest.approx(published, rel=0.005), name


def test_7b_rows_agree_in_magnitude_with_the_rule_of_thumb():
    """Static memory (weights + adapters + gradients + optimizer states) of the two full rows within 10% of the rule
    (120 and 60 GB); every peak within 3x of its row; the QLoRA rows say why they are higher."""
    table = rule_of_thumb.rule_of_thumb("Qwen/Qwen2.5-VL-7B-Instruct")
    rows = {name: (rule, est, why) for name, rule, est, why in table}
    assert list(rows) == list(rule_of_thumb.RULE_OF_THUMB_7B_GB)
    for name, (rule, est, why) in rows.items():
        static = sum(est.bytes(k) for k in ("weights", "lora adapters", "gradients", "optimizer states"))
        if name.startswith("full"):
            assert static / memory.GB == pytest.approx(rule, rel=0.10), name
        assert rule / 3 < est.peak / memory.GB < rule * 3, name
        assert "8.29B params, not 7B" in why
    assert "upcast to fp32" in rows["QLoRA 4-bit"][2]
    ordered = [rows[name][1].peak for name in rule_of_thumb.RULE_OF_THUMB_7B_GB]
    assert ordered == sorted(ordered, reverse=True)


def test_memory_options_that_change_the_estimate(tiny_shape):
    base = memory.Setup(mode="lora", batch_size=4, seq_len=2048)
    plain = memory.estimate("tiny", base, tiny_shape)
    liger = memory.estimate("tiny", memory.Setup(**{**base.__dict__, "liger": True}), tiny_shape)
    flash = memory.estimate("tiny", memory.Setup(**{**base.__dict__, "attn": "flash_attention_2"}), tiny_shape)
    assert liger.bytes("logits + loss") < plain.bytes("logits + loss") / 5
    assert flash.bytes("attention mask") == 0 < plain.bytes("attention mask")
    assert flash.bytes("activations") < plain.bytes("activations")  # GQA: KV heads not repeated
    with pytest.raises(ConfigError, match="--offload needs DeepSpeed"):
        memory.estimate("tiny", memory.Setup(offload="optimizer"), tiny_shape)
    with pytest.raises(ConfigError, match="unknown model 'Qwen/Qwen9-VL-1B'"):
        memory.load_config("Qwen/Qwen9-VL-1B")


def test_cli_prints_the_itemised_estimate(capsys, tiny_model_dir):
    assert cli_main(["estimate-memory", "Qwen/Qwen2-VL-7B-Instruct", "--mode", "full", "--zero", "3", "--gpus", "8",
                     "--gradient_checkpointing", "--liger"]) == 0
    out = capsys.readouterr().out
    for row in ("weights", "gradients", "optimizer states", "activations", "vision", "logits + loss",
                "peak (upper bound)", "activations with checkpointing", "logits without Liger"):
        assert row in out
    assert "ZeRO-3: /8" in out
    assert cli_main(["estimate-memory", "no/such-model"]) == 1
    assert "unknown model" in capsys.readouterr().err
