"""The processor's call with its switches merged once (``vlmtune.data.processor_call``) against the processor's own
call: the same outputs on images, videos (with their metadata) and text alone."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmtune.data.processor_call import ProcessorCall, mm_token_types

SWITCHES = dict(do_resize=False, do_sample_frames=False, return_mm_token_type_ids=False)
PIECES = ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi", "<|vision_start|><|video_pad|>"
          "<|vision_end|> and <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n", "<|im_start|>assistant\nOk"]


def _same(got: dict, want) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def _media(f: int = 28):
    """Two images and a video of 4 frames, at multiples of the family's factor ``f`` (as resized for it)."""
    images = [Image.new("RGB", (2 * f, 3 * f), (200, 30, 30)), Image.new("RGB", (3 * f, 2 * f), (30, 30, 200))]
    frames = torch.arange(4 * 3 * 4 * f * f, dtype=torch.float32).reshape(4, 3, 2 * f, 2 * f) % 251
    metadata = {"fps": 2.0, "frames_indices": [0, 1, 2, 3], "total_num_frames": 4, "duration": 2.0}
    return images, [frames], [metadata]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_merged_once_gives_the_processor_call(pipeline, family):
    processor, f = pipeline(family).processor, pipeline(family).family.factor
    call = ProcessorCall(processor, **SWITCHES)
    assert call.lean and call._plain_ids  # ids from the tokenizer's batch call alone
    images, videos, metadata = _media(f)
    want = processor(text=list(PIECES), images=images, videos=videos, video_metadata=[dict(m) for m in metadata],
                     **SWITCHES)
    _same(call(list(PIECES), images, videos, metadata), want)
    padded = ProcessorCall(processor, padding="longest", **SWITCHES)
    assert padded.lean and not padded._plain_ids  # ids through the tokenizer's own call
    _same(padded(list(PIECES), images, videos, metadata), processor(
        text=list(PIECES), images=images, videos=videos, video_metadata=metadata, padding="longest", **SWITCHES))
    assert metadata == _media(f)[2]  # the caller's metadata unchanged (a DPO pair encodes the same media twice)
    text = ["<|im_start|>user\nHello<|im_end|>\n", "<|im_start|>assistant\nHi<|im_end|>\n"]
    _same(call(list(text)), processor(text=list(text), **SWITCHES))
    with pytest.raises(Exception) as want_error:  # a pad without its image: the processor's own refusal
        processor(text=["<|image_pad|><|image_pad|>"], images=images[:1], **SWITCHES)
    with pytest.raises(want_error.type):
        call(["<|image_pad|><|image_pad|>"], images[:1])

    ids = torch.tensor([t for row in want["input_ids"] for t in row])
    types = processor.create_mm_token_type_ids([ids.tolist()])[0]
    assert set(types) == {0, 1, 2} and mm_token_types(processor, ids).tolist() == types


def test_a_processor_with_its_own_call_is_called(pipeline):
    processor = pipeline("qwen2_vl").processor
    calls = []

    class Own(type(processor)):
        def __call__(self, *args, **kwargs):
            calls.append(kwargs)
            return super().__call__(*args, **kwargs)

    own = Own(processor.image_processor, processor.tokenizer, processor.video_processor,
              chat_template=processor.chat_template)
    call = ProcessorCall(own, **SWITCHES)
    assert not call.lean and not ProcessorCall(processor, return_tensors="pt").lean
    _same(call(list(PIECES[:1]), _media()[0][:1]), processor(text=list(PIECES[:1]), images=_media()[0][:1],
                                                             **SWITCHES))
    assert len(calls) == 1
