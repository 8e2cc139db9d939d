"""The newer families (Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE): tiny models, MoE LoRA and routers, the routers'
auxiliary loss, and what is refused (packing through linear attention, QLoRA on MoE)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import FAMILIES, LINEAR_ATTENTION_FAMILIES, MOE_FAMILIES, ROOT
from transformers import AutoModelForImageTextToText

from vlmtune.config import ModeArguments
from vlmtune.data import packing
from vlmtune.data.collator import Collator
from vlmtune.errors import ConfigError
from vlmtune.families import FAMILIES as FAMILY_TABLE
from vlmtune.model import modes
from vlmtune.model import packing as model_packing
from vlmtune.model.load import check_quantization, load_model

ROUTERS = {"qwen3_vl_moe": ["mlp.gate.weight"], "qwen3_5_moe": ["mlp.gate.weight", "mlp.shared_expert_gate.weight"]}
LAYERS = {"qwen3_vl_moe": 2, "qwen3_5_moe": 4}


def router_names(family: str) -> set[str]:
    return {f"model.language_model.layers.{i}.{r}" for i in range(LAYERS[family]) for r in ROUTERS[family]}


def apply(tiny_model_dir, family: str, **flags):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(family))
    args = ModeArguments(**{"lora_rank": 4, **flags})
    return modes.apply_plan(model, FAMILY_TABLE[family], modes.plan_from_args(args), args)


def trainable(model) -> set[str]:
    return {n.removeprefix(modes.PEFT_PREFIX) for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ tiny models


def test_registry_tiny_models_and_cli_choices_cover_every_family(capsys):
    from vlmtune.cli import main
    from vlmtune.testing.tiny import TINY_CONFIGS, TINY_TEMPLATES

    assert set(FAMILY_TABLE) == set(FAMILIES) == set(TINY_CONFIGS) == set(TINY_TEMPLATES)
    with pytest.raises(SystemExit):
        main(["tiny-model", "--help"])
    assert "{" + ",".join(FAMILY_TABLE) + "}" in capsys.readouterr().out.replace("\n", "").replace(" ", "")


@pytest.mark.parametrize(("family", "fixture"), [("qwen3_vl_moe", "qwen3_vl_instruct.jinja"),
                                                 ("qwen3_5", "qwen3_5.jinja"), ("qwen3_5_moe", "qwen3_5.jinja")])
def test_tiny_models_carry_the_official_template_and_know_the_think_tokens(tiny_model_dir, family, fixture):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir(family))
    official = (ROOT / "tests" / "fixtures" / "chat_templates" / fixture).read_text()
    assert processor.chat_template == official
    tok = processor.tokenizer
    think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert tok.unk_token_id not in think and len(set(think)) == 2
    assert tok.encode("<think>\n\n</think>", add_special_tokens=False)[::3] == think  # single tokens, not split
    assert "<think>" not in tok.all_special_tokens  # added, not special, as in the real tokenizers
    config = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(family)).config
    assert config.get_text_config().vocab_size == len(tok)


def test_tiny_qwen3_5_has_both_token_mixers_and_the_moe_its_experts(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen3_5_moe"))
    layers = model.model.language_model.layers
    assert [hasattr(layer, "linear_attn") for layer in layers] == [True, False, True, False]
    experts = layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 48, 64) and experts.down_proj.shape == (4, 64, 24)


def test_tiny_qwen3_vl_moe_is_written_in_the_hub_layout_and_loads_back(tiny_model_dir):
    """The hub files store the experts transposed ([E, H, 2I]); transformers transposes them on load."""
    from safetensors import safe_open

    folder = tiny_model_dir("qwen3_vl_moe")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        on_disk = f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape()
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert on_disk == [4, 64, 48] and model.model.language_model.layers[0].mlp.experts.gate_up_proj.shape == (4, 48, 64)


# ------------------------------------------------------------------ MoE modes


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("mode", ["full", "lora", "lora_vision"])
def test_routers_are_frozen_by_default_and_train_with_the_flag(tiny_model_dir, family, mode):
    routers = router_names(family)
    frozen = trainable(apply(tiny_model_dir, family, mode=mode))
    assert not frozen & routers
    trained = trainable(apply(tiny_model_dir, family, mode=mode, train_router=True))
    assert trained - frozen == routers


def test_train_router_is_saved_beside_the_adapters_and_refused_for_dense_models(tiny_model_dir):
    model = apply(tiny_model_dir, "qwen3_5_moe", mode="lora", train_router=True)
    plan = modes.plan_from_args(ModeArguments(mode="lora", train_router=True))
    assert modes.fully_trained_names(model.get_base_model(), FAMILY_TABLE["qwen3_5_moe"], plan) == router_names(
        "qwen3_5_moe")
    with pytest.raises(ConfigError, match="qwen3_5 is not a mixture-of-experts model"):
        apply(tiny_model_dir, "qwen3_5", mode="lora", train_router=True)


def test_expert_lora_is_peft_target_parameters_without_dropout(tiny_model_dir, caplog):
    from peft.tuners.lora.layer import ParamWrapper

    with caplog.at_level(logging.INFO, logger="vlmtune"):
        model = apply(tiny_model_dir, "qwen3_vl_moe", mode="lora", lora_dropout=0.1)
    assert "LoRA dropout 0.1 -> 0" in caplog.text
    config = model.peft_config["default"]
    assert config.lora_dropout == 0.0
    assert sorted(config.target_parameters) == sorted(f"model.language_model.layers.{i}.mlp.experts.{p}"
                                                       for i in (0, 1) for p in ("gate_up_proj", "down_proj"))
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert sorted(w.parameter_name for w in wrappers) == ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]
    # rank per expert: lora_A has rank x experts rows
    assert {tuple(w.lora_A["default"].weight.shape) for w in wrappers} == {(16, 64), (16, 24)}
    with pytest.raises(ConfigError, match="--use_dora cannot reach the fused MoE experts"):
        apply(tiny_model_dir, "qwen3_vl_moe", mode="lora", use_dora=True)


def test_lora_target_can_name_the_experts(tiny_model_dir):
    only_gate_up = trainable(apply(tiny_model_dir, "qwen3_5_moe", mode="lora", lora_target="gate_up_proj"))
    assert only_gate_up == {f"model.language_model.layers.{i}.mlp.experts.lora_{ab}.default.weight"
                            for i in range(4) for ab in "AB"}  # one parameter per module: one wrapper, not nested
    experts = apply(tiny_model_dir, "qwen3_5_moe", mode="lora", lora_target="experts")
    assert {modes.clean_name(n) for n, p in experts.named_parameters() if not p.requires_grad
            and ".experts." in n} == {f"model.language_model.layers.{i}.mlp.experts.{p}"
                                      for i in range(4) for p in ("gate_up_proj", "down_proj")}
    assert len(trainable(experts)) == 4 * 4


def test_clean_name_unwraps_nested_peft_wrappers():
    assert modes.clean_name("base_model.model.model.language_model.layers.0.mlp.experts.base_layer.base_layer."
                            "gate_up_proj") == "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert modes.clean_name("base_model.model.lm_head.base_layer.weight") == "lm_head.weight"


# ------------------------------------------------------------------ the routers' auxiliary loss


def hand_aux_loss(router_logits, experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer load balancing over all layers' tokens pooled: E * sum_e(share routed to e * mean prob)."""
    logits = torch.cat(list(router_logits))
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, experts).float()  # tokens, k, E
    return experts * (chosen.mean(0) * probs.mean(0)[None]).sum()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_training_loss_adds_the_aux_loss_at_the_config_coefficient_and_logs_it(pipeline, family, tmp_path):
    from vlmtune.config import TrainingArguments
    from vlmtune.stages.trainer import VisionLanguageTrainer

    p = pipeline(family)
    batch = Collator(p.processor.tokenizer.pad_token_id)([p.dataset[i] for i in range(4)])
    batch.pop("attention_mask")  # every token counts in the aux loss: the hand formula needs no mask
    model = p.model()
    text = model.config.get_text_config()
    text.router_aux_loss_coef = 0.25  # not the default: the coefficient must come from the config
    trainer = VisionLanguageTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                        report_to="none"),
                                    family=FAMILY_TABLE[family], run_info={})
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        plain = model(**batch)
        routed = model(**batch, output_router_logits=True)
    aux = hand_aux_loss(routed.router_logits, text.num_experts, text.num_experts_per_tok)
    assert plain.loss is not None and plain.aux_loss is None
    torch.testing.assert_close(loss, plain.loss + 0.25 * aux, rtol=1e-5, atol=1e-6)
    trainer.log({"loss": float(loss)})
    assert trainer.state.log_history[-1]["aux_loss"] == pytest.approx(float(aux), rel=1e-5)
    model.eval()  # evaluation losses stay the plain cross-entropy
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, batch), plain.loss)


# ------------------------------------------------------------------ refused: packing, QLoRA


@pytest.mark.parametrize("family", LINEAR_ATTENTION_FAMILIES)
def test_packing_is_refused_through_linear_attention(pipeline, family):
    """The refusal, and why: a record packed after another gives other logits (recurrent and conv state leak)."""
    p = pipeline(family)
    model = p.model()
    with pytest.raises(ConfigError, match=f"--packing is not supported for {family}: its linear-attention"):
        model_packing.prepare_model(model)
    model_packing.disable_kv_cache(model)
    items = [it for it, r in zip((p.dataset[i] for i in range(len(p.dataset))), p.dataset.records)
             if r.id in ("single_red_circle", "text_only")]
    batch = packing.PackedCollator(p.processor.tokenizer.pad_token_id, packing.RopeIndex(model.config))([items])
    alone = Collator(p.processor.tokenizer.pad_token_id)([items[1]])
    with torch.no_grad():
        first = len(items[0]["input_ids"])
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, first:]
        alone_logits = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0]
    assert float((packed_logits - alone_logits).abs().max()) > 1e-2


def test_packing_refusal_stops_train_before_the_model_loads(tmp_path, capsys):
    from conftest import DATA_JSON

    from vlmtune.cli import main

    code = main(["train", "--data_path", str(DATA_JSON), "--tiny_family", "qwen3_5", "--packing", "True",
                 "--output_dir", str(tmp_path / "out"), "--use_cpu", "True", "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 1 and "--packing is not supported for qwen3_5" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_is_refused_for_moe_only(family):
    if family in MOE_FAMILIES:
        with pytest.raises(ConfigError, match="fused MoE experts"):
            check_quantization(FAMILY_TABLE[family], 4)
    else:
        check_quantization(FAMILY_TABLE[family], 4)
    check_quantization(FAMILY_TABLE[family], 16)


def test_one_line_says_which_linear_attention_kernels_run(tiny_model_dir, pipeline, caplog, capfd):
    import importlib.util

    with caplog.at_level(logging.INFO, logger="vlmtune"):
        model, _ = load_model(str(tiny_model_dir("qwen3_5")))
        load_model(str(tiny_model_dir("qwen3_vl_moe")))
    lines = [r.getMessage() for r in caplog.records if "linear-attention kernels" in r.getMessage()]
    assert len(lines) == 1
    installed = all(importlib.util.find_spec(m) for m in ("fla", "causal_conv1d"))
    assert lines[0].startswith("linear-attention kernels on" if installed else "linear-attention kernels off: ")
    p = pipeline("qwen3_5")
    capfd.readouterr()
    with torch.no_grad():
        model(**Collator(p.processor.tokenizer.pad_token_id)([p.dataset[0]]))
    assert "falling back to its reference PyTorch implementation" not in capfd.readouterr().err


def test_parameter_groups_and_the_report_per_part_on_a_moe(tiny_model_dir):
    """lora_vision + --train_router on Qwen3.5-MoE: the routers train in the language model's group at its rate;
    the Gated DeltaNet's 1-D A_log / dt_bias (frozen here) and the 1-D norms take no weight decay."""
    family = FAMILY_TABLE["qwen3_5_moe"]
    model = apply(tiny_model_dir, "qwen3_5_moe", mode="lora_vision", train_router=True)
    groups = {g["name"]: g for g in modes.parameter_groups(model, family, 3e-4, 0.1, vision_lr=1e-4, merger_lr=2e-4)}
    assert {n: g["lr"] for n, g in groups.items()} == {"llm": 3e-4, "vision": 1e-4, "merger": 2e-4,
                                                       "merger/no_decay": 2e-4}
    names = {id(q): n.removeprefix(modes.PEFT_PREFIX) for n, q in model.named_parameters()}
    llm = {names[id(q)] for q in groups["llm"]["params"]}
    assert router_names("qwen3_5_moe") <= llm and groups["llm"]["weight_decay"] == 0.1
    report = modes.trainable_report(model, family).splitlines()
    llm_row = next(r for r in report if r.startswith("llm")).split()
    counted = sum(q.numel() for n, q in model.named_parameters() if q.requires_grad and n in
                  {f"{modes.PEFT_PREFIX}{m}" for m in llm})
    assert int(llm_row[1].replace(",", "")) == counted
    assert int(llm_row[2].replace(",", "")) == sum(q.numel() for n, q in model.get_base_model().named_parameters()
                                                   if modes.part_of(n, family) == "llm")
