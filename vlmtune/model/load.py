"""Load a Qwen-VL model and its processor: dtype, attention kernel, quantization and Liger."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path

import torch

from vlmtune.errors import ConfigError
from vlmtune.families import Family, family_for
from vlmtune.families.base import LINEAR_ATTENTION_KERNELS

logger = logging.getLogger(__name__)


def resolve_model_path(model_name_or_path: str | None, tiny_family: str = "qwen2_vl") -> str:
    """The model to load: the user's, or the embedded tiny model (built on first use)."""
    if model_name_or_path:
        return model_name_or_path
    from vlmtune.testing.tiny import tiny_model_path

    path = str(tiny_model_path(tiny_family))
    logger.info("no model given: using the embedded tiny %s model at %s (random weights)", tiny_family, path)
    return path


def load_config(model_path: str, what: str = "model"):
    """The model's config, or a ``ConfigError`` naming ``what`` (e.g. "--model X") when it is not a model: a
    missing folder, a folder without config.json, a config without a model_type, a Hub name that cannot load."""
    from transformers import AutoConfig

    path = Path(model_path)
    local = path.is_absolute() or model_path.startswith((".", "~")) or model_path.count("/") != 1
    if path.is_file():
        raise ConfigError(f"{what} is a file; give a model folder or a Hub name")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"{what} is not a model folder (no config.json); give a model folder or a training output")
    if not path.exists() and local:
        raise ConfigError(f"{what} does not exist; give a model folder or a Hub name (org/name)")
    try:
        return AutoConfig.from_pretrained(model_path)
    except ValueError as exc:  # a config.json without a model_type transformers knows
        raise ConfigError(f"{what}: its config.json is not a model's ({' '.join(str(exc).split())[:160]})") from None
    except OSError:
        raise ConfigError(f"{what} is not a folder here and cannot be loaded from the Hub (offline, or no such "
                          "model); give a model folder") from None


def load_family(model_path: str, what: str | None = None) -> Family:
    """The family named by the model's config (never guessed from the path); a model that is not one vlmtune
    trains raises ``ConfigError`` naming ``what`` (default: "model PATH")."""
    what = what or f"model {model_path}"
    try:
        return family_for(load_config(model_path, what))
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{what}: {exc}") from None


def load_for_data(model: str | None):
    """What checking or showing a data file needs of ``--model`` (``check-data``, ``view``): its resolved path,
    family, processor and the processor's pixel / frame budgets."""
    from vlmtune.data import media

    model_path = resolve_model_path(model)
    family = load_family(model_path, f"--model {model_path}")
    processor = load_processor(model_path)
    return model_path, family, processor, media.budget_from_processor(processor, family.factor)


def load_processor(model_path: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_path)


def choose_attention(requested: str | None, dtype: torch.dtype | None = None) -> str:
    """flash_attention_2 when it can run (CUDA, flash-attn installed, half precision), else sdpa; an explicit
    request is kept as given. flash-attn has no fp32 kernels: an fp32 model on it fails at its first forward."""
    if requested:
        return requested
    half = dtype in (torch.bfloat16, torch.float16)
    if half and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A dtype from a user's name for it (bfloat16, bf16, torch.float16, ...); None for an empty name."""
    if name is None or name == "":
        return None
    key = name.removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[key]


def saved_dtype(config) -> torch.dtype | None:
    """The dtype a model folder's weights were saved in. Qwen3-VL folders record it in ``text_config`` only."""
    for sub in (config, config.get_text_config()):
        dtype = getattr(sub, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return None


def liger_unavailable_reason(family: Family) -> str | None:
    """Why Liger cannot be applied here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device (Liger's Triton kernels need one)"
    try:
        module = importlib.import_module("liger_kernel.transformers")
        getattr(module, family.liger_patch)
    except ImportError as exc:
        return f"liger-kernel is not importable here ({exc}); pip install 'vlmtune[gpu]'"
    except AttributeError:
        return f"the installed liger-kernel has no {family.liger_patch}"
    return None


def apply_liger(family: Family, model) -> bool:
    """Patch the model with the family's Liger kernels when possible; one log line either way."""
    reason = liger_unavailable_reason(family)
    if reason:
        logger.info("Liger kernels off: %s", reason)
        return False
    patch = getattr(importlib.import_module("liger_kernel.transformers"), family.liger_patch)
    patch(model=model)
    logger.info("Liger kernels on (%s)", family.liger_patch)
    return True


def disable_kv_cache(model) -> None:
    """No KV cache while training. In transformers 5.22 the language model reads ``use_cache`` from
    ``text_config``, not the top config; a cache, even an empty one, also hides packed-record boundaries
    from the attention-mask builder."""
    config = model.config
    for sub in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if sub is not None and hasattr(sub, "use_cache"):
            sub.use_cache = False


MOE_UNQUANTIZED = ("bitsandbytes quantizes nn.Linear layers only, so the fused MoE experts (over 90% of the "
                   "weights) would stay in 16 bits")


def check_quantization(family: Family, bits: int) -> None:
    """Refuse QLoRA where bitsandbytes would leave most of the model unquantized."""
    if bits in (4, 8) and family.is_moe:
        raise ConfigError(f"--bits {bits} on {family.model_type}: {MOE_UNQUANTIZED} and PEFT's k-bit preparation "
                          "would upcast them to fp32; train MoE models with --bits 16")


def has_linear_attention(config) -> bool:
    """Whether a model config has linear-attention (Gated DeltaNet) layers: Qwen3.5's ``layer_types``."""
    return "linear_attention" in (getattr(config.get_text_config(), "layer_types", None) or ())


class _TransformersKernelFallback(logging.Filter):
    """Drops transformers' per-function fallback warnings; ``linear_attention_kernels`` says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "falling back to its reference PyTorch implementation" not in record.getMessage()


def linear_attention_kernels(family: Family, config) -> str | None:
    """One line on the Gated DeltaNet kernels a model with linear attention runs (None for other models):
    flash-linear-attention and causal-conv1d when they import (transformers picks them when its modeling module is
    imported, for every device), else transformers' PyTorch path."""
    if not has_linear_attention(config):
        return None
    missing = [pip for module, pip in LINEAR_ATTENTION_KERNELS if importlib.util.find_spec(module) is None]
    logging.getLogger("transformers.integrations.hub_kernels").addFilter(_TransformersKernelFallback())
    if not missing:
        return f"linear-attention kernels on ({', '.join(p for _, p in LINEAR_ATTENTION_KERNELS)})"
    where = "pip install 'vlmtune[gpu]' on a CUDA machine" if torch.cuda.is_available() else "CUDA only"
    return (f"linear-attention kernels off: {' and '.join(missing)} not installed ({where}); {family.model_type}'s "
            "Gated DeltaNet layers run transformers' PyTorch path (correct, much slower)")


def torch_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def quantization_skip_modules(family: Family) -> list[str]:
    """What QLoRA leaves unquantized: the vision tower (merger included) and the output head. Full module paths:
    transformers matches a pattern at the start or the end of a module's name, so a bare "visual" would miss
    "model.visual.blocks.0.attn.qkv" and quantize the whole vision side."""
    return [family.vision, family.lm_head]


def load_model(
    model_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    bits: int = 16,
    use_liger: bool = False,
    device_map: dict | None = None,
    kbit_training: bool = True,
):
    """(model, family) for training; quantized to 4/8 bits through bitsandbytes when asked (``kbit_training``:
    prepared for QLoRA by PEFT; off for a frozen model, e.g. an 8-bit teacher). ``device_map`` places the weights
    at load: a quantized model is loaded on its device, not moved there."""
    family = load_family(model_path)
    check_quantization(family, bits)
    kwargs = {"dtype": dtype, "attn_implementation": choose_attention(attn_implementation, dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if bits in (4, 8):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=bits == 4,
            load_in_8bit=bits == 8,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=quantization_skip_modules(family),
        )
    model = family.model_cls().from_pretrained(model_path, **kwargs)
    logger.info("loaded %s (%s) from %s: dtype %s, attention %s", family.model_class, family.model_type,
                Path(model_path).name or model_path, dtype, kwargs["attn_implementation"])
    if kernels := linear_attention_kernels(family, model.config):
        logger.info(kernels)
    if use_liger:
        apply_liger(family, model)
    if bits in (4, 8) and kbit_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, family
