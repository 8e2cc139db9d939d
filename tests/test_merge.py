"""``vlmtune merge``: merged logits equal base + adapters, strict restores, dtype kept, file set, atomic writes."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DATA_JSON
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlmtune.cli import main as cli
from vlmtune.data.collator import Collator
from vlmtune.errors import ConfigError, MergeError
from vlmtune.merge import file_set, merge, verification_batch
from vlmtune.run import NON_LORA_FILE, RUN_FILE

TRAIN_FLAGS = [
    "--max_steps", "1", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--lora_rank", "4",
    "--lora_alpha", "8", "--lora_dropout", "0", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
    "--disable_tqdm", "true", "--seed", "0",
]


def train_run(out: Path, mode: str, family: str, *extra: str) -> Path:
    """A tiny training run in this process (one step at a high learning rate, so weights move)."""
    from vlmtune.config import parse_train_args
    from vlmtune.stages.sft import train

    return train(*parse_train_args(["--data_path", str(DATA_JSON), "--mode", mode, "--tiny_family", family,
                                    "--output_dir", str(out), *TRAIN_FLAGS, *extra]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("merge-runs")
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            mode, family, *extra = {
                "lora": ("lora", "qwen2_vl"),
                "lora_vision": ("lora_vision", "qwen2_vl"),
                "qwen3_lora_vision": ("lora_vision", "qwen3_vl"),
                "qwen2_5_bf16": ("lora_vision", "qwen2_5_vl", "--bf16"),
                "full": ("full", "qwen2_vl"),
                "qwen3_vl_moe_lora": ("lora", "qwen3_vl_moe"),
                "qwen3_5_lora_vision": ("lora_vision", "qwen3_5"),
                "qwen3_5_moe_router": ("lora", "qwen3_5_moe", "--train_router", "True"),
            }[name]
            made[name] = train_run(root / name, mode, family, *extra)
        return made[name]

    return get


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("merged")
    done = {}

    def get(name: str):
        if name not in done:
            done[name] = merge(runs(name), root / name)
        return done[name]

    return get


def batch_of(pipeline, family: str):
    p = pipeline(family)
    items = [p.dataset[i] for i, r in enumerate(p.dataset.records)
             if r.id in ("two_images", "video_ball_right", "image_and_video", "text_only")]
    batch = Collator(p.processor.tokenizer.pad_token_id)(items)
    batch.pop("labels")
    return batch


@torch.no_grad()
def real_logits(model, batch):
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(dtype) if k.startswith("pixel_values") else v) for k, v in batch.items()}
    return model(**inputs).logits[batch["attention_mask"].bool()].float()


def base_plus_adapters(base_dir: Path, run_dir: Path, dtype=torch.float32):
    """Base + adapters + saved trainables, built with PEFT and load_state_dict, independently of vlmtune.merge."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, run_dir).eval()
    if (run_dir / NON_LORA_FILE).is_file():
        result = model.get_base_model().load_state_dict(load_file(run_dir / NON_LORA_FILE), strict=False)
        assert result.unexpected_keys == []
    return model


@pytest.mark.parametrize("name,family", [("lora", "qwen2_vl"), ("lora_vision", "qwen2_vl"),
                                         ("qwen3_lora_vision", "qwen3_vl"), ("qwen3_vl_moe_lora", "qwen3_vl_moe"),
                                         ("qwen3_5_lora_vision", "qwen3_5"), ("qwen3_5_moe_router", "qwen3_5_moe")])
def test_merged_logits_equal_base_plus_adapters(runs, merged, pipeline, tiny_model_dir, name, family):
    from transformers import AutoModelForImageTextToText

    result = merged(name)
    print(f"{name}: max |logits diff| merged {result.diffs['merged']:.2g}, reloaded {result.diffs['reloaded']:.2g}")
    assert result.diffs["merged"] < 1e-4 and result.diffs["reloaded"] < 1e-4
    batch = batch_of(pipeline, family)
    expected = real_logits(base_plus_adapters(tiny_model_dir(family), runs(name)), batch)
    got = real_logits(AutoModelForImageTextToText.from_pretrained(result.output_dir).eval(), batch)
    base = real_logits(AutoModelForImageTextToText.from_pretrained(tiny_model_dir(family)).eval(), batch)
    assert (expected - base).abs().max() > 1e-2  # training moved the model: the comparison below means something
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize(("name", "part"), [("lora_vision", ".merger."), ("qwen3_lora_vision", ".merger."),
                                           ("qwen3_5_moe_router", ".mlp.gate.")])
def test_trained_merger_lands_in_the_merged_weights(runs, merged, tiny_model_dir, name, part):
    """The merger (or an MoE's routers, with --train_router) trained fully: its saved tensors, not the base's, are
    in the merged folder (in-memory names differ from the file's for Qwen2-VL and Qwen3.5-MoE's experts, so compare
    through a loaded model)."""
    from transformers import AutoModelForImageTextToText

    saved = load_file(runs(name) / NON_LORA_FILE)
    assert any(part in k for k in saved)
    model = AutoModelForImageTextToText.from_pretrained(merged(name).output_dir)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir(json.loads(
        (runs(name) / RUN_FILE).read_text())["model_type"]))
    params, base_params = dict(model.named_parameters()), dict(base.named_parameters())
    for key, value in saved.items():
        assert torch.equal(params[key], value), key
        assert not torch.equal(base_params[key], value), key


def test_merged_folder_has_the_base_folders_files_and_loads_offline(merged, tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    result = merged("lora_vision")
    assert file_set(result.output_dir) == file_set(tiny_model_dir("qwen2_vl"))
    assert result.same_files_as_base is True
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    model = AutoModelForImageTextToText.from_pretrained(result.output_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(result.output_dir, local_files_only=True)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert processor.chat_template and type(processor).__name__ == "Qwen2VLProcessor"
    assert model.generation_config.eos_token_id is not None
    assert not list(result.output_dir.parent.glob(".*tmp*"))


def _dtypes(folder: Path) -> set[str]:
    found = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            found |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return found


def test_bf16_in_bf16_out(runs, merged):
    assert json.loads((runs("qwen2_5_bf16") / RUN_FILE).read_text())["dtype"] == "bfloat16"
    result = merged("qwen2_5_bf16")
    assert result.dtype == "bfloat16"
    assert json.loads((result.output_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert _dtypes(result.output_dir) == {"BF16"}
    assert result.diffs["reloaded"] <= result.tolerance


def test_dtype_flag_overrides_the_training_dtype(runs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vlmtune.generation")
    result = merge(runs("lora"), tmp_path / "out", dtype="bfloat16")
    # not a terminal: the progress helper logs a line per step, counting up to the total
    counts = [re.match(r"merge: (\d+)/(\d+) steps, ", r.getMessage()).groups() for r in caplog.records
              if r.getMessage().startswith("merge: ")]
    assert counts == [(str(i), "6") for i in range(1, 7)]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert _dtypes(tmp_path / "out") == {"BF16"}
    assert result.diffs["merged"] <= result.tolerance


def _broken_run(run: Path, tmp_path: Path, edit) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    tensors = load_file(broken / NON_LORA_FILE)
    save_file(edit(dict(tensors)), broken / NON_LORA_FILE)
    return broken


def test_renamed_trainable_stops_the_merge_naming_the_key(runs, tmp_path, capsys):
    def rename(tensors):
        tensors["model.visual.merger.mlp.zero.weight"] = tensors.pop("model.visual.merger.mlp.0.weight")
        return tensors

    broken = _broken_run(runs("lora_vision"), tmp_path, rename)
    out = tmp_path / "out"
    assert cli(["merge", str(broken), str(out)]) == 1
    err = capsys.readouterr().err
    assert "model.visual.merger.mlp.zero.weight" in err  # the unknown key
    assert "model.visual.merger.mlp.0.weight" in err  # and the one it leaves untrained
    assert "Traceback" not in err and err.splitlines()[-1].startswith("vlmtune merge: error:")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_missing_or_reshaped_trainables_stop_the_merge(runs, tmp_path):
    dropped = _broken_run(runs("lora_vision"), tmp_path, lambda t: {k: v for k, v in t.items()
                                                                    if k != "model.visual.merger.ln_q.bias"})
    with pytest.raises(MergeError, match=r"model\.visual\.merger\.ln_q\.bias"):
        merge(dropped, tmp_path / "out")
    shutil.rmtree(dropped)
    reshaped = _broken_run(runs("lora_vision"), tmp_path, lambda t: {
        **t, "model.visual.merger.ln_q.bias": torch.zeros(3)})
    with pytest.raises(MergeError, match=r"shape mismatch.*model\.visual\.merger\.ln_q\.bias"):
        merge(reshaped, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_force_and_replaced_with_it(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--force"):
        merge(runs("lora"), out)
    assert file_set(out) == {"keep.txt"}
    merge(runs("lora"), out, force=True)
    assert "keep.txt" not in file_set(out) and "model.safetensors" in file_set(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folder left behind


def test_a_failed_write_leaves_no_output_and_the_old_folder_untouched(runs, tmp_path, monkeypatch):
    import vlmtune.merge as merge_module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(merge_module, "_copy_other_files", fail)  # after the weights are written
    with pytest.raises(OSError, match="disk full"):
        merge(runs("lora"), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        merge(runs("lora"), old, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and file_set(old) == {"keep.txt"}


def test_verification_above_tolerance_writes_nothing(runs, tmp_path):
    with pytest.raises(MergeError, match="differ from base\\+adapters"):
        merge(runs("lora"), tmp_path / "out", dtype="bfloat16", atol=1e-6)
    assert list(tmp_path.iterdir()) == []


def test_full_run_is_reported_standalone(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["merge", str(runs("full")), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full fine-tune" in printed and "already a standalone model" in printed
    assert not out.exists()
    result = merge(runs("full"))
    assert result.standalone and result.output_dir is None and result.samples == 4


def test_user_mistakes_are_one_line_errors(runs, tmp_path, capsys):
    assert cli(["merge", str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err

    no_run_file = tmp_path / "run"
    shutil.copytree(runs("lora"), no_run_file)
    (no_run_file / RUN_FILE).unlink()
    assert cli(["merge", str(no_run_file), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "--base_model" in err and err.count("\n") == 1

    (tmp_path / "empty").mkdir()
    assert cli(["merge", str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    assert "neither LoRA adapters" in capsys.readouterr().err

    assert cli(["merge", str(runs("lora")), str(runs("lora")), "--force"]) == 1
    assert "is (or contains) the input" in capsys.readouterr().err
    assert (runs("lora") / "adapter_model.safetensors").is_file()


def test_base_model_flag_stands_in_for_a_missing_run_file(runs, tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    shutil.copytree(runs("lora"), run)
    (run / RUN_FILE).unlink()
    result = merge(run, tmp_path / "out", base_model=str(tiny_model_dir("qwen2_vl")))
    assert result.diffs["reloaded"] < 1e-4
    with pytest.raises(MergeError, match="qwen2_5_vl"):
        merge(runs("lora"), tmp_path / "other", base_model=str(tiny_model_dir("qwen2_5_vl")))


def test_a_sharded_base_gives_the_same_shards_and_extra_files(runs, tmp_path, tiny_model_dir):
    """A released model is sharded and carries files the processor does not write (a license): the merged
    folder has the same shard files, the same index keys per shard, and the extra files."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = tmp_path / "base"
    AutoModelForImageTextToText.from_pretrained(tiny_model_dir("qwen2_vl")).save_pretrained(base,
                                                                                             max_shard_size="300KB")
    AutoProcessor.from_pretrained(tiny_model_dir("qwen2_vl")).save_pretrained(base)
    (base / "LICENSE").write_text("license text")
    result = merge(runs("lora"), tmp_path / "out", base_model=str(base))
    assert len(list(base.glob("model-*-of-*.safetensors"))) > 1
    assert file_set(result.output_dir) == file_set(base)
    index = "model.safetensors.index.json"
    assert (json.loads((result.output_dir / index).read_text())["weight_map"]
            == json.loads((base / index).read_text())["weight_map"])
    assert (result.output_dir / "LICENSE").read_text() == "license text"
    assert result.diffs["reloaded"] < 1e-4


def test_an_adapter_weight_that_fits_no_layer_stops_the_merge(runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs("lora"), broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if ".layers.0." in k and "lora_A" in k)
    tensors[key.replace(".layers.0.", ".layers.7.")] = tensors.pop(key)
    save_file(tensors, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"do not match.*layers\.7\."):
        merge(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merged_processor_serves_with_the_training_pixel_budgets(tmp_path):
    """Budgets set for training are written into the processor that the merged folder ships."""
    run = train_run(tmp_path / "run", "lora", "qwen2_vl", "--image_max_pixels", str(32 * 28 * 28), "--fps", "1.0")
    merge(run, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "processor_config.json").read_text())
    assert config["image_processor"]["size"]["longest_edge"] == 32 * 28 * 28
    assert config["video_processor"]["fps"] == 1.0
    assert json.loads((run / RUN_FILE).read_text())["budget"] == {"image_max_pixels": 32 * 28 * 28, "fps": 1.0}


def test_a_qlora_run_says_what_merging_into_full_precision_means(runs, tmp_path, caplog, pipeline, monkeypatch):
    """A run trained on a 4-bit base (as vlmtune_run.json records): merge says the adapters go into weights they
    never saw, and compares the merged model with the quantized base + adapters, computed here with
    transformers' BitsAndBytesConfig and PEFT alone; without bitsandbytes it says why it cannot."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    qlora = tmp_path / "qlora"
    shutil.copytree(runs("lora"), qlora)
    info = json.loads((qlora / RUN_FILE).read_text())
    (qlora / RUN_FILE).write_text(json.dumps({**info, "bits": 4}))
    with caplog.at_level("WARNING", logger="vlmtune"):
        result = merge(qlora, tmp_path / "merged")
    said = [r.getMessage() for r in caplog.records]
    assert any("on a 4-bit (nf4) quantization of the base model's language model (QLoRA). The merge adds them to "
               "the full-precision base weights (float32), which the adapters never saw" in m for m in said), said
    quantized = AutoModelForImageTextToText.from_pretrained(info["base_model"], dtype=torch.float32,
                                                            quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["model.visual", "lm_head"]))
    quantized = PeftModel.from_pretrained(quantized, qlora).eval()
    merged = AutoModelForImageTextToText.from_pretrained(result.output_dir).eval()
    p = pipeline("qwen2_vl")
    batch, _ = verification_batch(p.processor, p.family, p.budget)  # the records merge verifies on
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = float((merged(**batch).logits[mask] - quantized(**batch).logits[mask]).abs().max())
    assert expected > 1e-3  # 4-bit rounding shows
    assert result.diffs["vs_quantized"] == pytest.approx(expected, rel=1e-3)
    assert any(m.startswith("against the quantized base + adapters (what training ran): max |logits diff| ")
               for m in said)

    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlmtune"):
        result = merge(qlora, tmp_path / "merged2")
    assert "vs_quantized" not in result.diffs
    assert ("not compared with the quantized base + adapters: bitsandbytes is not installed here (pip install "
            "'vlmtune[quant]')") in [r.getMessage() for r in caplog.records]
