"""Where bf16 and float32 part on a model folder: greedy ids, each step's top-5 tokens with their log-probs, and
(MoE models) each MoE layer's router margin, the last chosen expert's probability minus the first unchosen one's,
at the position being decoded.

    python bench/router_margins.py outputs/serve_vllm/merged-qwen3_5_moe [--steps 16]
    python bench/router_margins.py outputs/serve_vllm/merged-qwen3_5 --results bench/results/vllm-cpu-2026-12-07.json

With --results (a bench/serve_vllm.sh results file), it also feeds vLLM's greedy ids for the folder's family back
through transformers (teacher forcing) and prints, per step, the rank of vLLM's token among transformers'
predictions and its log-prob gap to transformers' top token: rank 0 everywhere but at a near-tie means both follow
the same model from the same prefix.

It asks the question bench/serve_vllm.sh asks (data_examples/images/red_circle.png, "What shape is in the
picture?"). A margin that is small in float32 and 0 in bf16 is an exact tie that bf16 rounding creates: torch.topk
then keeps the other expert, and bf16 greedy decoding parts from the float32 one from that step on.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "data_examples" / "images" / "red_circle.png"
QUESTION = "What shape is in the picture?"


def run(folder: str, dtype: torch.dtype, steps: int, forced: list[int] | None = None) -> dict:
    """Greedy ``steps`` tokens in ``dtype`` with each step's top-5 ids and router margins per MoE layer; with
    ``forced`` ids, each one's rank and log-prob gap to the top token when the ids before it are given."""
    processor = AutoProcessor.from_pretrained(folder)
    content = [{"type": "image", "image": str(IMAGE)}, {"type": "text", "text": QUESTION}]
    messages = [{"role": "user", "content": content}]
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).eval()
    batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate") and hasattr(m, "top_k")]
    margins = []

    def record(module, _inputs, outputs):
        probs = outputs[0][-1].float().softmax(-1).sort(descending=True).values
        margins.append(round(float(probs[module.top_k - 1] - probs[module.top_k]), 5))

    hooks = [m.register_forward_hook(record) for m in routers]
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    for hook in hooks:
        hook.remove()
    n = len(routers)
    res = {"ids": out.sequences[0, batch["input_ids"].shape[1]:].tolist(),
            "top5": [s[0].float().topk(5).indices.tolist() for s in out.scores],
            "top5_logprobs": [[round(v, 4) for v in s[0].float().log_softmax(-1).topk(5).values.tolist()]
                              for s in out.scores],
            "router_margins": [margins[i * n:(i + 1) * n] for i in range(len(out.scores))]}
    if forced:
        prompt = batch["input_ids"].shape[1]
        ids = torch.cat([batch["input_ids"], torch.tensor([forced])], 1)
        extra = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "mm_token_type_ids" in batch:
            pad = torch.zeros(1, len(forced), dtype=batch["mm_token_type_ids"].dtype)
            extra["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], pad], 1)
        with torch.no_grad():
            logp = model(**{**batch, **extra}).logits[0, prompt - 1:-1].float().log_softmax(-1)
        res["forced_rank"] = [int((row > row[t]).sum()) for row, t in zip(logp, forced)]
        res["forced_gap"] = [round(float(row.max() - row[t]), 4) for row, t in zip(logp, forced)]
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--results", help="a bench/serve_vllm.sh results file: teacher-force its vLLM ids")
    args = parser.parse_args()
    forced = None
    if args.results:
        family = json.loads((Path(args.folder) / "config.json").read_text())["model_type"]
        forced = json.loads(Path(args.results).read_text())["families"][family]["answer_ids_vllm"]
    res = {name: run(args.folder, dtype, args.steps, forced) for name, dtype in (("float32", torch.float32),
                                                                                 ("bfloat16", torch.bfloat16))}
    a, b = res["float32"]["ids"], res["bfloat16"]["ids"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    res["first_difference_at"] = first
    print(json.dumps(res))
    if forced:
        for name in ("float32", "bfloat16"):
            print(f"vLLM's ids through transformers {name}: ranks {res[name]['forced_rank']}"
                  f" log-prob gaps {res[name]['forced_gap']}")
    for i in range(min(len(a), len(b), (first if first is not None else len(a)) + 1)):
        for name in ("float32", "bfloat16"):
            r = res[name]
            print(f"step {i} {name}: top5 {r['top5'][i]} log-probs {r['top5_logprobs'][i]}"
                  f" router margins {r['router_margins'][i]}")


if __name__ == "__main__":
    main()
