"""The README's memory table: vlmtune's estimate for a 7B model against the common rule of thumb.

    .venv/bin/python bench/memory_rule_of_thumb.py [MODEL]

It prints, for five setups (full AMP, full pure bf16, LoRA, QLoRA 8-bit and 4-bit), the rule of thumb, the
estimate (``vlmtune.memory``), the static part and why the two differ.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from vlmtune.memory import GB, Estimate, Setup, estimate, format_count, load_config, model_shape, vision_tokens

RULE_OF_THUMB_7B_GB = {"full, fp32 weights + AMP": 120, "full, pure bf16": 60, "LoRA (bf16)": 16,
                       "QLoRA 8-bit": 10, "QLoRA 4-bit": 6}
"""The common rule-of-thumb table for a 7B model (e.g. LLaMA-Factory's README), in GB."""


def rule_of_thumb(model: str = "Qwen2.5-VL-7B", **overrides) -> list[tuple[str, float, Estimate, str]]:
    """The five rule-of-thumb rows for ``model``: (name, rule-of-thumb GB, estimate, why they differ)."""
    shape = model_shape(load_config(model))
    base = Setup(**{"batch_size": 1, "seq_len": 512, "images": 1, "image_pixels": 448 * 448,
                    "gradient_checkpointing": True, **overrides})
    setups = {
        "full, fp32 weights + AMP": replace(base, mode="full", precision="amp"),
        "full, pure bf16": replace(base, mode="full", precision="pure_bf16"),
        "LoRA (bf16)": replace(base, mode="lora", precision="bf16"),
        "QLoRA 8-bit": replace(base, mode="lora", precision="bf16", bits=8),
        "QLoRA 4-bit": replace(base, mode="lora", precision="bf16", bits=4),
    }
    params_b = shape.params / 1e9
    out = []
    for name, setup in setups.items():
        est = estimate(model, setup, shape)
        rule = RULE_OF_THUMB_7B_GB[name]
        why = [f"{params_b:.2f}B params, not 7B (vision tower {shape.by_part['vision'] / 1e9:.2f}B, embeddings "
               "and lm_head)"]
        if setup.mode == "full":
            why.append(f"vlmtune's full preset keeps the vision tower frozen ({shape.trainable['full'] / 1e9:.2f}B "
                       "trained)")
        if setup.mode != "full":
            lora_gb = sum(est.bytes(k) for k in ("lora adapters", "gradients", "optimizer states")) / GB
            lora = format_count(shape.lora(setup.mode, setup.lora_rank))
            why.append(f"LoRA rank {setup.lora_rank} on every linear: {lora}"
                       f" fp32 adapter params, {lora_gb:.1f} GB with gradients and AdamW")
        if setup.bits < 16:
            why.append(f"non-quantized weights upcast to fp32 (+{(shape.params - shape.quantizable) * 2 / GB:.1f} "
                       "GB vs bf16)")
        why.append(f"activations + logits {(est.bytes('activations') + est.bytes('vision')) / GB:.1f} + "
                   f"{est.bytes('logits + loss') / GB:.1f} GB at {setup.seq_len} text + "
                   f"{vision_tokens(shape, setup)} vision tokens")
        out.append((name, rule, est, "; ".join(w for w in why if w)))
    return out


def rule_of_thumb_table(model: str = "Qwen2.5-VL-7B", **overrides) -> str:
    rows = rule_of_thumb(model, **overrides)
    lines = [f"{model}: estimate vs the 7B rule of thumb (batch 1, gradient checkpointing, sdpa, no Liger)",
             f"{'setup':<28}{'rule GB':>8}{'est. GB':>9}{'static':>8}  why they differ"]
    for name, rule, est, why in rows:
        static = sum(est.bytes(k) for k in ("weights", "lora adapters", "gradients", "optimizer states"))
        lines.append(f"{name:<28}{rule:>8}{est.peak / GB:>9.1f}{static / GB:>8.1f}  {why}")
    lines.append("static = weights + adapters + gradients + optimizer states; est. = peak upper bound")
    return "\n".join(lines)


if __name__ == "__main__":
    print(rule_of_thumb_table(sys.argv[1] if len(sys.argv) > 1 else "Qwen2.5-VL-7B"))
