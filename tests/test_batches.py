"""Dataset and collator: mixed batches, padding, the ZeRO-3 vision fillers, over-long records."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES

from vlmtune.data.collator import Collator, vision_fillers
from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.data.dataset import VisionLanguageDataset


def items(p):
    return [p.dataset[i] for i in range(len(p.dataset))]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_batch_of_the_examples_gives_a_finite_loss(pipeline, family):
    p = pipeline(family)
    model = p.model()
    collate = Collator(p.processor.tokenizer.pad_token_id)
    all_items = items(p)
    for start in range(0, len(all_items), 4):
        batch = collate(all_items[start : start + 4])
        with torch.no_grad():
            loss = model(**batch).loss
        assert math.isfinite(loss.item())


def test_collator_pads_right_and_concatenates_vision_in_order(pipeline):
    p = pipeline("qwen2_5_vl")
    all_items = items(p)
    chosen = [all_items[i] for i, r in enumerate(p.dataset.records) if r.id in ("two_images", "text_only",
                                                                                 "image_and_video")]
    batch = Collator(p.processor.tokenizer.pad_token_id, pad_to_multiple_of=8)(chosen)
    longest = max(len(it["input_ids"]) for it in chosen)
    assert batch["input_ids"].shape[1] == -(-longest // 8) * 8
    for row, it in enumerate(chosen):
        n = len(it["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == it["input_ids"].tolist()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == p.processor.tokenizer.pad_token_id).all()
    with_images = [it for it in chosen if "pixel_values" in it]
    assert torch.equal(batch["pixel_values"], torch.cat([it["pixel_values"] for it in with_images]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([it["image_grid_thw"] for it in with_images]))
    assert batch["second_per_grid_ts"].shape == (1,)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_fillers_run_the_tower_without_touching_loss_or_gradients(pipeline, family):
    """A text-only batch with fillers calls the vision tower for images and videos, and the loss and the
    gradients of the language model are those of the batch without fillers."""
    p = pipeline(family)
    text_items = [it for it, r in zip(items(p), p.dataset.records) if r.shape == "text"]
    plain = Collator(p.processor.tokenizer.pad_token_id)(text_items)
    filled = Collator(p.processor.tokenizer.pad_token_id,
                      fillers=vision_fillers(p.processor, p.family.factor))(text_items)
    assert "pixel_values" in filled and "pixel_values_videos" in filled and "pixel_values" not in plain

    model = p.model()
    calls = []
    model.model.visual.register_forward_hook(lambda *args: calls.append(1))

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        return loss.detach(), grads

    loss_plain, grads_plain = loss_and_grads(plain)
    assert calls == []
    loss_filled, grads_filled = loss_and_grads(filled)
    assert len(calls) == 2  # one image pass, one video pass
    torch.testing.assert_close(loss_filled, loss_plain, rtol=1e-5, atol=1e-6)
    for name, grad in grads_plain.items():
        if "embed_tokens" in name:  # the filler's ids get an (exactly zero) embedding gradient row
            continue
        torch.testing.assert_close(grads_filled[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    vision_grads = [g for n, g in grads_filled.items() if ".visual." in n]
    assert vision_grads and all(float(g.abs().max()) == 0.0 for g in vision_grads)


def test_over_long_records_are_skipped_and_reported(pipeline, caplog):
    p = pipeline("qwen2_vl")
    limit = sorted(p.dataset.lengths)[len(p.dataset.lengths) // 2]
    over = [r.id for r, n in zip(p.dataset.records, p.dataset.lengths) if n > limit]
    with caplog.at_level("WARNING"):
        ds = VisionLanguageDataset(p.records, p.processor, p.family, p.budget, p.conversation, limit)
    assert len(ds) == len(p.records) - len(over)
    assert all(n <= limit for n in ds.lengths)
    assert [rid for _, rid, _ in ds.length_report.skipped] == over
    assert f"{len(over)} of {len(p.records)} records over {limit} tokens" in caplog.text
    with pytest.raises(ValueError, match="strict_length"):
        VisionLanguageDataset(p.records, p.processor, p.family, p.budget, p.conversation, limit, strict_length=True)
