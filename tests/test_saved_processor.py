"""What training saw is what serving sees: the processor saved with a run and with its merged folder, reloaded
with plain ``AutoProcessor`` and used through the Qwen-VL inference recipe (qwen-vl-utils' ``process_vision_info``,
then the processor), gives the input ids and pixels the training items had, for every family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DATA_JSON, EXAMPLES
from qwen_vl_utils import process_vision_info
from test_conversation import RAW, reference_messages
from test_merge import train_run

from vlmtune.families import FAMILIES

RECORDS = {"image": "single_red_circle", "video": "video_ball_right"}
LEGACY = {"preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json"}


def budget_flags(family: str) -> list[str]:
    """Budgets unlike the tiny model's own, in patches of the family's grid, whose caps shrink the 96 x 72 images
    and 64 x 48 video frames of data_examples/; one family samples frames by count, the others by rate."""
    f2 = FAMILIES[family].factor ** 2
    flags = ["--image_min_pixels", str(2 * f2), "--image_max_pixels", str(4 * f2), "--video_min_pixels",
             str(1 * f2), "--video_max_pixels", str(2 * f2)]
    if family == "qwen2_vl":
        return flags + ["--nframes", "6"]
    return flags + ["--fps", "4.0", "--video_min_frames", "2", "--video_max_frames", "6"]


def with_legacy_files(base: Path, out: Path) -> Path:
    """A copy of a base model in the layout of older releases: separate image / video processor configs and a
    chat_template.json (transformers 5.22 prefers a chat_template.json to the chat_template.jinja it writes)."""
    from transformers import AutoProcessor

    shutil.copytree(base, out)
    processor = AutoProcessor.from_pretrained(base)
    for name in ("processor_config.json", "chat_template.jinja"):
        (out / name).unlink()
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json
    processor.video_processor.save_pretrained(out)  # video_preprocessor_config.json
    (out / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    assert LEGACY <= {p.name for p in out.iterdir()}
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir):
    """family -> (base, run folder, merged folder): one training step with budgets of its own, merged."""
    from vlmtune.merge import merge

    root = tmp_path_factory.mktemp("saved-processor")
    made = {}

    def get(family: str):
        if family not in made:
            base = with_legacy_files(tiny_model_dir(family), root / f"{family}-base")
            run = train_run(root / family, "lora", family, "--model_name_or_path", str(base), *budget_flags(family))
            made[family] = base, run, merge(run, root / f"{family}-merged").output_dir
        return made[family]

    return get


def training_items(base: Path, family: str) -> dict[str, dict]:
    """The items training built for the two records (the dataset of `vlmtune train`, same flags)."""
    from vlmtune.config import parse_train_args
    from vlmtune.data import media
    from vlmtune.data.conversation import Conversation
    from vlmtune.data.dataset import VisionLanguageDataset
    from vlmtune.data.records import load_records
    from vlmtune.model.load import load_processor

    data_args = parse_train_args(["--data_path", str(DATA_JSON), *budget_flags(family)])[1]
    processor = load_processor(str(base))
    budget = media.budget_from_processor(processor, FAMILIES[family].factor, **data_args.budget_overrides())
    records = {r.id: r for r in load_records(DATA_JSON, EXAMPLES, budget=budget,
                                             min_image_side=FAMILIES[family].factor)}
    dataset = VisionLanguageDataset([records[i] for i in RECORDS.values()], processor, FAMILIES[family], budget,
                                    Conversation(processor))
    return {kind: dataset[i] for i, kind in enumerate(RECORDS)}


def recipe_budget(processor) -> SimpleNamespace:
    """The budgets a served folder states, read from its processor as transformers defines the fields:
    images ``size`` per image; videos ``size`` per frame (Qwen2-VL, Qwen2.5-VL), or (Qwen3-VL, whose
    ``size["longest_edge"]`` is a total over frames) a per-frame cap of ``max_video_tokens`` patches."""
    from transformers import Qwen3VLVideoProcessor

    image, video = processor.image_processor, processor.video_processor
    factor = image.patch_size * image.merge_size
    per_frame = (video.max_video_tokens * factor**2 if isinstance(video, Qwen3VLVideoProcessor)
                 else video.size.longest_edge)
    return SimpleNamespace(image_min_pixels=image.size.shortest_edge, image_max_pixels=image.size.longest_edge,
                           video_min_pixels=video.size.shortest_edge, video_max_pixels=per_frame, fps=video.fps,
                           nframes=video.num_frames, video_min_frames=video.min_frames,
                           video_max_frames=video.max_frames)


def served_inputs(folder: Path, kind: str, patch_size: int) -> dict:
    """The Qwen-VL model cards' recipe on a served folder, with nothing from vlmtune."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    budget = recipe_budget(processor)
    raw = next(r for r in RAW if r["id"] == RECORDS[kind])
    messages = reference_messages(raw, budget)
    for part in (p for m in messages for p in m["content"] if p.get("type") == "video" and budget.nframes):
        for key in ("fps", "min_frames", "max_frames"):
            part.pop(key)
        part["nframes"] = budget.nframes
    text = processor.apply_chat_template(messages, tokenize=False)
    images, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True,
                                                       return_video_metadata=True, image_patch_size=patch_size)
    metadata = None
    if videos:
        videos, metadata = map(list, zip(*videos))
    return processor(text=[text], images=images, videos=videos, video_metadata=metadata, return_tensors="pt",
                     do_resize=False, **video_kwargs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_reloaded_run_and_merged_folder_give_the_training_ids_and_pixels(saved, family):
    base, run, merged = saved(family)
    items = training_items(base, family)
    for folder in (run, merged):
        for kind, item in items.items():
            served = served_inputs(folder, kind, FAMILIES[family].patch_size)
            where = f"{family} {folder.name} {kind}"
            assert item["input_ids"].tolist() == served["input_ids"][0].tolist(), where
            for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
                assert (key in item) == (key in served), (where, key)
                if key in item:
                    torch.testing.assert_close(item[key], served[key], msg=f"{where} {key}")
    assert not LEGACY & {p.name for p in merged.iterdir()}  # no stale base file beside the new processor


def test_the_budgets_no_processor_field_holds_come_from_vlmtune_run_json(tmp_path, tiny_model_dir):
    """A fixed image size (--image_resized_*) has no field in the processor: the merged folder's processor holds
    the same area, vlmtune_run.json the size, and `vlmtune predict` on the merged folder applies it exactly."""
    from vlmtune.merge import merge
    from vlmtune.run import RUN_FILE, load_for_inference

    run = train_run(tmp_path / "run", "lora", "qwen2_vl", "--image_resized_width", "100", "--image_resized_height",
                    "60")
    merged = merge(run, tmp_path / "merged").output_dir
    size = json.loads((merged / "processor_config.json").read_text())["image_processor"]["size"]
    assert size == {"shortest_edge": 56 * 112, "longest_edge": 56 * 112}  # 60 x 100 rounded to the 28-pixel grid
    assert json.loads((merged / RUN_FILE).read_text())["budget"] == {"image_resized_height": 60,
                                                                      "image_resized_width": 100}
    budget = load_for_inference(str(merged)).budget
    assert (budget.image_resized_height, budget.image_resized_width) == (60, 100)
    from vlmtune.data import media

    assert media.resized_image_size(640, 480, budget) == (56, 112)


def test_qwen3_vl_video_size_is_a_total_over_frames_and_qwen2_vl_per_frame():
    """What the installed transformers does with ``size["longest_edge"]`` for videos: Qwen3-VL's processor
    reads it as the pixels of all frames together, Qwen2-VL's as the pixels of each frame. (vlmtune writes a
    Qwen3-VL run's per-frame cap into ``max_video_tokens`` and the total qwen-vl-utils allows into ``size``.)"""
    from transformers import Qwen2VLVideoProcessor, Qwen3VLVideoProcessor

    frames = torch.full((8, 3, 256, 256), 128, dtype=torch.uint8)
    for cls, factor in ((Qwen3VLVideoProcessor, 32), (Qwen2VLVideoProcessor, 28)):
        cap = 16 * factor**2
        processor = cls(size={"shortest_edge": factor**2, "longest_edge": cap}, cap_pixels_per_frame=False)
        t, h, w = processor(videos=[frames], do_sample_frames=False, return_tensors="pt")["video_grid_thw"][0].tolist()
        per_frame = h * w * processor.patch_size**2
        if cls is Qwen3VLVideoProcessor:
            assert 8 * per_frame <= cap < 8 * 16 * factor**2  # all 8 frames together fit the cap
        else:
            assert cap / 2 < per_frame <= cap  # each frame fits the cap on its own
        assert t == 4


class _Loaded(Exception):
    """Raised by a stand-in for ``load_predictor``: the command got as far as loading the model."""


@pytest.mark.parametrize("command", ["predict", "evaluate", "sample"])
def test_inference_commands_pass_the_budget_flags_to_the_model_loader(command, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    """predict, eval and sample take train's budget flags and hand every one of them (None where not given) to the
    loader, which applies them over the model's saved budgets."""
    import importlib

    module = importlib.import_module(f"vlmtune.{command}")
    seen = {}

    def loader(*args, budget_overrides, **kwargs):
        seen.update(budget_overrides)
        raise _Loaded

    monkeypatch.setattr(module, "load_predictor", loader)
    model = str(tiny_model_dir("qwen2_vl"))
    argv = {"predict": ["--model", model, "--prompt", "Say hello."],
            "evaluate": ["--model", model, "--data", str(DATA_JSON), "--image_folder", str(EXAMPLES),
                         "--video_folder", str(EXAMPLES), "--output_dir", str(tmp_path / "eval")],
            "sample": ["--model", model, "--data", str(DATA_JSON), "--image_folder", str(EXAMPLES),
                       "--video_folder", str(EXAMPLES), "--reward_funcs", "exact_match",
                       "--output", str(tmp_path / "sampled.json")]}[command]
    with pytest.raises(_Loaded):
        module.main(argv + budget_flags("qwen2_vl"))
    f2 = FAMILIES["qwen2_vl"].factor ** 2
    assert seen == {"image_min_pixels": 2 * f2, "image_max_pixels": 4 * f2, "video_min_pixels": f2,
                    "video_max_pixels": 2 * f2, "nframes": 6, "fps": None, "image_resized_height": None,
                    "image_resized_width": None, "video_min_frames": None, "video_max_frames": None}
