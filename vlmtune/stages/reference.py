"""What DPO and GRPO share: TRL's fused log-probabilities, and the reference policy.

Log-probabilities come from TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``): the model's forward,
called with ``labels`` and ``fused_lm_head=True``, returns the log-probability of each labelled next token,
projected through the LM head in tiles (Triton on CUDA), without the (batch, length, vocabulary) logits.
Without ``fused_lm_head`` the forward is the model's own, so generation and the merge see an unchanged model.

The reference policy is what the run started from:

* a LoRA run: the same model with its adapters switched off (PEFT's ``disable_adapter``), no second copy; parts
  that train fully beside LoRA (the merger of ``lora_vision``, top layers) are swapped back to their starting
  values for the reference forward (a copy of those parts only). Under ZeRO-3 those parts are partitioned and
  cannot be swapped: such runs precompute the reference (DPO) or use ``--beta 0`` (GRPO).
* a full run: a frozen copy loaded beside the policy, which DeepSpeed shards too under ZeRO-3 (TRL's
  ``prepare_deepspeed``).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from vlmtune.errors import ConfigError
from vlmtune.model import modes
from vlmtune.model import sequence_parallel as sp
from vlmtune.model.load import torch_dtype
from vlmtune.stages import shared_prefix, vision_once
from vlmtune.stages.setup import load_policy, load_start_model

logger = logging.getLogger(__name__)

TRL_HINT = "pip install 'vlmtune[rl]' (TRL 1.16+)"


def require_trl(stage: str):
    """TRL's trainer utilities, or a one-line error saying how to install them."""
    try:
        from trl.trainer import utils
    except ImportError as exc:
        raise ConfigError(f"vlmtune {stage} needs TRL ({exc}): {TRL_HINT}") from None
    return utils


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def add_log_prob_head(model: nn.Module, stage: str, temperature: float = 1.0) -> None:
    """Give ``model`` TRL's fused LM head (log-probs under ``temperature``); call before DeepSpeed wraps it."""
    require_trl(stage).add_fused_lm_head(transformers_model(model), temperature=temperature)


MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
              "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "position_ids")


@contextlib.contextmanager
def fitted_fused_head(model: nn.Module):
    """TRL's fused head fitted to this device and to ``model``'s vocabulary, within the context:

    - TRL projects only the labelled positions on Triton devices (CUDA) and every position elsewhere, for a fixed
      tile shape on devices that compile per shape (Neuron). A CPU compiles nothing, so here it projects only the
      labelled ones there too: the same log-probs (each position's projection is its own), without the LM head's
      work and backward on the prompt (in GRPO most of a row).
    - TRL's projection tile is 32,768 columns wide (a tokens x 32,768 buffer in the forward and again in the
      backward), sized for real vocabularies (Qwen's 151,936: five tiles, unchanged here). A narrower vocabulary
      (the embedded tiny model's few hundred tokens) gets one tile of its own width: the same products, without
      filling a buffer 50 times wider than the logits."""
    from trl.trainer import utils

    triton, width = getattr(utils, "_use_triton", None), getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None)
    if triton is None or width is None:  # another TRL: its own choice
        yield
        return
    head = transformers_model(getattr(model, "module", model)).get_output_embeddings().weight
    utils._use_triton = lambda device: device.type == "cpu" or triton(device)
    utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(width, getattr(head, "ds_shape", head.shape)[0])
    try:
        yield
    finally:
        utils._use_triton, utils._CHUNKED_LOGPROB_CHUNK_SIZE = triton, width


def token_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, length - 1) log-probability of each next token whose label is not -100 (0 elsewhere), from one
    forward of ``model`` (which has the fused head) on the batch's rows and vision tensors; the vision tower runs
    once per distinct image or video (``vision_once``: DPO's pairs, GRPO's groups; none where the batch carries
    a rollout's ``vision_once.ENCODINGS``), the LM head on the labelled positions only, and (GRPO's batches, where
    ``shared_prefix`` applies) each prompt's tokens once for all its rows."""
    with fitted_fused_head(model):
        if shared_prefix.applies(model, batch):  # GRPO: each prompt once, its rows' completions after it
            return shared_prefix.token_log_probs(model, batch)
        inputs = vision_once.model_inputs(model, batch, MODEL_KEYS)
        return model(**inputs, labels=batch["labels"], fused_lm_head=True, use_cache=False).log_probs


def log_prob_sums(model: nn.Module, batch: dict[str, torch.Tensor], group: sp.Group | None = None) -> torch.Tensor:
    """(rows,) each row's summed log-probability of its labelled next tokens. With a sequence-parallel ``group``
    (``--sequence_parallel_size``): the model's own forward on the whole batch, whose decoder holds this rank's
    chunk of the sequence (the fused head would need the whole one), the chunk's log-softmax at its targets
    (labels shifted before the split), summed over the group with autograd (``sp.group_log_prob_sums``)."""
    if group is None:
        return token_log_probs(model, batch).sum(-1)
    logits = model(**vision_once.model_inputs(model, batch, MODEL_KEYS), use_cache=False).logits
    return sp.group_log_prob_sums(logits, sp.local_targets(batch["labels"], group), group)


class Reference:
    """The reference policy's log-probabilities: adapters off (LoRA), a frozen copy (full), or none."""

    def __init__(self, kind: str, ref_model: nn.Module | None = None, saved: dict[str, torch.Tensor] | None = None):
        self.kind = kind  # "adapters_off" | "copy"
        self.ref_model = ref_model
        self.saved = saved or {}  # fully trained parameters of a LoRA run at their starting values

    @classmethod
    def adapters_off(cls, model: nn.Module, family, plan: modes.TrainPlan, zero3: bool, what: str) -> Reference:
        """The LoRA run's own model with adapters disabled; fully trained parts kept at their starting values."""
        base = transformers_model(model)
        full = modes.fully_trained_names(base, family, plan)
        if full and zero3:
            raise ConfigError(f"{what}: the reference of a LoRA run is the model with its adapters off, but this "
                              f"plan also trains {len(full)} parameters fully ({plan.describe()}), which ZeRO-3 "
                              "partitions and cannot swap back; freeze them (--freeze_merger True, no "
                              "--unfreeze_topk_*), or use ZeRO-2")
        saved = {name: param.detach().clone() for name, param in base.named_parameters()
                 if modes.clean_name(name) in full}
        if saved:
            logger.info("reference: adapters off, and %d fully trained tensors (%s) at their starting values",
                        len(saved), f"{sum(t.numel() for t in saved.values()):,} values")
        return cls("adapters_off", saved=saved)

    @contextlib.contextmanager
    def _swapped(self, model: nn.Module):
        base = transformers_model(model)
        params = dict(base.named_parameters())
        current = {}
        try:
            for name, start in self.saved.items():
                param = params[name]
                if start.device != param.device or start.dtype != param.dtype:
                    self.saved[name] = start = start.to(param.device, param.dtype)
                current[name] = param.data
                param.data = start
            yield
        finally:
            for name, data in current.items():
                params[name].data = data

    @contextlib.contextmanager
    def active(self, model: nn.Module, unwrap=None):
        """The model whose forward is the reference's: the frozen copy, or ``model`` (the policy as the Trainer
        calls it) with its adapters off; ``unwrap`` (the trainer's ``accelerator.unwrap_model``) takes the
        PeftModel out of the DeepSpeed / DDP wrappers."""
        if self.kind == "copy":
            yield self.ref_model
            return
        peft_model = unwrap(model) if unwrap is not None else model
        with peft_model.disable_adapter(), self._swapped(peft_model):
            yield model

    @torch.no_grad()
    def log_probs(self, model: nn.Module, batch: dict[str, torch.Tensor], unwrap=None) -> torch.Tensor:
        """Per-token reference log-probs of the batch (see ``token_log_probs`` and ``active``)."""
        with self.active(model, unwrap) as scorer:
            return token_log_probs(scorer, batch)

    @torch.no_grad()
    def log_prob_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], unwrap=None,
                      group: sp.Group | None = None) -> torch.Tensor:
        """(rows,) summed reference log-probs of the batch (see ``log_prob_sums`` and ``active``)."""
        if group is None:
            return self.log_probs(model, batch, unwrap).sum(-1)
        with self.active(model, unwrap) as scorer:
            return log_prob_sums(scorer, batch, group)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A reference model: eval mode, no gradients, dropout off."""
    from trl.trainer.utils import disable_dropout_in_model

    model.requires_grad_(False)
    model.eval()
    disable_dropout_in_model(model)
    return model


def prepare_reference_copy(trainer, ref_model: nn.Module) -> nn.Module:
    """Place a frozen reference copy as the trainer's model is placed: a DeepSpeed inference engine (sharded under
    ZeRO-3, whole under ZeRO-2, as TRL's ``prepare_deepspeed``), else on the trainer's device."""
    if trainer.is_deepspeed_enabled:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(ref_model, trainer.accelerator)
    return trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)


def policy_and_reference(start, model_args, mode_args, train_args, plan: modes.TrainPlan, stage: str, who: str,
                         reference: bool = True, temperature: float = 1.0):
    """(policy, ``Reference`` or None, frozen copy or None): the model to train, dropout off and with the fused
    log-prob head, and (``reference``) what it is compared with: for LoRA runs the same model with its adapters off
    (``who`` names the run in its errors), for full runs a frozen copy of what the policy starts from (partitioned
    at load under ZeRO-3), which becomes a ``Reference`` once the Trainer exists (``use_reference_copy``)."""
    model = load_policy(start, model_args, mode_args, train_args, plan)
    # Dropout off everywhere (LoRA's included), as TRL does: the policy's log-probs must be the ones the reference
    # and the old policy are compared with, not a random mask of them
    require_trl(stage).disable_dropout_in_model(model)
    add_log_prob_head(model, stage, temperature)
    if not reference:
        return model, None, None
    if plan.uses_lora:
        return model, Reference.adapters_off(model, start.family, plan, is_zero3(train_args), who), None
    copy = frozen_copy(load_start_model(start, model_args, torch_dtype(train_args.bf16, train_args.fp16)))
    add_log_prob_head(copy, stage, temperature)
    return model, None, copy


def use_reference_copy(trainer, ref_model: nn.Module | None) -> None:
    """The trainer's reference becomes the frozen copy, placed as the trainer's model is (nothing without one)."""
    if ref_model is not None:
        trainer.reference = Reference("copy", prepare_reference_copy(trainer, ref_model))


def is_zero3(train_args) -> bool:
    """Whether the run's DeepSpeed config is ZeRO stage 3."""
    if not train_args.deepspeed:
        return False
    plugin = getattr(train_args, "hf_deepspeed_config", None)
    if plugin is not None:
        return plugin.is_zero3()
    import json
    from pathlib import Path

    config = train_args.deepspeed if isinstance(train_args.deepspeed, dict) else json.loads(
        Path(train_args.deepspeed).read_text())
    return config.get("zero_optimization", {}).get("stage") == 3
