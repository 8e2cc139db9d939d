"""The modes table: exact trainable sets per preset and per flag, contradictions, parameter groups."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForImageTextToText

from vlmtune.config import ModeArguments
from vlmtune.errors import ConfigError
from vlmtune.families import FAMILIES as FAMILY_TABLE
from vlmtune.model import modes

LLM_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
VISION_LINEARS = {"qwen2_vl": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
                  "qwen2_5_vl": ["attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
                  "qwen3_vl": ["attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"]}
VISION_LINEARS.update(dict.fromkeys(("qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"), VISION_LINEARS["qwen3_vl"]))
ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
GATED_DELTANET = ["linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b", "linear_attn.in_proj_a",
                  "linear_attn.out_proj"]
SHARED_EXPERT = ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"]
NEW_LLM_LINEARS = {  # layer -> the linear layers LoRA goes on by default (tiny Qwen3.5: linear attention in 0 and 2)
    "qwen3_vl_moe": {0: ATTENTION, 1: ATTENTION},
    "qwen3_5": {i: (GATED_DELTANET if i % 2 == 0 else ATTENTION) + LLM_LINEARS[4:] for i in range(4)},
    "qwen3_5_moe": {i: (GATED_DELTANET if i % 2 == 0 else ATTENTION) + SHARED_EXPERT for i in range(4)},
}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def lora_names(prefix: str, linears: list[str], indices) -> set[str]:
    return {f"{prefix}.{i}.{lin}.lora_{ab}.default.weight" for i in indices for lin in linears for ab in "AB"}


def llm_lora(layers=(0, 1)):
    return lora_names("model.language_model.layers", LLM_LINEARS, layers)


def vision_lora(family, blocks=(0, 1)):
    return lora_names("model.visual.blocks", VISION_LINEARS[family], blocks)


def all_params(model, prefix: str) -> set[str]:
    return {modes.clean_name(n) for n, _ in model.named_parameters() if modes.clean_name(n).startswith(prefix)
            and ".lora_" not in n}


def trainable(model) -> dict[str, set[str]]:
    """Trainable names per part, PEFT prefix removed (LoRA names keep their .lora_X.default part)."""
    family = FAMILY_TABLE[model.config.model_type]
    out = {part: set() for part in modes.PARTS}
    for name, param in model.named_parameters():
        if param.requires_grad:
            out[modes.part_of(name, family)].add(name.removeprefix(modes.PEFT_PREFIX))
    return out


def peft_reference_llm_lora(tiny_model_dir, family: str) -> set[str]:
    """LoRA names PEFT itself gives the hand-listed linears and, for MoE, the fused experts (target_parameters)."""
    from peft import LoraConfig, get_peft_model

    layers = NEW_LLM_LINEARS[family]
    modules = [f"model.language_model.layers.{i}.{lin}" for i, lins in layers.items() for lin in lins]
    parameters = [f"model.language_model.layers.{i}.{e}" for i in layers for e in EXPERTS] if "moe" in family else None
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(family))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=modules, target_parameters=parameters))
    return {n.removeprefix(modes.PEFT_PREFIX) for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def build(tiny_model_dir):
    def make(family="qwen2_vl", **flags):
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(family))
        args = ModeArguments(**{"lora_rank": 4, **flags})
        plan = modes.plan_from_args(args)
        return modes.apply_plan(model, FAMILY_TABLE[family], plan, args), plan

    return make


def test_preset_lora_trains_exactly_the_llm_lora_weights(build):
    model, _ = build(mode="lora")
    assert trainable(model) == {"vision": set(), "merger": set(), "llm": llm_lora()}


def test_preset_lora_vision_trains_llm_and_vision_lora_and_the_whole_merger(build):
    model, _ = build(mode="lora_vision")
    base = model.get_base_model()
    assert trainable(model) == {"vision": vision_lora("qwen2_vl"), "merger": all_params(base, "model.visual.merger"),
                                "llm": llm_lora()}
    assert len(trainable(model)["merger"]) == 6


def test_preset_full_trains_the_llm_and_merger_fully_and_freezes_vision(build):
    model, _ = build(mode="full")
    assert trainable(model) == {"vision": set(), "merger": all_params(model, "model.visual.merger"),
                                "llm": all_params(model, "model.language_model") | {"lm_head.weight"}}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_vision_per_family(build, family, tiny_model_dir):
    """MoE models: LoRA on the fused experts too (PEFT's target_parameters), never on the routers."""
    model, _ = build(family, mode="lora_vision")
    got = trainable(model)
    assert got["vision"] == vision_lora(family)
    merger_prefixes = FAMILY_TABLE[family].mergers
    expected = set().union(*(all_params(model.get_base_model(), p) for p in merger_prefixes))
    assert got["merger"] == expected and expected
    assert got["llm"] == (peft_reference_llm_lora(tiny_model_dir, family) if family in NEW_LLM_LINEARS else llm_lora())
    if "moe" in family:
        assert sum(".mlp.experts." in n and ".lora_" in n for n in got["llm"]) == 4 * len(NEW_LLM_LINEARS[family])
        assert not any(".mlp.gate." in n or "shared_expert_gate" in n for n in got["llm"])


@pytest.mark.parametrize(("flags", "expected"), [
    ({"mode": "lora", "unfreeze_topk_llm": 1},
     lambda m: {"vision": set(), "merger": set(),
                "llm": llm_lora([0]) | all_params(m, "model.language_model.layers.1.")}),
    ({"mode": "lora", "unfreeze_topk_vision": 1},
     lambda m: {"vision": all_params(m, "model.visual.blocks.1."), "merger": set(), "llm": llm_lora()}),
    ({"mode": "lora_vision", "freeze_merger": True},
     lambda m: {"vision": vision_lora("qwen2_vl"), "merger": set(), "llm": llm_lora()}),
    ({"mode": "lora", "freeze_merger": False},
     lambda m: {"vision": set(), "merger": all_params(m, "model.visual.merger"), "llm": llm_lora()}),
    ({"mode": "lora", "vision_lora": True},
     lambda m: {"vision": vision_lora("qwen2_vl"), "merger": set(), "llm": llm_lora()}),
    ({"mode": "lora_vision", "vision_lora": False},
     lambda m: {"vision": set(), "merger": all_params(m, "model.visual.merger"), "llm": llm_lora()}),
    ({"mode": "lora_vision", "freeze_llm": True},
     lambda m: {"vision": vision_lora("qwen2_vl"), "merger": all_params(m, "model.visual.merger"), "llm": set()}),
    ({"mode": "full", "freeze_vision_tower": False},
     lambda m: {"vision": all_params(m, "model.visual") - all_params(m, "model.visual.merger"),
                "merger": all_params(m, "model.visual.merger"),
                "llm": all_params(m, "model.language_model") | {"lm_head.weight"}}),
    ({"mode": "lora", "lora_enable": False},
     lambda m: {"vision": set(), "merger": set(),
                "llm": all_params(m, "model.language_model") | {"lm_head.weight"}}),
    ({"mode": "full", "lora_enable": True},
     lambda m: {"vision": set(), "merger": all_params(m, "model.visual.merger"), "llm": llm_lora()}),
    ({"mode": "lora", "lora_target": "q_proj,v_proj"},
     lambda m: {"vision": set(), "merger": set(),
                "llm": lora_names("model.language_model.layers", ["self_attn.q_proj", "self_attn.v_proj"], (0, 1))}),
    ({"mode": "lora", "lora_target": "q_proj,lm_head"},
     lambda m: {"vision": set(), "merger": set(),
                "llm": lora_names("model.language_model.layers", ["self_attn.q_proj"], (0, 1))
                | {"lm_head.lora_A.default.weight", "lm_head.lora_B.default.weight"}}),
])
def test_flags_change_single_cells(build, flags, expected):
    model, _ = build(**flags)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert trainable(model) == expected(base)


def test_lora_hyperparameters_reach_peft(build):
    model, _ = build(mode="lora", lora_rank=8, lora_alpha=32, lora_dropout=0.2, use_rslora=True)
    layer = model.get_base_model().model.language_model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape[0] == 8
    assert layer.scaling["default"] == pytest.approx(32 / 8**0.5)  # rsLoRA: alpha / sqrt(r)
    assert layer.lora_dropout["default"].p == pytest.approx(0.2)
    model, _ = build(mode="lora", use_dora=True)
    assert any("lora_magnitude_vector" in n and p.requires_grad for n, p in model.named_parameters())


def test_every_mode_flag_is_read(build):
    """Setting any ModeArguments field away from its default changes the plan or the LoRA layers."""
    def fingerprint(family="qwen2_vl", **flags):
        model, plan = build(family, **flags)
        peft = getattr(model, "peft_config", {}).get("default")
        lora = None if peft is None else (peft.r, peft.lora_alpha, peft.lora_dropout, peft.use_dora, peft.use_rslora)
        return plan, lora, frozenset(n for n, p in model.named_parameters() if p.requires_grad)

    changes = {"mode": "full", "freeze_vision_tower": False, "freeze_merger": False, "freeze_llm": True,
               "lora_enable": False, "vision_lora": True, "unfreeze_topk_llm": 1, "unfreeze_topk_vision": 1,
               "lora_rank": 8, "lora_alpha": 8, "lora_dropout": 0.3, "lora_target": "q_proj",
               "use_dora": True, "use_rslora": True, "train_router": True}
    assert set(changes) == {f.name for f in dataclasses.fields(ModeArguments)}
    base = fingerprint(mode="lora")
    for flag, value in changes.items():
        extra = {"vision_lora": True} if flag == "freeze_llm" else {}
        if flag == "train_router":  # MoE only
            assert fingerprint("qwen3_vl_moe", mode="lora", train_router=True) != fingerprint("qwen3_vl_moe",
                                                                                               mode="lora")
            continue
        assert fingerprint(**{"mode": "lora", **extra, flag: value}) != base, flag


@pytest.mark.parametrize(("flags", "message"), [
    ({"mode": "lora", "vision_lora": True, "freeze_vision_tower": False}, "vision_lora"),
    ({"mode": "lora", "lora_enable": True, "freeze_llm": True}, "frozen language model"),
    ({"mode": "full", "unfreeze_topk_llm": 2}, "already trains fully"),
    ({"mode": "full", "freeze_vision_tower": False, "unfreeze_topk_vision": 1}, "already trains fully"),
    ({"mode": "full", "use_dora": True}, "no part uses LoRA"),
    ({"mode": "lora", "freeze_llm": True}, "nothing would train"),
    ({"mode": "lora", "lora_target": "no_such_layer"}, "no_such_layer"),
])
def test_contradictory_flags_stop_with_one_sentence(build, flags, message):
    with pytest.raises(ConfigError, match=message):
        build(**flags)


def test_parameter_groups_use_the_part_learning_rates_and_skip_decay_on_biases_and_norms(build):
    model, _ = build(mode="lora_vision")
    family = FAMILY_TABLE["qwen2_vl"]
    groups = modes.parameter_groups(model, family, 3e-4, 0.1, vision_lr=1e-4, merger_lr=2e-4)
    by_name = {g["name"]: g for g in groups}
    assert groups[0]["name"] == "llm"
    assert {n: g["lr"] for n, g in by_name.items()} == {"llm": 3e-4, "vision": 1e-4, "merger": 2e-4,
                                                        "merger/no_decay": 2e-4}
    assert by_name["merger/no_decay"]["weight_decay"] == 0.0 and by_name["merger"]["weight_decay"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in by_name["merger/no_decay"]["params"]}
    assert no_decay == {f"base_model.model.model.visual.merger.{n}" for n in
                        ("ln_q.weight", "ln_q.bias", "mlp.0.bias", "mlp.2.bias")}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_vision_lora_gets_gradients_under_gradient_checkpointing(build, pipeline):
    """Non-reentrant checkpointing: LoRA inside the frozen vision tower still receives gradients."""
    model, _ = build(mode="lora_vision")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    p = pipeline("qwen2_vl")
    from vlmtune.data.collator import Collator

    batch = Collator(p.processor.tokenizer.pad_token_id)([p.dataset[i] for i in range(4)])
    model(**batch).loss.backward()
    vision_b = [(n, q.grad) for n, q in model.named_parameters() if ".visual.blocks." in n and "lora_B" in n]
    assert vision_b and all(g is not None and float(g.abs().sum()) > 0 for _, g in vision_b)
    assert torch.isfinite(torch.stack([g.abs().sum() for _, g in vision_b])).all()


def _moved_after_small_steps(model, batch, steps: int = 3, lr: float = 1e-5) -> float:
    """Share of the merger's trained weights that moved after a few AdamW steps, forward in bf16 autocast."""
    merger = [p for n, p in model.named_parameters() if ".merger." in n and p.requires_grad and p.ndim == 2]
    before = [p.detach().clone() for p in merger]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(merger, before))
    return moved / sum(b.numel() for b in before)


def test_trained_parts_keep_fp32_masters_in_a_bf16_run(tiny_model_dir, pipeline):
    """At lr 1e-5, AdamW's updates to bf16 weights mostly round away; with fp32 masters every weight moves.
    The frozen parts stay in bf16 (no extra memory) and LoRA stays fp32 as PEFT keeps it."""
    from vlmtune.data.collator import Collator

    p = pipeline("qwen2_vl")
    batch = Collator(p.processor.tokenizer.pad_token_id)([p.dataset[i] for i in range(4)])
    shares = {}
    for upcast in (False, True):
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(), dtype=torch.bfloat16)
        args = ModeArguments(mode="lora_vision", lora_rank=4)
        model = modes.apply_plan(model, FAMILY_TABLE["qwen2_vl"], modes.plan_from_args(args), args)
        if upcast:
            trained = sum(q.numel() for q in model.parameters() if q.requires_grad and q.dtype == torch.bfloat16)
            assert modes.fp32_master_weights(model) == trained > 0
            assert {q.dtype for q in model.parameters() if q.requires_grad} == {torch.float32}
            assert {q.dtype for q in model.parameters() if not q.requires_grad} == {torch.bfloat16}
        shares[upcast] = _moved_after_small_steps(model.train(), batch)
    assert shares[True] > 0.9 and shares[False] < 0.5, shares
