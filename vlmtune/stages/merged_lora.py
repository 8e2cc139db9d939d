"""Sampling with LoRA folded into the weights.

A LoRA layer's forward is the base projection plus ``B(A(x)) * scale``: three matrix products and a few more
calls per layer, at every decoding step of ``generate``. ``merged_for_sampling`` gives each LoRA layer's base a
weight ``W + scale * B A`` (a new tensor: the training weight is set aside untouched and put back, bit for bit,
when the context ends) and marks the layer merged, as PEFT's own ``merge`` does, so that its forward is the base
layer's: one product per layer at each decoding step; the base layer also stands in the LoRA layer's place (put
back when the context ends), so that no wrapper call runs around it. The
completions are drawn from the same distribution up to float rounding (``W x + B(A x) s`` and ``(W + s B A) x``
round differently); the training forwards are untouched. TRL's vLLM path samples from merged weights too
(``merge_adapter`` before each weight sync).

It applies where every adapted layer is a plain LoRA ``Linear`` on an unquantized ``nn.Linear`` (no DoRA, no LoRA
bias, no ``modules_to_save``), the weights are whole (not DeepSpeed ZeRO-3 nor FSDP shards), and, on a GPU, the
merged copies fit in its free memory; elsewhere sampling runs through the adapters as before.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from vlmtune.model.zero3 import is_shard


def _mergeable(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The LoRA layers to merge, with their names in ``model``, or None where the model is not one
    ``merged_for_sampling`` handles."""
    if not hasattr(model, "peft_config"):
        return None
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = []
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            return None
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.base_layer
        if type(module) is not LoraLinear or type(base) is not nn.Linear or module.merged or any(
                a in module.lora_variant or module.lora_bias.get(a, False) for a in module.active_adapters):
            return None
        if any(map(is_shard, base.parameters())):
            return None
        layers.append((name, module))
    return layers or None


@contextlib.contextmanager
def merged_for_sampling(model: nn.Module):
    """Within the context, ``model`` (a PEFT model, unwrapped) runs its LoRA layers as merged weights; afterwards
    its weights and adapters are as before. Does nothing where merging does not apply."""
    named = _mergeable(model)
    if named is not None and torch.cuda.is_available():
        weight = named[0][1].base_layer.weight
        need = sum(m.base_layer.weight.numel() * m.base_layer.weight.element_size() for _, m in named)
        if weight.is_cuda and torch.cuda.mem_get_info(weight.device)[0] < 2 * need:
            named = None
    if named is None:
        yield model
        return
    kept = []
    try:
        with torch.no_grad():
            for _, module in named:
                weight = module.base_layer.weight
                merged = weight.detach().clone()
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                for adapter in adapters:
                    merged += module.get_delta_weight(adapter).to(merged.dtype)
                kept.append((module, weight, weight.data))
                weight.data = merged
                module.merged_adapters = adapters  # PEFT's merged state: its forward is the base layer's alone
        with base_layers_in_place(model, named):
            yield model
    finally:
        for module, weight, data in kept:
            weight.data = data
            module.merged_adapters = []


@contextlib.contextmanager
def base_layers_in_place(model: nn.Module, named: list[tuple[str, nn.Module]]):
    """Within the context, each (name, LoRA layer) of ``model`` is replaced by its base layer (merged: the same
    forward, without the LoRA wrapper's call around it at every decoding step); afterwards each is back."""
    placed = []
    try:
        for name, module in named:
            parent, _, attr = name.rpartition(".")
            placed.append((model.get_submodule(parent), attr, module))
            setattr(placed[-1][0], attr, module.base_layer)
        yield
    finally:
        for parent, attr, module in placed:
            setattr(parent, attr, module)
