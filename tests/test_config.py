"""Configuration: YAML file + flags, cross-checks, and the evaluation split."""

from __future__ import annotations

import json

import pytest
from conftest import DATA_JSON

from vlmtune.config import DataArguments, parse_train_args
from vlmtune.errors import ConfigError


def test_yaml_gives_defaults_and_flags_override_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "data_path: data.json\nmode: lora_vision\nlora_rank: 16\nlearning_rate: 0.0002\nvision_lr: 0.00002\n"
        "fps: 1.0\ngroup_by_length: true\nuse_cpu: true\noutput_dir: out\n"
    )
    model, data, mode, train = parse_train_args([str(config), "--lora_rank", "32", "--output_dir", "elsewhere"])
    assert (data.data_path, data.fps) == ("data.json", 1.0)
    assert (mode.mode, mode.lora_rank) == ("lora_vision", 32)
    assert train.learning_rate == pytest.approx(2e-4) and train.vision_lr == pytest.approx(2e-5)
    assert train.output_dir == "elsewhere"
    assert train.train_sampling_strategy == "group_by_length"
    assert train.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert model.model_name_or_path is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fps": 1.0, "nframes": 8}, "give one of them"),
    ({"val_ratio": 1.5}, "val_ratio"),
    ({"image_resized_width": 224}, "go together"),
])
def test_data_arguments_cross_checks(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DataArguments(**kwargs)


@pytest.mark.parametrize(("argv", "message"), [
    (["--vison_lr", "1e-5"], "unknown option(s): --vison_lr (did you mean --vision_lr?)"),
    (["--bogus_flag", "1"], "unknown option(s): --bogus_flag; `vlmtune train --help`"),
    (["--output_dir", "out", "stray"], "unexpected argument(s): stray"),
    (["--eval_strategy", "steps", "--load_best_model_at_end", "True", "--save_strategy", "epoch"], "load_best_model"),
])
def test_unknown_flags_and_rejected_settings_are_one_line_errors(argv, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        parse_train_args(["--data_path", "d.json", "--output_dir", str(tmp_path), *argv])
    assert message in str(error.value)


def test_an_unknown_key_in_the_yaml_file_is_named(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"data_path: d.json\noutput_dir: {tmp_path}\nlearning_rat: 0.001\n")
    with pytest.raises(ConfigError, match="--learning_rat "):
        parse_train_args([str(config)])


def test_budget_overrides_cover_every_media_flag():
    fields = {"image_min_pixels", "image_max_pixels", "image_resized_height", "image_resized_width",
              "video_min_pixels", "video_max_pixels", "fps", "nframes", "video_min_frames", "video_max_frames"}
    assert set(DataArguments().budget_overrides()) == fields


@pytest.mark.parametrize("split", [["--val_ratio", "0.25"], ["--eval_data_path", str(DATA_JSON)]])
def test_an_eval_split_reports_eval_loss(tmp_path, split):
    from vlmtune.stages.sft import train

    out = tmp_path / "out"
    args = parse_train_args(["--data_path", str(DATA_JSON), *split, "--output_dir", str(out),
                             "--max_steps", "2", "--use_cpu", "True", "--report_to", "none", "--save_strategy", "no",
                             "--disable_tqdm", "True"])
    train(*args)
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    assert len(evals) == 1 and evals[0] > 0


def test_memory_is_pinned_only_where_a_cuda_device_can_use_it(tmp_path):
    import torch

    *_, train = parse_train_args(["--data_path", "d.json", "--output_dir", str(tmp_path)])
    assert train.dataloader_pin_memory is torch.cuda.is_available()
    *_, train = parse_train_args(["--data_path", "d.json", "--output_dir", str(tmp_path),
                                  "--dataloader_pin_memory", "False"])
    assert train.dataloader_pin_memory is False
