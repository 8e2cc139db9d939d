"""What vlmtune takes from qwen-vl-utils' and transformers' internals, checked to still be there and to mean
what vlmtune assumes, so an upgrade that changes one fails here, by name, rather than as a wrong token count.

qwen-vl-utils has no public API for video readers, frame rules or budgets: vlmtune/data/media.py registers a
reader in ``VIDEO_READER_BACKENDS``, chooses one through ``FORCE_QWENVL_VIDEO_READER`` (clearing the cache of
``get_video_reader_backend``), and counts tokens before decoding with ``smart_nframes``, ``smart_resize`` and
the per-frame cap of ``fetch_video`` (``resized_frame_size`` restates it). vlmtune/data/dataset.py counts Qwen3-VL's
timestamp tokens with ``Qwen3VLProcessor._calculate_timestamps``. pyproject pins qwen-vl-utils to the tested
release; the equalities of counted and real lengths live in test_media.py and test_conversation.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLES
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
