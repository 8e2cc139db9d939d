"""A reward model: a vision-language model with a scalar head (``score``) on its last hidden state.

The head is a ``Linear(hidden_size, 1, bias=False)`` attached to the transformers model as ``score``, the name
and shape of transformers' sequence-classification models (``Qwen3_5ForSequenceClassification``). It reads the
final (normed) hidden state at one position per row: the reply's end-of-turn token when training on pairs, the
last token of a sampled completion when scoring.

The model body is saved as any run saves it (adapters, non-LoRA trainables or the whole model, which ``merge``,
``predict`` and the resume read as usual); the head is left out of those files (``_keys_to_ignore_on_save``) and
saved on its own as ``reward_head.safetensors`` beside them, in the run folder and its checkpoints.
``load_head`` puts it back on a model loaded from any of them.

The merged folder is written in the layout of transformers' sequence-classification class of the family where
transformers has one (``Qwen3_5ForSequenceClassification``; ``seq_cls_class``): the body without ``lm_head``, the
head as ``score.weight``, ``num_labels`` 1, loadable by that class alone (``write_seq_cls``, ``load_seq_cls``).
Other families' merged folders are the merged model plus ``reward_head.safetensors``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlmtune.errors import ConfigError

HEAD = "score"
HEAD_FILE = "reward_head.safetensors"
HEAD_KEY = f"{HEAD}.weight"


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attach_head(model: nn.Module, std: float | None = None, seed: int = 0) -> nn.Linear:
    """Give the transformers model inside ``model`` a fresh ``score`` head (normal init, ``std`` default
    1 / sqrt(hidden_size + 1)), trainable, in float32; left out of
    ``save_pretrained``."""
    inner = _inner(model)
    hidden = inner.config.get_text_config().hidden_size
    head = nn.Linear(hidden, 1, bias=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * (std or 1 / (hidden + 1) ** 0.5))
    inner.score = head.to(next(inner.parameters()).device)  # float32, as the fp32 masters of what trains
    inner._keys_to_ignore_on_save = {*(inner._keys_to_ignore_on_save or ()), HEAD_KEY}
    return inner.score


def has_head(model: nn.Module) -> bool:
    """Whether the model carries a reward head."""
    return isinstance(getattr(_inner(model), HEAD, None), nn.Linear)


def is_head_name(name: str) -> bool:
    """Whether a parameter name (possibly with PEFT / DeepSpeed prefixes) is the head's."""
    return name == HEAD_KEY or name.endswith("." + HEAD_KEY)


def save_head(folder: str | Path, state: dict[str, torch.Tensor]) -> bool:
    """Write the head's weight from a state dict (any prefixes) to ``folder/reward_head.safetensors``; False when
    the state holds no head."""
    found = [v for k, v in state.items() if is_head_name(k)]
    if not found:
        return False
    save_file({HEAD_KEY: found[0].detach().cpu().float().contiguous()}, str(Path(folder, HEAD_FILE)),
              metadata={"format": "pt"})
    return True


def seq_cls_class(config):
    """transformers' sequence-classification class of the model family of ``config`` (``Qwen3_5Config`` ->
    ``Qwen3_5ForSequenceClassification``), None where transformers has none (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
    Qwen3.5-MoE in 5.22)."""
    import transformers

    name = type(config).__name__.removesuffix("Config") + "ForSequenceClassification"
    return getattr(transformers, name, None)


def is_seq_cls_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model saved by a sequence-classification class (its config says so)."""
    config = Path(folder, "config.json")
    if not config.is_file():
        return False
    import json

    return any(a.endswith("ForSequenceClassification") for a in json.loads(config.read_text()).get("architectures")
               or ())


def write_seq_cls(merged: nn.Module, head_weight: torch.Tensor, folder: str | Path,
                  batch: dict[str, torch.Tensor], pad_token_id: int | None, **save_kwargs) -> float:
    """Save a merged reward model (``merged``: the family's generation class, without a head) with ``head_weight``
    through the family's sequence-classification class: its body's weights without ``lm_head``, ``score.weight``
    in the body's dtype, the config that class writes (``num_labels`` 1; the tokenizer's ``pad_token_id`` where the
    text config has none, without which that class refuses batches of more than one row). Reloads the folder with
    that class (``MergeError`` unless every key matches) and returns max |reward difference| on ``batch`` between
    its ``logits`` and ``merged`` + head (``sequence_rewards`` at each row's last real token)."""
    import copy

    from vlmtune.errors import MergeError

    config = copy.deepcopy(merged.config)
    config.num_labels = 1
    if config.get_text_config().pad_token_id is None:
        config.get_text_config().pad_token_id = pad_token_id
    with torch.device("meta"):
        model = seq_cls_class(config)(config)
    state = {k: v for k, v in merged.state_dict().items() if not k.startswith("lm_head.")}
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    state[HEAD_KEY] = head_weight.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(folder, **save_kwargs)
    del model, state

    device = next(merged.parameters()).device
    inputs = {k: v.to(device).to(dtype) if k.startswith("pixel_values") else v.to(device) for k, v in batch.items()}
    mask = inputs["attention_mask"]
    with torch.no_grad():
        attach_head(merged).to(dtype).weight.copy_(head_weight)
        want = sequence_rewards(merged, inputs, (mask * torch.arange(mask.shape[1], device=device)).argmax(-1))
        reloaded, info = seq_cls_class(config).from_pretrained(str(folder), dtype="auto", output_loading_info=True)
        problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
        if problems:
            raise MergeError(f"the written folder does not load cleanly with {type(reloaded).__name__}: {problems}")
        got = reloaded.to(device).eval()(**{k: v for k, v in inputs.items() if k in MODEL_KEYS}).logits
    return float((got.squeeze(-1).float() - want).abs().max())


def save_merged(merged: nn.Module, run_folder: str | Path, folder: str | Path, batch: dict[str, torch.Tensor],
                pad_token_id: int | None, **save_kwargs) -> float | None:
    """Save a merged model to ``folder``; for a reward model (``run_folder`` holds its head) in the family's
    sequence-classification layout where transformers has one (``write_seq_cls``: returns its check's max |reward
    difference|), else with the head file beside it. None when the folder is a plain model + head file to check as
    any merged folder."""
    head = Path(run_folder, HEAD_FILE)
    if head.is_file() and seq_cls_class(merged.config) is not None:
        return write_seq_cls(merged, load_file(str(head))[HEAD_KEY], folder, batch, pad_token_id, **save_kwargs)
    merged.save_pretrained(folder, **save_kwargs)
    if head.is_file():
        shutil.copy2(head, Path(folder, HEAD_FILE))  # travels beside the merged body
    return None


def load_seq_cls(folder: str | Path) -> nn.Module:
    """A reward model saved by ``write_seq_cls`` (its dtype), with its ``score`` head; eval mode."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    return seq_cls_class(config).from_pretrained(str(folder), dtype="auto").eval()


def check_folder(folder: str | Path, flag: str) -> None:
    """``ConfigError`` naming ``flag`` unless ``folder`` holds a reward model's head (its own file, or the
    sequence-classification layout)."""
    if not Path(folder).is_dir():
        raise ConfigError(f"{flag} {folder} does not exist; give the output folder of `vlmtune reward-model` "
                          "(or its merged folder)")
    if not Path(folder, HEAD_FILE).is_file() and not is_seq_cls_folder(folder):
        raise ConfigError(f"{flag} {folder} is not a reward model: it has no {HEAD_FILE} and is no "
                          "*ForSequenceClassification folder; give the output folder of "
                          "`vlmtune reward-model` (or its merged folder)")


def load_head(model: nn.Module, folder: str | Path) -> nn.Linear:
    """Attach (if needed) and load the head saved in ``folder``; ``ConfigError`` when the folder has none or it
    does not fit the model."""
    check_folder(folder, "reward model")
    path = Path(folder, HEAD_FILE)
    weight = load_file(str(path))[HEAD_KEY]
    head = getattr(_inner(model), HEAD, None) if has_head(model) else attach_head(model)
    if weight.shape != head.weight.shape:
        raise ConfigError(f"{path}: the head has shape {tuple(weight.shape)} but the model's hidden size needs "
                          f"{tuple(head.weight.shape)}; the reward model was trained on another base model")
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
    return head


MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
              "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "position_ids")


def sequence_rewards(model: nn.Module, batch: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """(rows,) float32 rewards: the head applied to the final hidden state of each row at ``positions``, from one
    forward of ``model`` (through its wrappers; the LM head runs on one position only)."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_KEYS}
    outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = outputs.hidden_states[-1]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    picked = hidden[rows, positions.to(hidden.device)]
    head = getattr(_inner(model), HEAD)
    return head(picked.to(head.weight.dtype)).squeeze(-1).float()


def last_label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Each row's position of its last labelled token (the reply's end-of-turn token in a pair's row)."""
    index = torch.arange(labels.shape[1], device=labels.device)
    return ((labels != -100) * index).argmax(-1)
