"""Packing: packed batches equal their records run one by one, positions restart per record, little padding."""

from __future__ import annotations

import pytest
import torch
from conftest import PACKABLE_FAMILIES  # Qwen3.5's refusal: test_families.py
from torch.utils.data import RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler

from vlmtune.data import packing
from vlmtune.data.collator import Collator
from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.data.packing import PackedCollator, PackedDataset, RopeIndex, pack_indices
from vlmtune.errors import ConfigError
from vlmtune.model import packing as model_packing

REPEAT = 8
"""data_examples/ (12 records) repeated 8 times: 96 records for the padding measurements."""


def items(p):
    return [p.dataset[i] for i in range(len(p.dataset))]


def summed_loss_and_grads(model, batch):
    """Sum (not mean) of the token losses, and the gradients of that sum: comparable across batchings."""
    model.zero_grad()
    out = model(**batch)
    n_tokens = (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
    total = out.loss * n_tokens
    total.backward()
    grads = {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}
    return total.detach(), int(n_tokens), grads


def assert_grads_close(got: dict, want: dict, rel: float = 1e-5):
    assert got.keys() == want.keys()
    for name, ref in want.items():
        scale = float(ref.abs().max())
        torch.testing.assert_close(got[name], ref, rtol=rel, atol=rel * max(scale, 1e-12), msg=name)
        assert float((got[name] - ref).norm()) <= rel * max(float(ref.norm()), 1e-12), name


# ------------------------------------------------------------------ the packer


def test_pack_indices_fill_packs_evenly_within_capacity():
    lengths = [9, 1, 5, 5, 4, 3, 3, 2, 8]
    packs = pack_indices(lengths, 10)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    sizes = [sum(lengths[i] for i in p) for p in packs]
    assert max(sizes) <= 10
    assert len(packs) == 4  # 40 tokens: first-fit decreasing needs 4 packs of 10, the fewest possible
    assert all(p == sorted(p) for p in packs)


def test_pack_indices_even_out_the_remainder_pack():
    lengths = [100] * 9 + [10]  # first-fit alone: 3 packs of 300 and one of 10
    sizes = sorted(sum(lengths[i] for i in p) for p in pack_indices(lengths, 300))
    assert len(sizes) == 4 and sizes[-1] - sizes[0] <= 100


def test_pack_indices_refuse_a_record_over_capacity():
    with pytest.raises(ValueError, match="longer than the pack capacity 10"):
        pack_indices([3, 11], 10)


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("family", PACKABLE_FAMILIES)
def test_packed_batch_equals_the_records_one_by_one(pipeline, family):
    """fp32: the summed token loss and the gradients of a packed batch (rows of several records, padded to the
    longest row) equal the sums over the same records run alone through the ordinary padded path."""
    p = pipeline(family)
    model = p.model()
    layout = model_packing.prepare_model(model)
    assert layout == "block_mask"  # sdpa on CPU
    packed = PackedDataset(p.dataset, max_seq_length=256)
    assert len(packed) >= 3 and len(set(packed.lengths)) > 1  # several rows of unequal length: padding included
    batch = PackedCollator(p.processor.tokenizer.pad_token_id, RopeIndex(model.config))(
        [packed[i] for i in range(len(packed))])
    assert "attention_mask" not in batch and batch["position_ids"].shape[:2] == (4, len(packed))

    got_loss, got_n, got_grads = summed_loss_and_grads(model, batch)
    collate = Collator(p.processor.tokenizer.pad_token_id)
    want_loss, want_n, want_grads = 0.0, 0, {}
    for item in items(p):
        loss, n, grads = summed_loss_and_grads(model, collate([item]))
        want_loss, want_n = want_loss + loss, want_n + n
        for name, g in grads.items():
            want_grads[name] = want_grads.get(name, 0) + g
    assert got_n == want_n
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    assert_grads_close(got_grads, want_grads)


def test_padding_free_rows_give_the_same_loss(pipeline):
    """The flash-attn layout (all packs flattened into one row, no padding) is exact as well; on CPU, sdpa builds
    the block mask from the same restarting positions that flash-attn's varlen kernel reads."""
    p = pipeline("qwen2_5_vl")
    model = p.model()
    model_packing.prepare_model(model)
    packed = PackedDataset(p.dataset, max_seq_length=256)
    packs = [packed[i] for i in range(len(packed))]
    pad_id = p.processor.tokenizer.pad_token_id
    flat = PackedCollator(pad_id, RopeIndex(model.config), padding_free=True)(packs)
    rows = PackedCollator(pad_id, RopeIndex(model.config))(packs)
    assert flat["input_ids"].shape == (1, sum(packed.lengths))
    assert packing.padding_fraction(flat, pad_id) == 0.0
    loss_flat, n_flat, grads_flat = summed_loss_and_grads(model, flat)
    loss_rows, n_rows, grads_rows = summed_loss_and_grads(model, rows)
    assert n_flat == n_rows
    torch.testing.assert_close(loss_flat, loss_rows, rtol=1e-5, atol=0)
    assert_grads_close(grads_flat, grads_rows)


def test_without_restarted_positions_the_losses_differ(pipeline):
    """Control: the same rows with positions computed over the whole row (one long sequence, as a naive packer
    would do) give another loss, so the equality test above can fail."""
    p = pipeline("qwen2_vl")
    model = p.model()
    model_packing.prepare_model(model)
    packed = PackedDataset(p.dataset, max_seq_length=256)
    pad_id = p.processor.tokenizer.pad_token_id
    batch = PackedCollator(pad_id, RopeIndex(model.config))([packed[i] for i in range(len(packed))])
    naive = dict(batch)
    del naive["position_ids"]
    naive["attention_mask"] = packing._real_tokens(batch, pad_id).long()
    good, _, _ = summed_loss_and_grads(model, batch)
    bad, _, _ = summed_loss_and_grads(model, naive)
    assert abs(float(good - bad)) > 1e-3 * abs(float(good))


def test_zero3_fillers_in_a_packed_batch_change_neither_loss_nor_gradients(pipeline):
    """A packed batch with no image or video gets the inert filler image and video as segments of their own (the
    vision tower runs on every rank); the loss and the language model's gradients stay those without fillers."""
    from vlmtune.data.collator import vision_fillers

    p = pipeline("qwen2_5_vl")
    model = p.model()
    model_packing.prepare_model(model)
    text = [it for it, r in zip(items(p), p.dataset.records) if r.shape == "text"]
    pad_id = p.processor.tokenizer.pad_token_id
    plain = PackedCollator(pad_id, RopeIndex(model.config))([text])
    filled = PackedCollator(pad_id, RopeIndex(model.config), fillers=vision_fillers(p.processor, p.family.factor))(
        [text])
    assert "pixel_values" in filled and "pixel_values_videos" in filled and "pixel_values" not in plain
    assert packing.count_samples(filled, pad_id) == len(text) + 2  # the fillers are segments of their own
    loss_plain, _, grads_plain = summed_loss_and_grads(model, plain)
    loss_filled, _, grads_filled = summed_loss_and_grads(model, filled)
    torch.testing.assert_close(loss_filled, loss_plain, rtol=1e-5, atol=0)
    kept = {name for name in grads_plain if "embed_tokens" not in name}  # fillers' ids: zero embedding rows
    assert_grads_close({n: grads_filled[n] for n in kept}, {n: grads_plain[n] for n in kept})
    assert all(float(g.abs().max()) == 0 for n, g in grads_filled.items() if ".visual." in n)


@pytest.mark.parametrize("family", PACKABLE_FAMILIES)
def test_positions_restart_per_record_and_match_the_model(pipeline, family):
    p = pipeline(family)
    model = p.model()
    all_items = items(p)
    pad_id = p.processor.tokenizer.pad_token_id
    batch = PackedCollator(pad_id, RopeIndex(model.config))([all_items[:5], all_items[5:]])
    for row, pack in enumerate((all_items[:5], all_items[5:])):
        start = 0
        for item in pack:
            n = len(item["input_ids"])
            padded = Collator(pad_id)([item])
            want, _ = model.model.get_rope_index(
                padded["input_ids"], padded["mm_token_type_ids"], padded.get("image_grid_thw"),
                padded.get("video_grid_thw"), attention_mask=padded["attention_mask"],
                **({"second_per_grid_ts": padded["second_per_grid_ts"]} if "second_per_grid_ts" in padded else {}))
            got = batch["position_ids"][:, row, start : start + n]
            assert got[0].tolist() == list(range(n))  # text positions restart: record boundaries
            assert torch.equal(got[1:], want[:, 0])
            assert batch["labels"][row, start] == IGNORE_INDEX
            assert torch.equal(batch["labels"][row, start + 1 : start + n], item["labels"][1:])
            start += n
    assert torch.equal(batch["pixel_values"], torch.cat([it["pixel_values"] for it in all_items
                                                         if "pixel_values" in it]))
    assert packing.count_samples(batch, pad_id) == len(all_items)
    assert packing.count_tokens(batch, pad_id) == sum(len(it["input_ids"]) for it in all_items)


def test_prepare_model_turns_the_cache_off_and_refuses_unknown_attention(pipeline):
    """A KV cache hides the packed boundaries from the mask builder; transformers 5.22's language model reads
    ``use_cache`` from ``text_config``, so that one must be off too."""
    model = pipeline("qwen2_vl").model()
    assert model.config.text_config.use_cache
    assert model_packing.prepare_model(model) == "block_mask"
    assert not model.config.text_config.use_cache
    assert model_packing.packing_layout("flash_attention_2") == "padding_free"
    with pytest.raises(ConfigError, match="--packing cannot keep records apart with attention implementation "
                       "'paged_attention'"):
        model_packing.packing_layout("paged_attention")


# ------------------------------------------------------------------ padding


class Repeated(torch.utils.data.Dataset):
    """A dataset's items repeated ``times`` (each record decoded once)."""

    def __init__(self, dataset, times: int):
        self.items = [dataset[i] for i in range(len(dataset))]
        self.lengths = list(dataset.lengths) * times

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return self.items[i % len(self.items)]


def epoch_padding(batches, pad_id) -> float:
    slots = sum(b["input_ids"].numel() for b in batches)
    return 1 - sum(packing.count_tokens(b, pad_id) for b in batches) / slots


@pytest.mark.parametrize("family", PACKABLE_FAMILIES)
def test_padding_fraction_on_the_repeated_examples(pipeline, family):
    """data_examples/ x8 (96 records), one epoch. Padded and grouped: 4 records per batch. Packed: 4 packs of
    at most 1024 tokens per batch, in the Trainer's random order. Targets: packed < 5%, grouped < 15% of tokens."""
    p = pipeline(family)
    data = Repeated(p.dataset, REPEAT)
    pad_id = p.processor.tokenizer.pad_token_id
    collate = Collator(pad_id)
    generator = torch.Generator().manual_seed(0)

    def padded_epoch(order):
        return [collate([data[i] for i in order[k : k + 4]]) for k in range(0, len(order), 4)]

    plain = epoch_padding(padded_epoch(list(range(len(data)))), pad_id)
    grouped = epoch_padding(padded_epoch(list(LengthGroupedSampler(4, lengths=data.lengths,
                                                                   generator=generator))), pad_id)
    packed = PackedDataset(data, max_seq_length=1024)
    order = list(RandomSampler(packed, generator=generator))
    pack_collate = PackedCollator(pad_id, RopeIndex(p.model().config))
    packed_padding = epoch_padding([pack_collate([packed[i] for i in order[k : k + 4]])
                                    for k in range(0, len(order), 4)], pad_id)
    print(f"{family}: padding padded {plain:.1%}, grouped {grouped:.1%}, packed {packed_padding:.1%}")
    assert packed_padding < 0.05
    assert grouped < 0.15
    assert plain > 0.15  # the examples do need grouping or packing


# ------------------------------------------------------------------ training


def test_train_with_packing_grouping_and_an_eval_split(tmp_path, caplog):
    """``vlmtune train --packing`` end to end: packs for training and evaluation, length grouping over packs, and
    the logged records/s counting records (not rows)."""
    import json

    from conftest import DATA_JSON

    from vlmtune.config import parse_train_args
    from vlmtune.stages.sft import train

    out = tmp_path / "out"
    args = parse_train_args(["--data_path", str(DATA_JSON), "--packing", "True", "--group_by_length", "True",
                             "--max_seq_length", "256", "--val_ratio", "0.25", "--eval_strategy", "steps",
                             "--eval_steps", "2", "--per_device_train_batch_size", "1", "--max_steps", "2",
                             "--logging_steps", "1", "--output_dir", str(out), "--use_cpu", "True",
                             "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True"])
    with caplog.at_level("INFO", logger="vlmtune"):
        train(*args)
    assert "packing: 9 records in" in caplog.text and "block mask" in caplog.text
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    assert evals and all(0 < e < 20 for e in evals)
    rates = [(e["samples_per_s"], e["tokens_per_s"]) for e in state["log_history"] if "samples_per_s" in e]
    assert rates and all(45 <= tokens / samples <= 113 for samples, tokens in rates)  # records 45-113 tokens; rows ~250
