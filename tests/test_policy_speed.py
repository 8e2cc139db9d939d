"""DPO and GRPO without repeated work (issue 21 §2): the vision tower once per distinct image or video (pairs,
groups), each pair's reference scored once per run, a batch's prompts sampled in one ``generate`` call, and the
vLLM path's prompts, stop tokens and weight syncs. Each against what the work gave when repeated: the model's plain
forward on every row's pixels, a reference forward at every step, one ``generate`` call per prompt."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import EXAMPLES

from vlmtune.config import ModeArguments, TrainingArguments
from vlmtune.data import media
from vlmtune.data.records import read_records
from vlmtune.stage_config import DPOArguments, GRPOArguments

PAIRS = ("pref_red_circle", "pref_video_left", "pref_text", "pref_image_and_video")  # no media shared


def setup(tiny_model_dir, family_name: str, mode: str = "lora_vision"):
    """(model with LoRA and the fused head, its B moved off zero; processor; family; budget; plan)."""
    from transformers import AutoModelForImageTextToText
    from trl.trainer.utils import disable_dropout_in_model

    from vlmtune.model import modes
    from vlmtune.model.load import load_family, load_processor
    from vlmtune.stages import reference as ref

    path = tiny_model_dir(family_name)
    processor, family = load_processor(str(path)), load_family(str(path))
    budget = media.budget_from_processor(processor, family.factor)
    torch.manual_seed(0)
    args = ModeArguments(mode=mode, lora_rank=8)
    plan = modes.plan_from_args(args)
    model = modes.apply_plan(AutoModelForImageTextToText.from_pretrained(path), family, plan, args)
    disable_dropout_in_model(model)
    ref.add_log_prob_head(model, "dpo")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model, processor, family, budget, plan


def pairs_dataset(processor, family, budget, ids=PAIRS):
    from vlmtune.data.conversation import Conversation
    from vlmtune.data.prompts import PreferenceDataset, stage_lengths

    records = [r for r in read_records(EXAMPLES / "preference.json", stage="dpo", budget=budget)[0] if r.id in ids]
    conversation = Conversation(processor)
    lengths = stage_lengths(records, conversation, budget, family, "dpo")[0]
    return PreferenceDataset(records, processor, family, budget, conversation, None, False, lengths)


def tower_patches(model) -> list[int]:
    """Patches the vision tower receives, call by call (a forward hook on the tower)."""
    from vlmtune.stages.reference import transformers_model

    calls: list[int] = []
    transformers_model(model).model.visual.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(args[0].shape[0]), with_kwargs=True)
    return calls


@pytest.mark.parametrize("family_name", ["qwen2_vl", pytest.param("qwen3_vl", marks=pytest.mark.slow)])
def test_the_tower_runs_once_per_distinct_item_with_the_plain_forwards_log_probs_and_gradients(
        tiny_model_dir, family_name):
    """lora_vision (the tower trains): DPO's pairs (chosen rows, then rejected) and GRPO-like groups (each row
    twice in a row) of image, video, image + video and text rows. The log-probs equal the model's plain
    forward on every row's pixels, the gradient of every trained tensor (tower, merger, LLM) too, and the tower
    sees each distinct item once. Qwen3-VL also feeds DeepStack features from the tower into the LLM."""
    from vlmtune.data.collator import Collator
    from vlmtune.data.prompts import PreferenceCollator
    from vlmtune.stages import reference as ref

    model, processor, family, budget, _ = setup(tiny_model_dir, family_name)
    dataset = pairs_dataset(processor, family, budget)
    pad = processor.tokenizer.pad_token_id
    items = [dataset[i] for i in range(len(dataset))]  # media decoded once
    pairs = PreferenceCollator(pad)(items)
    groups = Collator(pad)([item["chosen"] for item in items for _ in range(2)])
    calls = tower_patches(model)
    model.train()
    for batch, copies in ((pairs, 2), (groups, 2)):
        results = []
        for forward in ("plain", "once"):
            model.zero_grad()
            calls.clear()
            if forward == "plain":
                inputs = {k: v for k, v in batch.items() if k in ref.MODEL_KEYS}
                logps = model(**inputs, labels=batch["labels"], fused_lm_head=True, use_cache=False).log_probs
            else:
                logps = ref.token_log_probs(model, batch)
            (logps * torch.linspace(0.5, 1.5, logps.shape[1])).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((logps.detach(), grads, sum(calls)))
        (plain, plain_grads, plain_patches), (once, once_grads, once_patches) = results
        assert (once - plain).abs().max().item() <= 1e-6  # measured: 0.0 (bit-equal)
        assert plain_grads.keys() == once_grads.keys() and any("visual" in n for n in plain_grads)
        for name, grad in plain_grads.items():  # measured: at most 6.5e-7 of the tensor's largest entry
            assert (once_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
        assert once_patches * copies == plain_patches


def test_the_fused_head_is_fitted_to_the_cpu_and_the_vocabulary_only_within_the_context(tiny_model_dir):
    """Within ``fitted_fused_head`` TRL's fused head projects only labelled positions on a CPU and its tile is the
    tiny vocabulary's width (TRL's 32,768 before and after); the log-probs and gradients it gives are checked
    against TRL's own head in the tests around this one (float32 here, float64 for the shared prefix)."""
    from trl.trainer import utils

    from vlmtune.stages import reference as ref

    model, *_ = setup(tiny_model_dir, "qwen2_vl", "lora")
    vocab = model.config.get_text_config().vocab_size
    cpu = torch.device("cpu")
    assert vocab < 32768 and utils._CHUNKED_LOGPROB_CHUNK_SIZE == 32768 and not utils._use_triton(cpu)
    with ref.fitted_fused_head(model):
        assert utils._CHUNKED_LOGPROB_CHUNK_SIZE == vocab and utils._use_triton(cpu)
    assert utils._CHUNKED_LOGPROB_CHUNK_SIZE == 32768 and not utils._use_triton(cpu)


def test_each_pair_is_scored_by_the_reference_once_per_run(tiny_model_dir, tmp_path):
    """A LoRA run's reference (adapters off) scores each pair the first time a batch holds it; later batches of
    other compositions (another epoch) reuse the sums, and the loss equals the one with a reference forward at that
    step (a trainer that has seen nothing yet), within 1e-6."""
    from vlmtune.data.prompts import PreferenceCollator
    from vlmtune.stages import reference as ref
    from vlmtune.stages.dpo import DPOTrainer

    model, processor, family, budget, plan = setup(tiny_model_dir, "qwen2_vl", "lora")
    dataset = pairs_dataset(processor, family, budget)
    collate = PreferenceCollator(processor.tokenizer.pad_token_id)

    def trainer():
        return DPOTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                              report_to="none"),
                          train_dataset=dataset, data_collator=collate, processing_class=processor, family=family,
                          run_info={}, dpo=DPOArguments(beta=0.5),
                          reference=ref.Reference.adapters_off(model, family, plan, False, "test"))

    warm, fresh = trainer(), trainer()
    items = [dataset[i] for i in range(len(dataset))]
    model.train()
    with mock.patch.object(ref.Reference, "log_probs", autospec=True, side_effect=ref.Reference.log_probs) as scored:
        for indices in ([0, 1], [2, 3]):  # the first epoch: every pair is new
            warm.compute_loss(model, collate([items[i] for i in indices]))
        assert scored.call_count == 2
        batch = collate([items[i] for i in (3, 1, 2)])  # the next epoch, another order and padding
        kept = warm.compute_loss(model, dict(batch)).item()
        assert scored.call_count == 2
        scored_now = fresh.compute_loss(model, dict(batch)).item()
        assert scored.call_count == 3
    assert kept == pytest.approx(scored_now, abs=1e-6)


def grpo_trainer(model, processor, family, budget, tmp_path, **grpo):
    from vlmtune.data.conversation import Conversation
    from vlmtune.data.prompts import PromptDataset, collate_prompts, stage_lengths
    from vlmtune.rewards import Reward
    from vlmtune.stages.grpo import GRPOTrainer

    wanted = ("grpo_red_circle", "grpo_video_right", "grpo_triangle_sides")
    records = [r for r in read_records(EXAMPLES / "grpo.json", stage="grpo", budget=budget)[0] if r.id in wanted]
    conversation = Conversation(processor)
    dataset = PromptDataset(records, processor, family, budget, conversation, None, False,
                            stage_lengths(records, conversation, budget, family, "grpo")[0])
    length = Reward("length", lambda completions, **kw: [float(len(c)) for c in completions])
    trainer = GRPOTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                              report_to="none"),
                          train_dataset=dataset, data_collator=collate_prompts, processing_class=processor,
                          family=family, run_info={}, grpo=GRPOArguments(**grpo), rewards=[length])
    return trainer, collate_prompts([dataset[i] for i in range(len(dataset))])["prompts"]


def test_a_batch_of_prompts_is_sampled_in_one_call_as_each_prompt_alone(tiny_model_dir, tmp_path):
    """Image, video and text prompts of different lengths in one ``generate`` call (padded on the left), greedy
    (top_k 1): each prompt's completions are the ones ``generate`` gives that prompt alone, cut after the first end
    token, and the tower runs once per prompt (not once per completion)."""
    model, processor, family, budget, _ = setup(tiny_model_dir, "qwen2_vl", "lora")
    n = 3
    trainer, prompts = grpo_trainer(model, processor, family, budget, tmp_path, num_generations=n,
                                    max_completion_length=6, top_k=1)
    model.eval()
    eos = trainer.eos_ids
    calls = tower_patches(model)
    groups = trainer.sampler.sample(model, prompts, trainer)
    assert [len(g) for g in groups] == [n] * len(prompts)
    item_patches = sum(int(p[k].prod(-1).sum()) for p in prompts for k in ("image_grid_thw", "video_grid_thw")
                       if k in p)
    assert sum(calls) == item_patches
    for prompt, group in zip(prompts, groups):
        alone = {k: v[None] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
                 for k, v in prompt.items() if k != "record"}
        out = model.generate(**alone, do_sample=False, max_new_tokens=6, eos_token_id=eos,
                             pad_token_id=processor.tokenizer.pad_token_id,
                             suppress_tokens=trainer.vision_ids)[0, prompt["input_ids"].shape[0]:].tolist()
        ends = [i for i, t in enumerate(out) if t in eos]
        want = out[: ends[0] + 1] if ends else out
        assert all(c.tolist() == want for c in group)


class FakeEngine:
    """What ``VLLMSampler`` calls of TRL's ``VLLMGeneration``: ``sync_weights`` and ``generate`` (which answers
    each prompt with its last token, an end token and two more)."""

    def __init__(self, eos: int):
        self.eos, self.syncs, self.calls = eos, 0, []

    def sync_weights(self):
        self.syncs += 1

    def generate(self, prompts, images, num_generations):
        self.calls.append((prompts, images, num_generations))
        return prompts, [[p[-1], self.eos, 7, 8] for p in prompts], None, None


def test_vllm_gets_the_generate_prompts_stop_tokens_and_fresh_weights(tiny_model_dir, tmp_path):
    """The vLLM path (no GPU here, a stand-in engine): one call per batch with each prompt's processor ids (those
    HF ``generate`` gets) repeated num_generations times and its images, weights synced before the first sampling
    of each optimizer step only, completions cut after the end token; the engine is built to stop at the run's end
    tokens, those of the model's generation config."""
    from vlmtune.stages import grpo as grpo_stage

    model, processor, family, budget, _ = setup(tiny_model_dir, "qwen2_vl", "lora")
    n = 2
    trainer, prompts = grpo_trainer(model, processor, family, budget, tmp_path, num_generations=n,
                                    max_completion_length=4)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    with mock.patch("trl.generation.vllm_generation.VLLMGeneration") as built:
        grpo_stage.vllm_engine(trainer.grpo, trainer, trainer.eos_ids)
    assert built.call_args.kwargs["generation_kwargs"] == {"stop_token_ids": eos}
    assert built.call_args.kwargs["max_completion_length"] == 4

    engine = FakeEngine(eos[0])
    trainer.sampler = grpo_stage.VLLMSampler(trainer.grpo, budget, trainer.eos_ids, engine)
    trainer.state = SimpleNamespace(global_step=0)
    model.eval()
    for step in (0, 0, 1):  # two micro-batches of step 0, then step 1
        trainer.state.global_step = step
        groups = trainer._sample(model, prompts)
    assert engine.syncs == 2 and len(engine.calls) == 3
    ids, images, count = engine.calls[-1]
    assert count == n and ids == [p["input_ids"].tolist() for p in prompts for _ in range(n)]
    with_images = [bool(p["record"]["images"]) for p in prompts for _ in range(n)]
    assert [bool(i) for i in images] == with_images and any(with_images)
    assert all(len(i) == 1 and i[0].size[0] > 0 for i in images if i)
    assert [[c.tolist() for c in g] for g in groups] == [[[p["input_ids"][-1].item(), eos[0]]] * n for p in prompts]


def test_a_rollouts_forwards_keep_the_tower_outputs_and_each_prompts_positions(tiny_model_dir, tmp_path):
    """lora (the tower frozen), beta > 0 and two iterations (old-policy and reference forwards in the rollout): the
    tower runs in sampling only, once per prompt's item; the rows' positions are the model's own
    ``get_rope_index`` on the full rows; the old and reference log-probs equal the model's plain forward (every
    row's pixels, its own positions, log-softmax of its logits at every position); the loss and gradient equal
    those of the same batch without the kept outputs and positions."""
    from vlmtune.stages import reference as ref
    from vlmtune.stages import vision_once

    model, processor, family, budget, plan = setup(tiny_model_dir, "qwen2_vl", "lora")
    trainer, prompts = grpo_trainer(model, processor, family, budget, tmp_path, num_generations=2,
                                    max_completion_length=5, beta=0.1, num_iterations=2)
    trainer.reference = ref.Reference.adapters_off(model, family, plan, False, "test")
    calls = tower_patches(model)
    model.train()
    torch.manual_seed(0)
    batch = trainer._rollout(model, prompts, "train")
    assert sum(calls) == sum(int(p[k].prod(-1).sum()) for p in prompts for k in ("image_grid_thw", "video_grid_thw")
                             if k in p)
    assert vision_once.ENCODINGS in batch
    own, _ = model.get_base_model().model.get_rope_index(
        input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"], video_grid_thw=batch["video_grid_thw"],
        attention_mask=batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    assert torch.equal(batch["position_ids"][:, valid], own[:, valid])

    plain = {k: v for k, v in batch.items() if k in ref.MODEL_KEYS and k != "position_ids"}
    labels = batch["labels"][:, 1:]
    mask = labels != -100

    def log_softmax_of_logits():
        logits = model(**plain, use_cache=False).logits[:, :-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask

    with torch.no_grad():
        assert (batch["old_log_probs"] - log_softmax_of_logits()).abs().max() <= 1e-5  # measured: 4.8e-7
        with model.disable_adapter():
            assert (batch["ref_log_probs"] - log_softmax_of_logits()).abs().max() <= 1e-5

    batch["advantages"] = torch.linspace(-1, 1, batch["input_ids"].shape[0])
    results = []
    for inputs in (batch, {k: v for k, v in batch.items() if k not in (vision_once.ENCODINGS, "position_ids")}):
        calls.clear()
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(inputs))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads, len(calls)))
    (kept, kept_grads, kept_calls), (again, again_grads, again_calls) = results
    assert kept_calls == 0 and again_calls == 2 and kept != 0  # images and videos: one tower call each
    assert kept == pytest.approx(again, abs=1e-6)  # measured: 0.0, and the gradients bit-equal too
    assert kept_grads.keys() == again_grads.keys() and kept_grads
    for name, grad in again_grads.items():
        assert (kept_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_sampling_through_merged_lora_draws_the_adapters_completions_and_puts_the_weights_back(
        tiny_model_dir, tmp_path):
    """The sampler folds LoRA into the weights (no LoRA product runs while it samples): with the same seed, its
    sampled completions are those of ``generate`` through the adapters, the logits within float rounding, and
    afterwards every parameter is bit-equal to before, no layer is left merged and every module is in its place."""
    from trl.models.utils import unwrap_model_for_generation

    from vlmtune.data.collator import Collator
    from vlmtune.generation import left_padded, sample_group
    from vlmtune.stages.merged_lora import _mergeable, merged_for_sampling

    model, processor, family, budget, _ = setup(tiny_model_dir, "qwen2_vl", "lora")
    n, length = 3, 8
    trainer, prompts = grpo_trainer(model, processor, family, budget, tmp_path, num_generations=n,
                                    max_completion_length=length)
    with trainer._generation_model(model) as generator:  # TRL's unwrap skipped: the model it would give
        with unwrap_model_for_generation(model, trainer.accelerator) as unwrapped:
            assert generator is unwrapped is model and not model.training
    model.eval()
    layers = [layer for _, layer in _mergeable(model) or ()]
    assert layers and len(layers) == sum("lora_A" in name and name.endswith("weight")
                                         for name, _ in model.named_parameters())
    lora_calls = []
    for layer in layers:
        layer.lora_A["default"].register_forward_hook(lambda *a: lora_calls.append(1))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    modules = list(model.named_modules())
    pad = processor.tokenizer.pad_token_id
    batch = left_padded(Collator(pad)([{k: v for k, v in p.items() if k != "record"} for p in prompts]))

    torch.manual_seed(3)
    got = [c.tolist() for group in trainer.sampler.sample(model, prompts, trainer) for c in group]
    assert not lora_calls
    torch.manual_seed(3)
    want = [c.tolist() for c in sample_group(model, dict(batch), trainer.eos_ids, pad, trainer.vision_ids,
                                             max_new_tokens=length, repeat=n)]
    assert lora_calls and got == want and len({tuple(c) for c in got}) > 1
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        adapters = model(**inputs).logits
        with merged_for_sampling(model):
            merged = model(**inputs).logits
    assert (merged - adapters).abs().max() <= 1e-5
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert not any(layer.merged for layer in layers)
    assert list(model.named_modules()) == modules  # every LoRA layer back in its place


@pytest.mark.parametrize("family_name", ["qwen2_vl", pytest.param("qwen2_5_vl", marks=pytest.mark.slow),
                                         pytest.param("qwen3_vl", marks=pytest.mark.slow),
                                         pytest.param("qwen3_vl_moe", marks=pytest.mark.slow)])
def test_the_group_decoding_loop_samples_generates_completions_from_one_prefill_per_prompt(tiny_model_dir, tmp_path,
                                                                                         family_name):
    """``group_decoding.sample_groups`` (each prompt prefilled once, its cache repeated, one-token forwards) against
    HF ``generate`` with ``num_return_sequences`` through the same model, seeded alike: image, video and text
    prompts padded on the left, the video's temporal positions past the text after it (Qwen2-VL and Qwen2.5-VL,
    where a prefix's ``rope_deltas`` would move the completion's positions), top-k, top-p, a sequence bias,
    suppressed vision tokens (each a processor of generate's own); a prompt alone too (nothing padded): the same
    sampled ids, end tokens and padding after them included, the logits of every step within 1e-5, the prompts'
    prefill on one row each. Qwen2-VL here; Qwen2.5-VL, Qwen3-VL (DeepStack) and Qwen3-VL-MoE marked slow."""
    from vlmtune.data.collator import Collator
    from vlmtune.generation import left_padded
    from vlmtune.stages import group_decoding

    model, processor, family, budget, _ = setup(tiny_model_dir, family_name, "lora")
    n, length = 3, 10
    trainer, prompts = grpo_trainer(model, processor, family, budget, tmp_path, num_generations=n,
                                    max_completion_length=length)
    # and a prompt ending in a 32-frame video of small frames: its temporal positions outrun the text after it
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Where to?"},
                                                                       {"type": "video"}]}],
                                         add_generation_prompt=True, tokenize=False)
    video = processor(text=[text], videos=[torch.rand(32, 3, 56, 56, generator=torch.Generator().manual_seed(0))],
                      return_tensors="pt", return_mm_token_type_ids=True, videos_kwargs={"do_sample_frames": False})
    video = {k: v[0] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in video.items()}
    prompts = [{k: v for k, v in p.items() if k != "record"} for p in prompts] + [video]
    model.eval()
    base = model.get_base_model()
    own, _ = base.model.get_rope_index(input_ids=video["input_ids"][None],
                                       mm_token_type_ids=video["mm_token_type_ids"][None],
                                       video_grid_thw=video["video_grid_thw"], attention_mask=None)
    if family_name.startswith("qwen2"):  # (Qwen3-VL gives each frame a timestamp and its own temporal position 0)
        assert own.max() > own[:, 0, -1].max()  # generate continues from the last position, not from max + 1
    assert group_decoding.applies(model)
    pad = processor.tokenizer.pad_token_id
    batch = left_padded(Collator(pad)(prompts))
    batch.pop("labels", None)
    kwargs = {"temperature": 0.9, "top_k": 200, "top_p": 0.98, "max_new_tokens": length, "pad_token_id": pad,
              "eos_token_id": trainer.eos_ids, "suppress_tokens": trainer.vision_ids,
              "sequence_bias": {(trainer.eos_ids[0],): 3.0}}  # a processor more, and rows that end early
    logits: list[torch.Tensor] = []  # what the LM head gives at every step (the decoding loop calls it directly)
    base.get_output_embeddings().register_forward_hook(
        lambda module, args, out: logits.append(out.reshape(out.shape[0], -1, out.shape[-1])[:, -1].clone()))
    rows: list[int] = []  # the language model's (rows, tokens) at every step

    def decoder_rows(module, args, kwargs):
        rows.append((kwargs["inputs_embeds"] if kwargs.get("input_ids") is None else kwargs["input_ids"]).shape[:2])

    base.get_decoder().register_forward_pre_hook(decoder_rows, with_kwargs=True)

    def both(batch):
        """(generate's ids and logits, sample_groups' ids and logits) for ``batch``, seeded alike."""
        logits.clear()
        torch.manual_seed(5)
        want = model.generate(**batch, do_sample=True, num_return_sequences=n, **kwargs)
        want_logits, logits[:] = list(logits), []
        rows.clear()
        torch.manual_seed(5)
        got = group_decoding.sample_groups(model, dict(batch), n, **kwargs)
        assert rows[0] == batch["input_ids"].shape and all(r == (len(got), 1) for r in rows[1:])  # a prefill each
        return want[:, batch["input_ids"].shape[1]:], want_logits, got, list(logits)

    # one prompt alone (no row padded: the mask the model would skip), then all of them
    first = left_padded(Collator(pad)(prompts[:1]))
    first.pop("labels", None)
    want, want_logits, got, logits_got = both(first)
    assert bool(first["attention_mask"].all()) and torch.equal(got, want)
    assert max((a - b).abs().max().item() for a, b in zip(logits_got[1:], want_logits[1:])) <= 1e-5
    want, want_logits, got, logits[:] = both(batch)
    assert torch.equal(got, want) and len({tuple(r) for r in got.tolist()}) > n
    eos = torch.isin(want, torch.tensor(trainer.eos_ids))
    ends = [int(flags.nonzero()[0]) if flags.any() else length for flags in eos]
    assert min(ends) < length - 1  # some rows end early: what follows their end token is padding
    assert all((row[end + 1:] == pad).all() for row, end in zip(want, ends))
    assert len(logits) == len(want_logits)
    assert (logits[0].repeat_interleave(n, 0) - want_logits[0]).abs().max() <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(logits[1:], want_logits[1:])) <= 1e-5


@pytest.mark.parametrize("family_name, mode", [
    ("qwen2_vl", "lora"), ("qwen2_vl", "lora_vision"), ("qwen2_vl", "full"),
    pytest.param("qwen2_5_vl", "lora_vision", marks=pytest.mark.slow),
    pytest.param("qwen3_vl", "lora_vision", marks=pytest.mark.slow)])
def test_grpo_rows_share_their_prompts_forward_with_the_plain_forwards_log_probs_and_gradients(
        tiny_model_dir, tmp_path, family_name, mode):
    """``shared_prefix``: image, video and text prompts of different lengths, 3 completions each of different
    lengths (0 to 6 tokens), padded on the right (as GRPO's rows; lora_vision: and on the left), positions from
    the model's own ``get_rope_index`` on the full rows. Against the model's plain forward on the full rows (every
    row's pixels, the model's own positions): per-token log-probs within 1e-6 and the gradient of every trained
    tensor (LoRA; the tower too in lora_vision; every weight in full) within 1e-5 of its largest entry; the prefix
    forward runs on one row per prompt; not under gradient checkpointing. Qwen2.5-VL and Qwen3-VL (DeepStack) in
    lora_vision. Fails with the suffix's positions one off (0.2) or no gradient through the prefix."""
    from vlmtune.data.collator import Collator
    from vlmtune.data.prompts import completion_row
    from vlmtune.generation import left_padded
    from vlmtune.stages import reference as ref
    from vlmtune.stages import shared_prefix

    model, processor, family, budget, _ = setup(tiny_model_dir, family_name, mode)
    _, prompts = grpo_trainer(model, processor, family, budget, tmp_path, num_generations=3)
    model.double()  # float64: rounding far below the bounds (float32 measured 9.5e-7 and 1.2e-6 of them)
    prompts = [{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in p.items()}
               for p in prompts]
    n = 3
    words = processor.tokenizer(" the red circle is left of a small green square", add_special_tokens=False).input_ids
    lengths = [[4, 0, 6], [1, 5, 2], [6, 3, 4]]
    rows = [completion_row(p, torch.tensor(words[i:i + k], dtype=torch.long)) for p, ks in zip(prompts, lengths)
            for i, k in enumerate(ks)]
    right = Collator(processor.tokenizer.pad_token_id)(rows)
    base = model.get_base_model() if mode != "full" else model
    prefix_rows: list[int] = []
    base.model.register_forward_pre_hook(lambda module, args, kwargs: prefix_rows.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    model.train()
    for batch in (right, left_padded(dict(right))) if mode == "lora_vision" else (right,):
        batch["position_ids"], _ = base.model.get_rope_index(
            input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"], video_grid_thw=batch["video_grid_thw"],
            second_per_grid_ts=batch.get("second_per_grid_ts"), attention_mask=batch["attention_mask"])
        batch[shared_prefix.PROMPTS] = shared_prefix.prompt_inputs(prompts, n)
        assert shared_prefix.applies(model, batch)
        weights = torch.linspace(0.5, 1.5, batch["input_ids"].shape[1] - 1)
        results = []
        for forward in ("plain", "shared"):
            model.zero_grad()
            prefix_rows.clear()
            if forward == "plain":
                inputs = {k: v for k, v in batch.items() if k in ref.MODEL_KEYS and k != "position_ids"}
                logps = model(**inputs, labels=batch["labels"], fused_lm_head=True, use_cache=False).log_probs
            else:
                logps = ref.token_log_probs(model, batch)
                assert prefix_rows[0] == len(prompts)  # the prefix: one row per prompt
            (logps * weights).sum().backward()
            results.append((logps.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                                             if p.grad is not None}))
        (plain, plain_grads), (shared, shared_grads) = results
        assert (plain != 0).sum() == sum(map(sum, lengths))
        assert (shared - plain).abs().max().item() <= 1e-6  # measured: 0.0
        assert plain_grads.keys() == shared_grads.keys()
        assert any("visual" in k for k in plain_grads) == (mode != "lora")
        for name, grad in plain_grads.items():
            assert (shared_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name  # measured: 1.5e-7
    base.gradient_checkpointing_enable()
    assert not shared_prefix.applies(model, batch)  # checkpointed layers drop the cache: the plain forward runs
