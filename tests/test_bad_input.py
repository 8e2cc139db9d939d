"""Bad input on every command: one line naming the file / key / flag / record and what is wrong, exit 1, and,
where the input can be checked first, no model loaded (``PreTrainedModel.from_pretrained`` is watched)."""

from __future__ import annotations

import json

import pytest
from conftest import DATA_JSON, EXAMPLES

from vlmtune.cli import main

PREFS = EXAMPLES / "preference.json"
GRPO = EXAMPLES / "grpo.json"
IMAGE = EXAMPLES / "images" / "red_circle.png"


@pytest.fixture
def loads(monkeypatch):
    """Every model load attempted during the test (each one fails, so a test that reaches one stops there)."""
    from transformers import PreTrainedModel

    calls: list[str] = []

    def watched(cls, path, *args, **kwargs):
        calls.append(str(path))
        raise RuntimeError(f"a model was loaded from {path}")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(watched))
    return calls


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Run ``vlmtune ARGV``: exit 1 and a last line ``vlmtune CMD: error: ...`` holding every needle, not the
    catch-all of bugs."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1] if err else ""
    assert code == 1, err
    assert line.startswith(f"vlmtune {argv[0]}: error: ") and "unexpected" not in line, err
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vlmtune.testing.tiny import tiny_model_path

    return tiny_model_path("qwen2_vl")


@pytest.fixture
def broken_run(tmp_path, tiny):
    """A LoRA run folder whose adapter_model.safetensors was deleted."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(tiny)}))
    (run / "vlmtune_run.json").write_text(json.dumps({"stage": "sft", "base_model": str(tiny)}))
    return run


@pytest.fixture
def not_a_model(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    return folder


def train_argv(tmp_path, *extra: str) -> list[str]:
    return ["train", "--data_path", str(DATA_JSON), "--output_dir", str(tmp_path / "out"), "--use_cpu", "True",
            "--report_to", "none", *extra]


# ---------------------------------------------------------------- YAML config files (train, dpo, grpo)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys, loads):
    config = tmp_path / "run.yaml"
    config.write_text(f"data_path: {DATA_JSON}\nlora_rank: 8\nlearning_rate: [1.0e-4, 2.0e-4\n")
    fails(capsys, ["train", str(config)], str(config), "line 4", "invalid YAML")
    assert loads == []


def test_yaml_list_for_a_single_value_names_the_key_and_type(tmp_path, capsys, loads):
    config = tmp_path / "run.yaml"
    config.write_text(f"data_path: {DATA_JSON}\nlearning_rate: [1.0e-4, 2.0e-4]\n")
    fails(capsys, ["train", str(config)], str(config), "learning_rate", "expected a number", "got a list")


def test_yaml_value_of_the_wrong_type_names_the_key(tmp_path, capsys, loads):
    config = tmp_path / "run.yaml"
    config.write_text(f"data_path: {DATA_JSON}\nlora_rank: sixteen\nmode: lora\n")
    fails(capsys, ["train", str(config)], str(config), "lora_rank", "expected an integer", "'sixteen'")


def test_yaml_value_outside_the_choices_names_the_key(tmp_path, capsys, loads):
    config = tmp_path / "run.yaml"
    config.write_text(f"data_path: {DATA_JSON}\nmode: lora_everything\n")
    fails(capsys, ["dpo", str(config)], str(config), "mode", "one of full, lora, lora_vision")


def test_yaml_unknown_key_names_the_file_and_the_closest_option(tmp_path, capsys, loads):
    config = tmp_path / "run.yaml"
    config.write_text(f"data_path: {DATA_JSON}\nlearning_rat: 0.001\n")
    fails(capsys, ["train", str(config)], str(config), "--learning_rat", "did you mean --learning_rate?")


def test_missing_yaml_file_is_named(tmp_path, capsys, loads):
    fails(capsys, ["grpo", str(tmp_path / "nothere.yaml")], "nothere.yaml", "does not exist")


# ---------------------------------------------------------------- training flags (train, dpo, grpo)


def test_load_best_model_at_end_without_an_eval_split_is_one_line(tmp_path, capsys, loads):
    fails(capsys, train_argv(tmp_path, "--load_best_model_at_end", "True"), "--load_best_model_at_end",
          "eval split", "--val_ratio")


def test_eval_strategy_without_an_eval_split_is_one_line(tmp_path, capsys, loads):
    fails(capsys, train_argv(tmp_path, "--eval_strategy", "steps"), "--eval_strategy", "--eval_data_path")


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--learning_rate", "nan", "must be a finite number"),
    ("--lora_dropout", "1.5", "must be in [0, 1)"),
    ("--vision_lr", "-0.5", "must be 0 or more"),
    ("--fps", "inf", "must be a finite number"),
])
def test_train_numbers_out_of_range_name_the_flag(tmp_path, capsys, loads, flag, value, says):
    fails(capsys, train_argv(tmp_path, f"{flag}={value}"), f"{flag} {says}", value)


def test_train_missing_data_file_fails_before_anything_loads(tmp_path, capsys, loads):
    argv = train_argv(tmp_path)
    argv[2] = str(tmp_path / "gone.json")
    fails(capsys, argv, "--data_path", "gone.json", "does not exist")
    assert loads == []


def test_train_on_a_folder_that_is_not_a_model(tmp_path, capsys, loads, not_a_model):
    fails(capsys, train_argv(tmp_path, "--model_name_or_path", str(not_a_model)), str(not_a_model),
          "not a model folder (no config.json)")
    assert loads == []


def test_dpo_beta_zero_names_the_flag(tmp_path, capsys, loads):
    fails(capsys, ["dpo", "--data_path", str(PREFS), "--output_dir", str(tmp_path), "--beta", "0"],
          "--beta must be positive")


def test_grpo_nan_reward_weight_names_the_flag(tmp_path, capsys, loads):
    fails(capsys, ["grpo", "--data_path", str(GRPO), "--output_dir", str(tmp_path), "--reward_funcs",
                   "exact_match", "format", "--reward_weights", "1", "nan"], "--reward_weights", "finite", "nan")
    assert loads == []


def test_grpo_top_p_out_of_range_names_the_flag(tmp_path, capsys, loads):
    fails(capsys, ["grpo", "--data_path", str(GRPO), "--output_dir", str(tmp_path), "--top_p", "1.5"],
          "--top_p must be in (0, 1]")


def test_grpo_reward_file_without_the_function_fails_before_the_model(tmp_path, capsys, loads):
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def length(completions, **kw):\n    return [len(c) for c in completions]\n")
    fails(capsys, ["grpo", "--data_path", str(GRPO), "--output_dir", str(tmp_path / "out"), "--use_cpu", "True",
                   "--reward_funcs", f"{rewards}:score"], "--reward_funcs", "no function 'score'", "length")
    assert loads == []


# ---------------------------------------------------------------- run folders (merge, predict, eval, resume)


def test_merge_names_the_missing_adapter_file_and_the_run(tmp_path, capsys, loads, broken_run):
    fails(capsys, ["merge", str(broken_run), str(tmp_path / "merged")], str(broken_run),
          "lacks adapter_model.safetensors")
    assert loads == []


def test_merge_on_a_missing_run_folder(tmp_path, capsys, loads):
    fails(capsys, ["merge", str(tmp_path / "nothing"), str(tmp_path / "merged")], "nothing", "does not exist")


def test_merge_missing_verification_data_fails_before_the_model(tmp_path, capsys, loads, broken_run):
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(broken_run / "adapter_model.safetensors"))
    fails(capsys, ["merge", str(broken_run), str(tmp_path / "merged"), "--data_path", str(tmp_path / "v.json")],
          "--data_path", "v.json", "does not exist")
    assert loads == []


def test_predict_on_a_folder_that_is_not_a_model(capsys, loads, not_a_model):
    fails(capsys, ["predict", "--model", str(not_a_model), "--prompt", "hi"], f"--model {not_a_model}",
          "not a model folder")
    assert loads == []


def test_predict_on_a_run_without_its_adapter_weights(capsys, loads, broken_run):
    fails(capsys, ["predict", "--model", str(broken_run), "--prompt", "hi"], str(broken_run),
          "adapter_model.safetensors")
    assert loads == []


def test_predict_missing_image_fails_before_the_model(tmp_path, capsys, loads, tiny):
    fails(capsys, ["predict", "--model", str(tiny), "--prompt", "what is it?", "--image", str(tmp_path / "x.png")],
          "--image", "x.png", "does not exist")
    assert loads == []


def test_predict_missing_data_file_fails_before_the_model(tmp_path, capsys, loads, tiny):
    fails(capsys, ["predict", "--model", str(tiny), "--data", str(tmp_path / "d.json")], "--data", "d.json",
          "does not exist")
    assert loads == []


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--max_new_tokens", "0", "must be at least 1"),
    ("--temperature", "-1", "must be 0 or more"),
    ("--image_max_pixels", "0", "must be at least 1"),
])
def test_predict_numbers_out_of_range_name_the_flag(capsys, loads, tiny, flag, value, says):
    fails(capsys, ["predict", "--model", str(tiny), "--prompt", "hi", f"{flag}={value}"], f"{flag} {says}")
    assert loads == []


def test_eval_missing_data_file_fails_before_the_model(tmp_path, capsys, loads, tiny):
    fails(capsys, ["eval", "--model", str(tiny), "--data", str(tmp_path / "gone.json"), "--output_dir",
                   str(tmp_path / "e")], "--data", "gone.json", "does not exist")
    assert loads == []


def test_eval_compare_that_is_not_a_model_fails_before_the_first_model(tmp_path, capsys, loads, tiny, not_a_model):
    fails(capsys, ["eval", "--model", str(tiny), "--compare", str(not_a_model), "--data", str(DATA_JSON),
                   "--output_dir", str(tmp_path / "e")], f"--compare {not_a_model}", "not a model folder")
    assert loads == []


def test_eval_batch_size_zero_names_the_flag(tmp_path, capsys, loads, tiny):
    fails(capsys, ["eval", "--model", str(tiny), "--data", str(DATA_JSON), "--batch_size", "0"],
          "--batch_size must be at least 1")


def test_resume_from_a_checkpoint_without_weights_names_it(tmp_path, capsys, loads):
    checkpoint = tmp_path / "out" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    fails(capsys, train_argv(tmp_path, "--resume_from_checkpoint", str(checkpoint)), str(checkpoint),
          "no model or adapter weights")
    assert loads == []


# ---------------------------------------------------------------- check-data, plot, estimate-memory, tiny-model


def test_check_data_on_a_model_that_is_not_one(capsys, not_a_model):
    fails(capsys, ["check-data", str(DATA_JSON), "--model", str(not_a_model)], f"--model {not_a_model}")


def test_check_data_missing_file_is_one_line(tmp_path, capsys):
    fails(capsys, ["check-data", str(tmp_path / "d.jsonl"), "--stage", "grpo"], "d.jsonl", "does not exist")


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--max_seq_length", "0", "must be at least 1"),
    ("--processes", "0", "must be at least 1"),
    ("--processes", "-4", "must be at least 1"),
])
def test_check_data_numbers_out_of_range_name_the_flag(capsys, flag, value, says):
    fails(capsys, ["check-data", str(PREFS), "--stage", "dpo", f"{flag}={value}"], f"{flag} {says}")


def test_zero_width_box_is_an_error_naming_the_record(tmp_path, capsys, tiny):
    data = tmp_path / "boxes.json"
    data.write_text(json.dumps([{"id": "flat", "image": str(IMAGE), "box_format": "pixel_original",
                                 "conversations": [{"from": "human", "value": "<image>\nWhere is it?"},
                                                   {"from": "gpt", "value": '{"bbox_2d": [40, 20, 40, 50]}'}]}]))
    code = main(["check-data", str(data), "--model", str(tiny)])
    out = capsys.readouterr().out
    assert code == 1
    assert "record 0 (id 'flat')" in out and "zero width (x1 = x2)" in out, out


def test_plot_output_that_is_a_folder(tmp_path, capsys):
    fails(capsys, ["plot", str(tmp_path), "--output", str(tmp_path)], "--output", "is a folder")


@pytest.mark.parametrize(("argv", "says"), [
    (["tiny:qwen9"], "no tiny 'qwen9' family"),
    (["--lora_dropout", "nan"], "--lora_dropout must be a finite number"),
    (["--images=-1"], "--images must be 0 or more"),
])
def test_estimate_memory_bad_input(capsys, argv, says):
    fails(capsys, ["estimate-memory", *argv], says)


def test_tiny_model_onto_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    fails(capsys, ["tiny-model", str(target)], str(target), "is a file")


# ---------------------------------------------------------------- one declaration of the shared flags


def test_predict_eval_and_check_data_declare_shared_flags_from_the_same_fields(capsys):
    """The shared flags' help, choices and defaults are the dataclass fields' (one declaration)."""
    import dataclasses

    from vlmtune.config import DataArguments, InferenceArguments
    from vlmtune.data.boxes import FORMATS

    fields = {f.name: f for cls in (DataArguments, InferenceArguments) for f in dataclasses.fields(cls)}
    for command, names in (("predict", ("box_format", "image_max_pixels", "batch_size", "model")),
                           ("eval", ("box_format", "fps", "max_new_tokens", "dtype")),
                           ("check-data", ("box_format", "max_seq_length", "label_mode"))):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for name in names:
            first_words = " ".join(fields[name].metadata["help"].split()[:4])
            assert f"--{name}" in text and first_words in text, (command, name)
        assert "{" + ",".join(FORMATS) + "}" in text


def test_a_new_field_gets_the_checks_by_declaring_its_range():
    """What another stage's flags get: a range declared once in the field's metadata, checked from Python, from
    `vlmtune train`-style flags (transformers' parser) and from argparse flags made by add_fields."""
    import argparse
    from dataclasses import dataclass, field

    from vlmtune.errors import ConfigError
    from vlmtune.flags import add_fields, check_fields, dataclass_parser, fields_of, within

    @dataclass
    class NewStageArguments:
        mix: float = field(default=0.5, metadata={"help": "share of the new loss", **within(0, 1)})
        scales: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "one per head"})

        def __post_init__(self):
            check_fields(self)

    with pytest.raises(ConfigError, match=r"--mix must be in \[0, 1\], got 1.5"):
        NewStageArguments(mix=1.5)
    with pytest.raises(ConfigError, match=r"--scales must be a finite number each, got \[1.0, inf\]"):
        dataclass_parser(NewStageArguments).parse_args_into_dataclasses(["--scales", "1", "inf"])
    parser = argparse.ArgumentParser()
    add_fields(parser, NewStageArguments, "mix")
    with pytest.raises(ConfigError, match="--mix must be a finite number, got nan"):
        fields_of(parser.parse_args(["--mix", "nan"]), NewStageArguments, "mix")
