"""GRPO's sampling loop: each prompt's prefill once, then one-token forwards, with ``generate``'s own processors.

HF ``generate`` with ``num_return_sequences=G`` repeats every prompt G times before its prefill (G prefills of the
same prompt, pixels aside), and around each one-token forward of the decoding loop it rebuilds the model's inputs
and the causal mask in Python: on a small model most of a step. ``sample_groups`` does what ``generate``'s sampling
loop does, in the same order and with the same random draws, with less around it:

- one prefill per prompt (left padded, its vision features as the batch carries them), the cache then repeated G
  times along the batch (``Cache.batch_repeat_interleave``, as generate repeats its inputs), the first token's
  logits likewise;
- positions from the model's own ``_prepare_position_ids_for_generation`` (Qwen-VL: M-RoPE with the text row in
  front), each new token at the previous one + 1, as generate's ``_update_model_kwargs_for_generation``: so a
  prompt whose video's temporal positions run past the text after it decodes from the same positions as generate;
- the logits processors and stopping criteria built by the model's own ``_get_logits_processor`` /
  ``_get_stopping_criteria`` from the generation config ``generate`` would build (temperature, top-k, top-p, the
  suppressed tokens, and whatever the model's ``generation_config`` adds), softmax and ``torch.multinomial``,
  finished rows padded;
- each one-token step through the language model itself (``get_decoder()``) and its head
  (``get_output_embeddings()``), as the model's forward does after the prompt: no vision inputs to place, no
  positions to compute, none of the PEFT, TRL and output wrappers around it;
- the loop in ``torch.inference_mode`` (its tensors stay in it; the ids it returns are a plain copy);
- under SDPA, where a prompt is padded, each step's mask given as the 4-D key mask ``create_causal_mask`` would
  build for one query (the padding row; every family's language model takes a 4-D mask as it is), instead of
  building it at every step; where none is, no mask (as ``sdpa_mask`` skips it: SDPA is faster without one).

It applies where every decoder layer is full attention (no sliding window, no Qwen3.5 linear-attention states),
the weights are whole (not ZeRO-3 / FSDP shards: those ranks must stay in step, as ``generate``'s ``synced_gpus``
keeps them), and the model is a transformers model with these methods; elsewhere (and for vLLM) ``generate`` runs.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmtune.model.zero3 import is_shard


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def applies(model: nn.Module) -> bool:
    """Whether ``sample_groups`` can stand in for ``generate`` on ``model`` (a PEFT or transformers model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    needed = ("_prepare_generation_config", "_get_logits_processor", "_get_stopping_criteria",
              "_prepare_special_tokens", "_prepare_position_ids_for_generation", "_supports_logits_to_keep",
              "get_decoder", "get_output_embeddings")
    if not all(hasattr(base, name) for name in needed) or not base._supports_logits_to_keep():
        return False
    layer_types = getattr(_text_config(base), "layer_types", None) or ["full_attention"]
    if any(kind != "full_attention" for kind in layer_types):
        return False
    if base.device.type != "cpu" and any(v == "grouped_mm" for v in getattr(
            base, "get_experts_implementation", dict)().values()):
        return False  # generate switches MoE experts to batched_mm for decoding on accelerators
    return not any(map(is_shard, base.parameters()))


@torch.no_grad()
def sample_groups(model: nn.Module, batch: dict[str, torch.Tensor], repeat: int,
                  **generate_kwargs) -> torch.Tensor:
    """The ids ``model.generate(**batch, **generate_kwargs, num_return_sequences=repeat, do_sample=True)`` returns
    after the prompt (rows of a prompt consecutive; finished rows padded), from one prefill per prompt. ``batch``:
    left-padded prompts with their ``attention_mask`` and vision inputs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    input_ids = batch["input_ids"]
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    config, _ = base._prepare_generation_config(None, do_sample=True, num_return_sequences=repeat, use_cache=True,
                                                **generate_kwargs)
    base._prepare_special_tokens(config, True, device=input_ids.device)
    config.max_length = config.max_new_tokens + input_ids.shape[1]  # generate's _prepare_generated_length
    from transformers import LogitsProcessorList, StoppingCriteriaList

    processors = base._get_logits_processor(
        generation_config=config, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
        prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(), device=input_ids.device,
        model_kwargs=rest)
    stopping = base._get_stopping_criteria(generation_config=config, stopping_criteria=StoppingCriteriaList(),
                                           tokenizer=None)
    positions = base._prepare_position_ids_for_generation(input_ids, dict(rest))
    out = model(input_ids=input_ids, **rest, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(repeat)
    logits = out.logits[:, -1].to(torch.float32).repeat_interleave(repeat, dim=0)
    del out
    ids = input_ids.repeat_interleave(repeat, dim=0)
    mask = batch["attention_mask"].repeat_interleave(repeat, dim=0)
    position = positions.repeat_interleave(repeat, dim=positions.ndim - 2)[..., -1:]
    sdpa = _text_config(base)._attn_implementation == "sdpa"
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    pad = config._pad_token_tensor.to(ids.device)
    padded = not bool(mask.all())  # (what the steps append is never padding)
    unfinished = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device)
    with torch.inference_mode():  # what the loop makes, nothing outside it keeps: no autograd records per op
        while True:
            scores = processors(ids, logits)
            tokens = torch.multinomial(nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            tokens = tokens * unfinished + pad * (1 - unfinished)
            ids = torch.cat([ids, tokens[:, None]], dim=-1)
            unfinished = unfinished & ~stopping(ids, None)
            if unfinished.max() == 0:
                break
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            position = position + 1
            step_mask = (mask[:, None, None, :].bool() if padded else None) if sdpa else mask
            hidden = decoder(input_ids=tokens[:, None], attention_mask=step_mask, position_ids=position,
                             past_key_values=cache, use_cache=True).last_hidden_state
            logits = head(hidden[:, -1]).to(torch.float32)
    return ids[:, input_ids.shape[1]:].clone()  # a plain tensor again (training rows are built from it)
