"""What vlmtune takes from qwen-vl-utils' and transformers' internals, checked to still be there and to mean
what vlmtune assumes, so an upgrade that changes one fails here, by name, rather than as a wrong token count.

qwen-vl-utils has no public API for video readers, frame rules or budgets: vlmtune/data/media.py registers a
reader in ``VIDEO_READER_BACKENDS``, chooses one through ``FORCE_QWENVL_VIDEO_READER`` (clearing the cache of
``get_video_reader_backend``), and counts tokens before decoding with ``smart_nframes``, ``smart_resize`` and
the per-frame cap of ``fetch_video`` (``resized_frame_size`` restates it). vlmtune/data/dataset.py counts Qwen3-VL's
timestamp tokens with ``Qwen3VLProcessor._calculate_timestamps``. pyproject pins qwen-vl-utils to the tested
release; the equalities of counted and real lengths live in test_media.py and test_conversation.py.

From transformers (and tqdm), the private names vlmtune reads or overrides: vlmtune/data/packing.py's ``RopeIndex``
calls each family's ``*Model.get_rope_index`` unbound, with a stand-in ``self`` that holds only ``config`` and
``get_vision_position_ids``; vlmtune/model/zero3.py saves and restores
``transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref``; the data check tokenizes through the fast
tokenizer's backend ``tokenizer._tokenizer``; model/packing.py reads ``config._attn_implementation``; memory's
shapes build models with ``_from_config``; the stages override the Trainer's private ``_save``,
``_save_checkpoint``, ``_get_output_dir``, ``_load_from_checkpoint``, ``_get_train_sampler`` and
``_get_eval_sampler`` (an override of a renamed method would silently never run); cli.py closes
``tqdm._instances``. (argparse's ``parser._actions``, read by config.py, is the standard library's.)

From DeepSpeed, what the end of a distributed run empties so that no process group outlives it
(vlmtune/stages/fit.py, vlmtune/model/sequence_parallel.py): ZeRO-3's ``FWD_MODULE_STACK``, the class-wide cache of
``PartitionedParameterCoordinator.__params_to_release``, and Ulysses' table
``deepspeed.sequence.layer._all_to_all_groups``.
"""

from __future__ import annotations

import inspect
import io
import sys

import pytest
import torch
from conftest import EXAMPLES, PACKABLE_FAMILIES
from qwen_vl_utils import vision_process as qvu

from vlmtune.data import media

VIDEO = EXAMPLES / "videos" / "ball_right.mp4"


def test_qwen_vl_utils_globals_vlmtune_uses_are_there():
    missing = [name for name in ("VIDEO_READER_BACKENDS", "FORCE_QWENVL_VIDEO_READER", "get_video_reader_backend",
                                 "smart_nframes", "smart_resize", "calculate_video_frame_range", "fetch_video",
                                 "fetch_image", "FRAME_FACTOR", "FPS", "VIDEO_MAX_TOKEN_NUM", "MODEL_SEQ_LEN")
               if not hasattr(qvu, name)]
    assert not missing, f"qwen-vl-utils no longer has {missing}: vlmtune/data/media.py uses them"
    assert callable(qvu.VIDEO_READER_BACKENDS["pyav"]), "vlmtune's PyAV reader is not registered"
    assert hasattr(qvu.get_video_reader_backend, "cache_clear"), "the reader choice is no longer cached"
    # the constants the token counts are computed with
    assert (qvu.FRAME_FACTOR, qvu.FPS, qvu.VIDEO_MAX_TOKEN_NUM) == (2, 2.0, 768)


def test_the_reader_is_chosen_through_the_module_global(monkeypatch):
    monkeypatch.setattr(qvu, "FORCE_QWENVL_VIDEO_READER", "pyav")
    qvu.get_video_reader_backend.cache_clear()
    try:
        assert qvu.get_video_reader_backend() == "pyav"
    finally:
        qvu.get_video_reader_backend.cache_clear()


@pytest.mark.parametrize("model_seq_len", [qvu.MODEL_SEQ_LEN, 20])
def test_the_per_frame_cap_vlmtune_restates_is_fetch_videos(monkeypatch, model_seq_len):
    """With qwen-vl-utils' default total budget, and with one small enough that the total binds."""
    monkeypatch.setattr(qvu, "MODEL_SEQ_LEN", model_seq_len)
    budget = media.MediaBudget(factor=28, fps=8.0, video_min_frames=4, video_min_pixels=1 * 28 * 28,
                               video_max_pixels=64 * 28 * 28)
    info = media.video_info(VIDEO)
    frames, _ = media.load_video(VIDEO, budget)  # qwen-vl-utils' fetch_video
    assert tuple(frames.shape[2:]) == media.resized_frame_size(info, frames.shape[0], budget)
    if model_seq_len == 20:  # the total budget binds: 20 x 28 x 28 x 0.9 pixels over 16 frames, x 2
        assert tuple(frames.shape[2:]) == (28, 28)


def test_qwen3_vl_timestamps_are_the_rule_vlmtune_counts_with():
    from transformers import Qwen3VLProcessor

    assert hasattr(Qwen3VLProcessor, "_calculate_timestamps"), (
        "transformers removed Qwen3VLProcessor._calculate_timestamps, which vlmtune/data/dataset.py calls to count "
        "a video's timestamp tokens without decoding it")
    # the mean time of each pair of frames; an odd count repeats the last frame
    assert Qwen3VLProcessor._calculate_timestamps(None, [0, 4, 8, 12, 16], 8.0, 2) == [0.25, 1.25, 2.0]
    assert torch.tensor(Qwen3VLProcessor._calculate_timestamps(None, [0, 1, 2, 3], 2.0, 2)).tolist() == [0.25, 1.25]


def _base_model_class(config):
    """The family's ``*Model`` class, found as vlmtune/data/packing.py finds it."""
    from vlmtune.families import family_for

    cls = family_for(config).model_cls()
    return getattr(sys.modules[cls.__module__], cls.__name__.replace("ForConditionalGeneration", "Model"))


@pytest.mark.parametrize("family", PACKABLE_FAMILIES)
def test_get_rope_index_needs_only_the_config_and_get_vision_position_ids(pipeline, family):
    """The call RopeIndex makes: unbound, on a stand-in that has only ``config`` and ``get_vision_position_ids``,
    with these keywords; its positions equal those of the model's own bound method."""
    p = pipeline(family)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(p.model_dir)
    base = _base_model_class(config)
    params = inspect.signature(base.get_rope_index).parameters
    keywords = {"input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask"}
    assert keywords <= set(params), f"{base.__name__}.get_rope_index no longer takes {keywords - set(params)}"
    assert any(v.kind is v.VAR_KEYWORD for v in params.values()) or "second_per_grid_ts" in params
    assert callable(getattr(base, "get_vision_position_ids", None)), f"{base.__name__}.get_vision_position_ids is gone"

    class OnlyConfig:
        def __init__(self):
            self.config = config

        def get_vision_position_ids(self, *args, **kwargs):
            return base.get_vision_position_ids(self, *args, **kwargs)

        def __getattr__(self, name):
            raise AssertionError(f"{base.__name__}.get_rope_index reads self.{name}, which RopeIndex does not give it")

    torch.manual_seed(0)
    model = base(config).eval()
    for shape in ("image", "video", "image+video", "text"):
        item = next(p.dataset[i] for i, r in enumerate(p.dataset.records) if r.shape == shape)
        kwargs = dict(input_ids=item["input_ids"][None], mm_token_type_ids=item["mm_token_type_ids"][None],
                      image_grid_thw=item.get("image_grid_thw"), video_grid_thw=item.get("video_grid_thw"),
                      attention_mask=None)
        if "second_per_grid_ts" in item:
            kwargs["second_per_grid_ts"] = item["second_per_grid_ts"]
        got, _ = base.get_rope_index(OnlyConfig(), **kwargs)
        want, _ = model.get_rope_index(**kwargs)
        assert torch.equal(got, want), (family, shape)


def test_the_deepspeed_config_global_zero3_reads_is_where_vlmtune_saves_it():
    from transformers.integrations import deepspeed as hf_deepspeed

    class Zero3:
        config: dict = {}

        def is_zero3(self):
            return True

    assert hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref"), (
        "transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref is gone: vlmtune/model/zero3.py saves "
        "and restores it around whole-weight model builds")
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = Zero3()
    try:
        hf_deepspeed.set_hf_deepspeed_config(config)
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        kept = hf_deepspeed._hf_deepspeed_config_weak_ref
        hf_deepspeed.unset_hf_deepspeed_config()
        assert not hf_deepspeed.is_deepspeed_zero3_enabled()
        hf_deepspeed._hf_deepspeed_config_weak_ref = kept  # what whole_weights() does on the way out
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def test_the_fast_tokenizer_backend_the_data_check_calls(pipeline):
    tokenizer = pipeline("qwen2_vl").processor.tokenizer
    backend = tokenizer._tokenizer
    for name in ("encode_batch_fast", "padding", "no_padding", "truncation", "no_truncation"):
        assert hasattr(backend, name), f"the tokenizer backend has no {name}: vlmtune/data/conversation.py uses it"
    texts = ["a red circle", "<|im_start|>user\nhi<|im_end|>"]
    tokenizer(texts, padding=True)  # leaves padding on in the backend, which the data check turns off
    backend.no_padding()
    backend.no_truncation()
    ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    assert ids == tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_the_attention_kernel_is_read_from_the_config(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("qwen2_vl"), attn_implementation="sdpa")
    assert config._attn_implementation == "sdpa"


def test_the_model_classes_build_from_a_config_on_the_meta_device(tiny_model_dir):
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_model_dir("qwen2_vl"))
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration._from_config(config)
    assert next(model.parameters()).device.type == "meta"


@pytest.mark.parametrize(("name", "arguments"), [
    ("_save", ["output_dir", "state_dict"]), ("_save_checkpoint", ["model", "trial"]),
    ("_get_output_dir", ["trial"]), ("_load_from_checkpoint", ["resume_from_checkpoint", "model"]),
    ("_get_train_sampler", ["train_dataset"]), ("_get_eval_sampler", ["eval_dataset"]),
    ("_save_optimizer_and_scheduler", ["output_dir"]),
])
def test_the_trainer_methods_vlmtune_overrides_are_there(name, arguments):
    from transformers import Trainer

    method = getattr(Trainer, name, None)
    assert callable(method), f"Trainer.{name} is gone: vlmtune's override of it would never run"
    assert list(inspect.signature(method).parameters)[1:] == arguments, f"Trainer.{name} takes other arguments"


def test_tqdm_keeps_its_live_bars_where_the_cli_closes_them():
    from tqdm import tqdm

    bar = tqdm(total=2, file=io.StringIO())
    try:
        assert bar in list(tqdm._instances)
    finally:
        bar.close()
    assert bar not in list(tqdm._instances)


def test_the_trainer_and_trl_internals_the_stages_build_on():
    """vlmtune/stages/trainer.py and policy.py override these Trainer internals (a rename upstream would bypass
    the atomic checkpoints, the trainable-only saving or the length grouping silently rather than fail), and
    reference.py / grpo.py call these TRL utilities."""
    import inspect

    from torch import nn
    from transformers import Trainer, TrainerState

    missing = [name for name in ("_save_checkpoint", "_get_output_dir", "_save", "_load_from_checkpoint",
                                 "_get_train_sampler", "_get_eval_sampler", "_prepare_inputs",
                                 "compute_loss_context_manager", "get_optimizer_cls_and_kwargs")
               if not callable(getattr(Trainer, name, None))]
    assert not missing, f"transformers' Trainer no longer has {missing}: vlmtune/stages/trainer.py overrides them"
    source = inspect.getsource(Trainer)
    for flag in ("model_accepts_loss_kwargs", "loss_is_scaled_for_ga"):  # PolicyTrainer sets both to False
        assert f"self.{flag}" in source, f"the Trainer no longer reads {flag}"
    # tokens/s sums every rank's counts inside log(): every process must call log() with the training loss
    step_log = inspect.getsource(Trainer._maybe_log_save_evaluate)
    assert "self.log(logs" in step_log and "is_world_process_zero" not in step_log
    assert "num_input_tokens_seen" in TrainerState.__dataclass_fields__

    from trl.models.utils import prepare_deepspeed, unwrap_model_for_generation
    from trl.trainer import utils

    assert callable(prepare_deepspeed) and callable(unwrap_model_for_generation)
    assert callable(utils.add_fused_lm_head) and callable(utils.RepeatSampler)
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.3), nn.Sequential(nn.Dropout(0.1)))
    utils.disable_dropout_in_model(model)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0, 0]


def test_the_deepspeed_holders_the_end_of_a_run_empties_are_there():
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.sequence import layer

    assert isinstance(parameter_offload.FWD_MODULE_STACK, list), (
        "deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK is gone or no list: vlmtune/stages/fit.py "
        "empties it")
    cached = parameter_offload.PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
    assert any(hasattr(cell.cell_contents, "cache_clear") for cell in cached.__closure__ or ()), (
        "PartitionedParameterCoordinator.__params_to_release has no lru_cache under its wrapper any more: "
        "vlmtune/stages/fit.py clears it")
    assert isinstance(layer._all_to_all_groups, dict), (
        "deepspeed.sequence.layer._all_to_all_groups is gone: vlmtune/model/sequence_parallel.py forgets its "
        "group there")


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "adagrad", "sgd", "adafactor", "rmsprop"])
def test_which_optimizers_survive_deepspeeds_optimizer_offload(monkeypatch, tmp_path, optim):
    """With ``offload_optimizer``, accelerate swaps the Trainer's optimizer for a DeepSpeed CPU optimizer
    (``map_pytorch_optim_to_deepspeed``). vlmtune/stages/setup.py lets through only ``OFFLOAD_OPTIMIZERS``: those
    accelerate maps to their own CPU twin with arguments the twin takes (AdamW: CPU Adam in AdamW mode). The rest
    become CPU Adam, or (Adagrad) fail with an argument CPU Adagrad does not take. The CPU optimizers are stood in
    for (building their ops takes minutes)."""
    from accelerate.utils.deepspeed import map_pytorch_optim_to_deepspeed
    from deepspeed.ops import adagrad, adam
    from transformers import Trainer, TrainingArguments

    from vlmtune.stages.setup import OFFLOAD_OPTIMIZERS

    real = {"DeepSpeedCPUAdam": adam.DeepSpeedCPUAdam, "DeepSpeedCPUAdagrad": adagrad.DeepSpeedCPUAdagrad}
    made = []
    for module, name in ((adam, "DeepSpeedCPUAdam"), (adagrad, "DeepSpeedCPUAdagrad")):
        monkeypatch.setattr(module, name, lambda groups, _name=name, **kw: made.append((_name, kw)))
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(tmp_path, optim=optim, use_cpu=True))
    map_pytorch_optim_to_deepspeed(cls([torch.nn.Parameter(torch.zeros(2))], **kwargs))
    (name, kw), = made
    try:
        inspect.signature(real[name]).bind([], **kw)
        takes = True
    except TypeError:
        takes = False
    twin = {torch.optim.AdamW: ("DeepSpeedCPUAdam", True), torch.optim.Adagrad: ("DeepSpeedCPUAdagrad", None)}
    faithful = takes and twin.get(cls) == (name, kw.get("adamw_mode") if name == "DeepSpeedCPUAdam" else None)
    assert faithful == (optim in OFFLOAD_OPTIMIZERS), (optim, cls, name, kw, takes)
