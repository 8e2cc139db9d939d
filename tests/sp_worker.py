"""One rank of tests/test_sequence_parallel.py: every case of the spec file (family, mode, gradient checkpointing)
on one process start, through vlmtune's sequence-parallel forward; the group's summed gradients go to a file.

Run as ``python tests/sp_worker.py SPEC OUT`` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def build(case: dict):
    """The case's model, made trainable as its mode says (same seed: the same weights and LoRA init everywhere)."""
    from transformers import AutoModelForImageTextToText

    from vlmtune.config import ModeArguments
    from vlmtune.model import modes
    from vlmtune.model.load import load_family

    family = load_family(case["model_dir"])
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(case["model_dir"], attn_implementation="sdpa",
                                                        dtype=torch.float32)
    args = ModeArguments(mode=case["mode"], lora_rank=4, lora_dropout=0.0)
    model = modes.apply_plan(model, family, modes.plan_from_args(args), args)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero: give it values, so every LoRA weight has a gradient to check
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    if case["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model, family


def dpo_step(case: dict, model, family, batch: dict, group) -> dict:
    """vlmtune's DPO step under sequence parallelism: the policy's and the reference's (adapters off) summed
    reply log-probs over the group, the sigmoid loss, scaled by 1 / group size as ``policy_training_step``
    scales it; the group's summed gradients."""
    from vlmtune.config import ModeArguments
    from vlmtune.model import modes
    from vlmtune.stage_config import DPOArguments
    from vlmtune.stages import reference as ref
    from vlmtune.stages.dpo import dpo_loss

    plan = modes.plan_from_args(ModeArguments(mode=case["mode"], lora_rank=4, lora_dropout=0.0))
    reference = ref.Reference.adapters_off(model, family, plan, False, "sp_worker")
    ref_chosen, ref_rejected = reference.log_prob_sums(model, batch, None, group).chunk(2)
    chosen, rejected = ref.log_prob_sums(model, batch, group).chunk(2)
    loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, DPOArguments(beta=case["dpo_beta"])).mean()
    (loss / group.size).backward()
    return {"loss": float(loss.detach()), "grads": summed_grads(model, group)}


def summed_grads(model, group) -> dict:
    """Every trainable parameter's gradient, summed over the group."""
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            dist.all_reduce(grad, group=group.process_group)
            grads[name] = grad
    return grads


def main(spec_path: str, out_path: str) -> None:
    from vlmtune.model import sequence_parallel as sp

    dist.init_process_group("gloo")
    spec = torch.load(spec_path, weights_only=False)
    group = sp.init_group(dist.get_world_size())
    results = {}
    for case in spec["cases"]:
        model, family = build(case)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        language_model = base.get_submodule(family.language_model)
        sp.install(base, language_model, group, "sdpa")
        batch = dict(spec["batches"][case.get("batch", case["family"])])
        if "dpo_beta" in case:
            results[case["name"]] = dpo_step(case, model, family, batch, group)
            del model
            continue
        labels = batch.pop("labels")
        targets = sp.local_targets(labels, group)
        out = model(**batch, use_cache=False)
        loss = sp.chunk_loss(out.logits, targets, sp.count_targets(labels))
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group.process_group)
        results[case["name"]] = {"loss": float(total), "grads": summed_grads(model, group)}
        del model
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main(sys.argv[1], sys.argv[2])
