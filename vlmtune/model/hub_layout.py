"""Model folders in the layout of the family's hub checkpoints.

transformers 5.22 keeps Qwen3-VL-MoE's fused experts as ``[E, 2I, H]`` / ``[E, H, I]`` and writes them that way,
while the hub checkpoints store them transposed (``[E, H, 2I]`` / ``[E, I, H]``). transformers loads either layout
outside ZeRO-3 (it compares each tensor with the parameter's shape and transposes when they differ), but under
ZeRO-3 the parameter is partitioned and empty, so it always transposes: only the hub layout loads there. vLLM's
loader also expects the hub layout (it transposes what it reads). So every model folder vlmtune writes for use
elsewhere (a merged folder, the end of a full run, the tiny models) is rewritten into the hub layout after
``save_pretrained``. Checkpoints (``checkpoint-N``) stay as the Trainer writes them: they resume, they are not served.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.families import Family


def write_hub_layout(folder: str | Path, family: Family) -> int:
    """Transpose, in every ``*.safetensors`` file of ``folder``, the 3-D expert tensors named by
    ``family.hub_transposed`` from transformers' layout into the hub's; returns how many were rewritten."""
    if not family.hub_transposed:
        return 0
    from safetensors import safe_open
    from safetensors.torch import save_file

    done = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            keys = list(f.keys())
            if not any(k.endswith(family.hub_transposed) for k in keys):
                continue
            tensors = {k: f.get_tensor(k) for k in keys}
        for key in [k for k in keys if k.endswith(family.hub_transposed) and tensors[k].ndim == 3]:
            tensors[key] = tensors[key].transpose(1, 2).contiguous()
            done += 1
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
    return done
