"""GRPO's training and scoring forwards with each prompt run once: its ``num_generations`` rows share its prefix.

A GRPO batch holds each prompt ``num_generations`` times, one row per completion, and on a small model most of a
row is its prompt (its image and video tokens): a plain forward (and its backward) runs every prompt token G times.
``token_log_probs`` gives the plain forward's per-token log-probabilities (and, through autograd, its gradients)
from two forwards instead:

1. the prefix: each prompt but its last token, once per prompt (right padded; its images and videos placed once,
   through ``vision_once``), with the cache on and gradients kept. Each row then takes its prompt's keys and values
   (``Cache.batch_select_indices``: an index, so autograd sums the rows' gradients back into the prompt's);
2. the suffix: each row's last prompt token and its completion (right padded), attending to its prompt's cached
   prefix (the padding of both masked), through the fused log-prob head with the labels pre-shifted
   (``shift_labels``): every labelled position of a row (its completion, predicted from the token before) lies in
   the suffix, and no query row is fully masked.

Positions are the full rows' own (``position_ids`` of the batch: M-RoPE positions of prompt + completion), taken
position by position for both parts, never recomputed from ``rope_deltas``. Each prompt token attends to the same
earlier tokens with the same positions as in the full row, each completion token to its whole prompt and its
completion so far: the same attention up to the order of floating-point sums.

It applies to the families its exactness test covers (``FAMILIES``), with SDPA attention (as tested), every decoder
layer full attention, one process (no DDP / DeepSpeed / FSDP wrapper, no ZeRO-3 shards), no gradient
checkpointing (its layers drop the cache), and batches that carry their prompts (``PROMPTS``, from GRPO) and their
3-D positions (a text-only batch has none: the plain forward runs); elsewhere the plain forward runs.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from vlmtune.data.collator import VISION_KEYS
from vlmtune.model.zero3 import is_shard
from vlmtune.stages import vision_once

PROMPTS = "shared_prompts"
"""The batch key of its prompts: ``lengths`` and ``rows`` (each prompt's tokens and the consecutive rows that
continue it), and the prompts' vision tensors (each prompt's media once)."""

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
"""Model types the exactness test covers (MoE and Qwen3.5's linear attention would need more: a router loss,
recurrent states)."""


def prompt_inputs(prompts: list[dict], rows_per_prompt: int) -> dict[str, torch.Tensor]:
    """``PROMPTS`` of a batch whose rows are each prompt's ``rows_per_prompt`` completions, in order."""
    out = {"lengths": torch.tensor([len(p["input_ids"]) for p in prompts]),
           "rows": torch.full((len(prompts),), rows_per_prompt)}
    for key in VISION_KEYS:
        parts = [p[key] for p in prompts if p.get(key) is not None]
        if parts:
            out[key] = torch.cat(parts)
    device = prompts[0]["input_ids"].device
    return {k: v.to(device) for k, v in out.items()}


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def applies(model: nn.Module, batch: dict) -> bool:
    """Whether ``token_log_probs`` stands in for the plain forward of ``model`` on ``batch``."""
    prompts, positions = batch.get(PROMPTS), batch.get("position_ids")
    if prompts is None or positions is None or positions.ndim != 3 or positions.shape[0] != 3:
        return False  # no prompts to share, or no 3-D positions to take (text-only batches)
    if hasattr(model, "module"):  # DDP / DeepSpeed: their hooks expect one forward through the wrapper
        return False
    base = _base(model)
    config = base.config
    text = config.get_text_config(decoder=True)
    if config.model_type not in FAMILIES or text._attn_implementation != "sdpa":
        return False
    if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or ["full_attention"]):
        return False
    sharded, checkpointable = _walked(base)
    if sharded or any(m.gradient_checkpointing for m in checkpointable):  # checkpointed layers drop the cache
        return False
    if not bool((prompts["lengths"] >= 2).all()) or int(prompts["rows"].sum()) != batch["input_ids"].shape[0]:
        return False
    owner, _, start, end, last = _layout(batch)
    columns = torch.arange(batch["input_ids"].shape[1], device=start.device)
    if not torch.equal(batch["attention_mask"].bool(), (columns >= start[:, None]) & (columns < end[:, None])):
        return False  # padding inside a row
    if "mm_token_type_ids" in batch and bool(batch["mm_token_type_ids"].gather(1, last[:, None]).any()):
        return False  # a prompt ending in an image or video token
    return not bool((batch["labels"][columns <= last[:, None]] != -100).any())  # labels only after the prompt


_WALKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _walked(base: nn.Module) -> tuple[bool, list[nn.Module]]:
    """(whether any parameter is a ZeRO-3 or FSDP shard, the modules that can checkpoint), from one walk over
    ``base`` per model (GRPO asks at every forward; its modules and their placement stay, their flags may not)."""
    if base not in _WALKS:
        _WALKS[base] = (any(map(is_shard, base.parameters())),
                        [m for m in base.modules() if hasattr(m, "gradient_checkpointing")])
    return _WALKS[base]


def _layout(batch: dict) -> tuple[torch.Tensor, ...]:
    """(each row's prompt, each prompt's first row, each row's first token, its end, its last prompt token)."""
    prompts, mask = batch[PROMPTS], batch["attention_mask"]
    owner = torch.repeat_interleave(torch.arange(len(prompts["rows"]), device=mask.device), prompts["rows"])
    firsts = torch.cumsum(prompts["rows"], 0) - prompts["rows"]
    start = (mask.cumsum(1) == 0).sum(1)  # left padding
    return owner, firsts, start, start + mask.sum(1), start + prompts["lengths"][owner] - 1


def token_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, length - 1) log-probability of each next token whose label is not -100 (0 elsewhere), as the plain
    forward of ``model`` (with TRL's fused head) on the batch gives it, from one prefix forward per prompt and one
    suffix forward per row (see the module). Call where ``applies``."""
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    prompts = batch[PROMPTS]
    rows, length = ids.shape
    device = ids.device
    owner, firsts, start, end, last = _layout(batch)  # last: each row's last prompt token, the suffix's first
    filler = ids.gather(1, last[:, None])  # a text token for padded places (never a vision placeholder)

    def take(values: torch.Tensor, at: torch.Tensor, valid: torch.Tensor, fill) -> torch.Tensor:
        at = at.clamp(max=length - 1)
        if values.ndim == 3:  # positions (3, rows, length)
            return values.gather(2, at[None].expand(3, -1, -1))
        return torch.where(valid, values.gather(1, at), fill)

    # 1. the prefix: each prompt but its last token, once, right padded
    pre_len = prompts["lengths"] - 1
    j = torch.arange(int(pre_len.max()), device=device)
    pre_at = start[firsts][:, None] + j
    pre_valid = j < pre_len[:, None]
    prefix = {"input_ids": take(ids[firsts], pre_at, pre_valid, filler[firsts]),
              "attention_mask": pre_valid.long(), "position_ids": take(positions[:, firsts], pre_at, pre_valid, 0),
              **{k: v for k, v in prompts.items() if k in VISION_KEYS}}
    if "mm_token_type_ids" in batch:
        prefix["mm_token_type_ids"] = take(batch["mm_token_type_ids"][firsts], pre_at, pre_valid, 0)
    keys = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", *VISION_KEYS)
    inputs = vision_once.model_inputs(model, {**prefix, vision_once.ENCODINGS: batch.get(vision_once.ENCODINGS)},
                                      keys)
    cache = _base(model).base_model(**inputs, use_cache=True).past_key_values
    cache.batch_select_indices(owner)  # each row its prompt's keys and values (autograd sums them back)

    # 2. the suffix: each row's last prompt token and completion, right padded, after its prompt's prefix
    k = torch.arange(int((end - last).max()), device=device)
    suf_at = last[:, None] + k
    suf_valid = suf_at < end[:, None]
    shifted = torch.cat([labels[:, 1:], labels.new_full((rows, 1), -100)], 1)  # the label each position predicts
    out = model(input_ids=take(ids, suf_at, suf_valid, filler),
                attention_mask=torch.cat([pre_valid[owner], suf_valid], 1).long(),
                position_ids=take(positions, suf_at, suf_valid, 0), past_key_values=cache,
                shift_labels=take(shifted, suf_at, suf_valid, -100), fused_lm_head=True)
    # back in the full rows' layout (padding of the suffix to places past the end, then dropped)
    places = torch.where(suf_valid, suf_at, length + k)
    full = out.log_probs.new_zeros(rows, length + len(k)).scatter(1, places, out.log_probs)
    return full[:, :length - 1]
