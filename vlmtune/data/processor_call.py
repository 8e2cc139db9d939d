"""The processor's own call on a training item's pieces, without the work it repeats on every call.

``ProcessorMixin.__call__`` (transformers 5) merges its keyword arguments with the processor's defaults and
validates them against typed dicts on every call (with a deep copy of them): a tenth of a dataset item's time, the
same result for every item, as training passes the same switches each time (``do_resize=False``,
``do_sample_frames=False``). ``ProcessorCall`` merges them once and then runs the steps that ``__call__`` runs, with
the processor's own methods: ``prepare_inputs_layout``, the image and video processors with their pad expansions
(``_process_images`` / ``_process_videos``), ``get_text_with_replacements``, the tokenizer with the merged text
arguments (through its own batch call, ``data.tokens.token_ids``, where those add nothing to the ids: half the
wrapper's cost) and ``_check_special_mm_tokens``. A processor whose class has its own ``__call__`` (or lacks one of
those methods), or switches that ask for tensors, offsets or metadata back, get the processor's call itself.
``tests/test_processor_call.py`` compares both on images, videos and text alone.
"""

from __future__ import annotations

import copy

import torch

from vlmtune.data.tokens import token_ids

_STEPS = ("prepare_inputs_layout", "_merge_kwargs", "_process_images", "_process_videos",
          "get_text_with_replacements", "_check_special_mm_tokens", "valid_processor_kwargs")
_NOT_LEAN = ("return_tensors", "return_text_replacement_offsets", "return_mm_token_type_ids", "return_metadata")
"""Switches of the call whose output the merged-once path does not build (the processor's call then runs); of the
merged arguments, ``return_metadata`` is the video processor's own (the call drops the metadata unless asked)."""


def _stock_call(processor) -> bool:
    """Whether ``processor(...)`` is ``ProcessorMixin.__call__`` with every step it calls."""
    try:
        from transformers.processing_utils import ProcessorMixin
    except ImportError:
        return False
    return type(processor).__call__ is ProcessorMixin.__call__ and all(hasattr(processor, s) for s in _STEPS)


class ProcessorCall:
    """``processor(text=..., images=..., videos=..., video_metadata=..., **kwargs)`` with ``kwargs`` merged once:
    the same dict of outputs (lists of ids per text; the vision tensors as the processor returns them)."""

    def __init__(self, processor, **kwargs):
        self.processor = processor
        self.kwargs = kwargs
        self._merged: dict | None = None
        self.lean = _stock_call(processor) and not any(kwargs.get(k) for k in _NOT_LEAN)
        self._text_kwargs: dict = {}
        self._plain_ids = False
        if self.lean:
            merged = self._merge()
            self.lean = not any(merged[kind].get(k) for kind in ("text_kwargs", "images_kwargs", "videos_kwargs")
                                for k in _NOT_LEAN if k != "return_metadata")
            self._text_kwargs = {k: v for k, v in merged["text_kwargs"].items() if k not in _NOT_LEAN}
            self._plain_ids = self.lean and _plain_ids(processor.tokenizer, self._text_kwargs)

    def _merge(self) -> dict:
        if self._merged is None:
            p = self.processor
            self._merged = p._merge_kwargs(p.valid_processor_kwargs, tokenizer_init_kwargs=p.tokenizer.init_kwargs,
                                           **self.kwargs)
        return self._merged

    def __call__(self, text: list[str], images=None, videos=None, video_metadata=None) -> dict:
        p = self.processor
        if not self.lean:
            return dict(p(text=text, images=images, videos=videos, video_metadata=video_metadata, **self.kwargs))
        merged = self._merge()
        images, text, videos, _ = p.prepare_inputs_layout(images=images, text=text, videos=videos)
        processed_images, processed_videos, image_repl, video_repl = {}, {}, [], []
        if images is not None and hasattr(p, "image_processor"):
            processed_images, image_repl = p._process_images(images, **merged["images_kwargs"])
        if videos is not None and hasattr(p, "video_processor"):
            videos_kwargs = dict(merged["videos_kwargs"])
            if video_metadata is not None:  # the call deep-copies its arguments: a processor may write into them
                videos_kwargs["video_metadata"] = copy.deepcopy(video_metadata)
            processed_videos, video_repl = p._process_videos(videos, **videos_kwargs)
        text, _ = p.get_text_with_replacements(text, image_repl, video_repl)
        if self._plain_ids:  # what the tokenizer returns for these switches, from its batch call alone
            ids = token_ids(p.tokenizer, text)
            text_inputs = {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
        else:
            text_inputs = p.tokenizer(text, **self._text_kwargs)
        p._check_special_mm_tokens(text, text_inputs, modalities=["image", "video", "audio"])
        data = {**text_inputs, **processed_images, **processed_videos}
        data.pop("video_metadata", None)
        return {k: v for k, v in data.items() if k not in p.unused_input_names}


def _plain_ids(tokenizer, text_kwargs: dict) -> bool:
    """Whether ``tokenizer(texts, **text_kwargs)`` is ``input_ids`` as ``token_ids`` gives them and an attention
    mask of ones: no padding or truncation, no token type ids, no special tokens added around a text."""
    returns = {"input_ids", "attention_mask"}
    if text_kwargs.get("return_token_type_ids") is False:
        returns.add("token_type_ids")
    if set(text_kwargs) - {"padding", "return_token_type_ids"} or text_kwargs.get("padding") not in (None, False) \
            or not set(getattr(tokenizer, "model_input_names", ())) <= returns:
        return False
    probe = ["a b", "<|im_start|>"]
    return tokenizer(probe)["input_ids"] == token_ids(tokenizer, probe)


def mm_token_types(processor, ids: torch.Tensor) -> torch.Tensor:
    """``processor.create_mm_token_type_ids`` of one row of ids, as a tensor: 1 for the processor's image tokens, 2
    for its video tokens, 3 for its audio tokens, 0 for the others."""
    types = torch.zeros_like(ids)
    for value, name in ((1, "image_token_ids"), (2, "video_token_ids"), (3, "audio_token_ids")):
        for token in getattr(processor, name, None) or ():
            if token is not None:
                types[ids == token] = value
    return types
