"""The run folder: what a training run saves, and how resume, merge, predict and eval read it back.

A run's output folder (and each ``checkpoint-N`` inside it) holds:

* the model: PEFT adapter files (``adapter_config.json`` + weights) for LoRA runs, the whole model otherwise;
* ``non_lora_trainables.safetensors``: in LoRA runs, the parameters that trained fully beside the adapters (the
  merger, top layers), under the base model's in-memory names;
* the processor, with the pixel and frame budgets the run trained with;
* ``vlmtune_run.json``: the stage, base model, family, training plan, dtype, quantization bits and the budget
  options the user set (some, such as ``nframes`` or fixed image sizes, have no field in the processor's files);
  ``init_run`` when the run started from another LoRA run (DPO / GRPO after SFT): that run's adapters were merged
  into the base model first, and are merged again whenever this run's adapters are loaded;
* ``mixture.json`` (the output folder only, runs on a list of data files): what was drawn from each file.

Every file name of the run folder is defined here. Everything that writes or reads the run's metadata and model
lives here, so the commands that need them (train, merge, predict, eval) never import one another; the checkpoint
lifecycle (staging, publish, rotation, resume) and the run lock are in ``vlmtune.checkpoints``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmtune.data import media
from vlmtune.errors import ConfigError, MergeError
from vlmtune.families import Family
from vlmtune.model import modes, reward
from vlmtune.model.load import DTYPES, dtype_name, load_family, load_model, parse_dtype, saved_dtype

logger = logging.getLogger(__name__)

RUN_FILE = "vlmtune_run.json"
NON_LORA_FILE = "non_lora_trainables.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PROCESSOR_FILE = "processor_config.json"
MIXTURE_FILE = "mixture.json"
"""Runs on a list of data files: what was drawn from each (``data/mixture.py``), written when the run starts."""
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
CHECKPOINT_PREFIX = "checkpoint"
"""transformers' ``PREFIX_CHECKPOINT_DIR``: checkpoints are ``checkpoint-<global step>``."""
STAGING_PREFIX = "tmp-checkpoint"
"""A checkpoint being written: ``tmp-checkpoint-N/checkpoint-N``, renamed to ``checkpoint-N`` when complete."""
TRAINER_STATE = "trainer_state.json"
LOCK_FILE = ".vlmtune.lock"
LOG_FILE = "log_history.jsonl"
"""One line per logging step, written while the run goes (``vlmtune plot`` reads it)."""
PLOT_FILE = "plots/run.png"
"""The run's plots, drawn at its end and by ``vlmtune plot``."""
PREDICTIONS_FILE = "eval_predictions.jsonl"
"""``--eval_generate``: the predictions of each evaluation."""
REF_FILE = "ref_log_probs.safetensors"
"""DPO ``--precompute_ref_log_probs``: reference log-probs (chosen, rejected) per pair, beside each checkpoint."""
COMPLETIONS_FILE = "completions.jsonl"
"""GRPO ``--log_completions``: sample completions of each logging step, with their rewards and advantages."""


@dataclass
class RunInfo:
    """What a training output (or checkpoint) folder holds."""

    folder: Path
    info: dict
    has_adapter: bool
    has_model: bool

    @property
    def run_dtype(self) -> torch.dtype | None:
        name = self.info.get("dtype")
        return DTYPES.get(name) if name else None

    @property
    def plan(self) -> modes.TrainPlan | None:
        """The training plan recorded in ``vlmtune_run.json`` (None when absent or unreadable)."""
        try:
            return modes.TrainPlan(**self.info["plan"])
        except (KeyError, TypeError):
            return None

    @property
    def template_options(self) -> dict:
        """The chat-template switches the run trained with (e.g. ``enable_thinking``), as ``Conversation`` takes
        them."""
        return dict(self.info.get("template_options") or {})

    @property
    def budget_overrides(self) -> dict:
        """The pixel / frame budget options the run was trained with (names of ``DataArguments``)."""
        return dict(self.info.get("budget") or {})


def run_record(*, stage: str, base_model: str, family: Family, plan: modes.TrainPlan, dtype: torch.dtype,
               bits: int, budget_overrides: dict, **extra) -> dict:
    """The content of ``vlmtune_run.json`` for a run."""
    return {
        "stage": stage, "base_model": base_model, "model_type": family.model_type, "plan": plan.__dict__.copy(),
        "budget": {k: v for k, v in budget_overrides.items() if v is not None}, "lora": plan.uses_lora,
        "dtype": dtype_name(dtype), "bits": bits, **extra,
    }


def save_run_files(output_dir: str | Path, model: torch.nn.Module, info: dict,
                   state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``vlmtune_run.json`` and, in LoRA runs, the non-LoRA trainables beside what the Trainer saved; a reward
    model's head goes to its own file (``model.reward``)."""
    if reward.has_head(model):
        reward.save_head(output_dir, state_dict if state_dict is not None else
                         {n: p for n, p in model.named_parameters() if reward.is_head_name(n)})
    if info.get("lora"):
        trainable = {n for n, p in model.named_parameters()
                     if p.requires_grad and not modes.is_lora_name(n) and not reward.is_head_name(n)}
        if trainable:
            state = state_dict if state_dict is not None else model.state_dict()
            tensors = {modes.clean_name(n): state[n].detach().cpu().contiguous() for n in sorted(trainable)}
            save_file(tensors, os.path.join(output_dir, NON_LORA_FILE), metadata={"format": "pt"})
    Path(output_dir, RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")


def write_mixture(output_dir: str | Path, drawn: dict) -> None:
    """Write ``mixture.json``: the seed, and per file (train, eval) the weight or count asked, its valid and
    held-out records, how many were drawn and which (file record indices, or their digest in large draws)."""
    if drawn:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        Path(output_dir, MIXTURE_FILE).write_text(json.dumps(drawn, indent=1) + "\n")


def load_non_lora_trainables(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved non-LoRA trainables into a model strictly: an unknown key or a shape change raises."""
    params = {modes.clean_name(n): p for n, p in model.named_parameters()}
    params.update({modes.clean_name(n): b for n, b in model.named_buffers()})
    unknown = sorted(k for k in tensors if k not in params)
    if unknown:
        raise KeyError(f"{len(unknown)} saved weight(s) match no parameter of the model: {unknown[:10]}")
    bad = sorted(k for k, v in tensors.items() if params[k].shape != v.shape)
    if bad:
        raise ValueError(f"shape mismatch for saved weight(s) {bad[:10]}")
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value.to(params[key].dtype))


def restore_non_lora_trainables(checkpoint: str | Path, peft_model: torch.nn.Module) -> None:
    """Resume: copy a checkpoint's non-LoRA trainables (if it has any) into the wrapped model."""
    path = Path(checkpoint, NON_LORA_FILE)
    if path.is_file():
        load_non_lora_trainables(peft_model.get_base_model(), load_file(str(path)))


# ---------------------------------------------------------------- reading a run back


def read_run(folder: str | Path) -> RunInfo:
    """Inspect a training output or checkpoint folder; user mistakes raise ``ConfigError``."""
    path = Path(folder)
    if not path.exists():
        raise ConfigError(f"run folder {path} does not exist; give a training output or checkpoint folder")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file; give the training output or checkpoint folder that holds it")
    info: dict = {}
    run_file = path / RUN_FILE
    if run_file.is_file():
        try:
            info = json.loads(run_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{run_file}: invalid JSON ({exc.msg} at line {exc.lineno}); fix or delete it and "
                              "pass --base_model") from None
    has_adapter = (path / ADAPTER_CONFIG).is_file()
    has_model = (path / "config.json").is_file()
    if not has_adapter and not has_model:
        raise ConfigError(f"{path} holds neither LoRA adapters ({ADAPTER_CONFIG}) nor a model (config.json); "
                          "give a training output or checkpoint-N folder")
    weights = ADAPTER_WEIGHTS if has_adapter else MODEL_WEIGHTS
    if not any((path / name).is_file() for name in weights):
        held = ADAPTER_CONFIG if has_adapter else "config.json"
        raise ConfigError(f"run {path} lacks {weights[0]} (the {'LoRA' if has_adapter else 'model'} weights beside "
                          f"its {held}): the run is incomplete or the file was moved; give a complete training "
                          "output or checkpoint-N folder")
    return RunInfo(path, info, has_adapter, has_model)


def check_inference_source(model: str | None, adapter: str | None, flags: tuple[str, str] = ("--model", "--adapter")
                           ) -> None:
    """What ``load_for_inference`` will load, checked without loading it: the run folder and its files, the base
    model, or the model folder; a ``ConfigError`` names the flag. Cheap (config files only)."""
    if not model and not adapter:
        raise ConfigError(f"give {flags[0]} (a model folder, or a training output with adapters)")
    if model and not adapter and _is_adapter_run(Path(model)):
        model, adapter, flags = None, model, (flags[1], flags[0])
    if adapter:
        run = read_run(adapter)
        if not run.has_adapter:
            raise ConfigError(f"{flags[1]} {adapter} holds no LoRA adapters ({ADAPTER_CONFIG}); it is a full model: "
                              f"pass it as {flags[0]}")
        load_family(base_model_of(run, model), f"the base model of {adapter}")
    else:
        load_family(model, f"{flags[0]} {model}")
        if Path(model).is_dir() and not any(Path(model, name).is_file() for name in MODEL_WEIGHTS):
            raise ConfigError(f"{flags[0]} {model} holds config.json but no weights ({MODEL_WEIGHTS[0]}); give a "
                              "complete model folder")


def _is_adapter_run(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def base_model_of(run: RunInfo, base_model: str | None) -> str:
    """The base model: ``base_model`` if given, else the one ``vlmtune_run.json`` names; checked to exist."""
    base = base_model or run.info.get("base_model")
    if not base:
        hint = ""
        adapter_config = run.folder / ADAPTER_CONFIG
        if adapter_config.is_file():
            named = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
            hint = f" (its {ADAPTER_CONFIG} names {named!r})" if named else ""
        raise ConfigError(f"{run.folder} has no {RUN_FILE} saying which base model it was trained on{hint}: "
                          "pass --base_model")
    if not Path(base).is_dir():
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(base)
        except OSError:
            raise ConfigError(f"base model {base!r} is not a folder here and cannot be loaded (offline?); "
                              "pass --base_model with the local folder of the model the run trained") from None
    return str(base)


def start_of(model_name_or_path: str) -> tuple[str, RunInfo | None]:
    """Where a training run starts: (base model, None) for a model folder or hub name; (its base model, the run)
    for a LoRA run's output folder (e.g. an SFT run), whose adapters are then merged into the base first."""
    path = Path(model_name_or_path)
    if not _is_adapter_run(path):
        return model_name_or_path, None
    init_run = read_run(path)
    return base_model_of(init_run, None), init_run


def load_base_of(run: RunInfo, base_model: str, dtype: torch.dtype, **load_kwargs):
    """(the model a run's adapters were trained on, family): the base model, with the adapters of the run it
    started from (``init_run``, recursively) merged in."""
    init = run.info.get("init_run")
    if not init:
        return load_model(base_model, dtype=dtype, **{"attn_implementation": "sdpa", **load_kwargs})
    peft_model, family = load_model_with_adapters(read_run(init), base_model, dtype, **load_kwargs)
    return peft_model.merge_and_unload(), family


def load_model_with_adapters(run: RunInfo, base_model: str, dtype: torch.dtype,
                             device: str | torch.device = "cpu", bits: int = 16, **load_kwargs):
    """(PeftModel with the run's adapters and non-LoRA trainables restored, family), strictly; ``bits`` 4 or 8:
    on the base quantized as QLoRA training quantized it.

    Raises ``MergeError`` naming the keys when an adapter weight or a saved trainable does not match the base
    model, or when a trainable the run's plan trained is missing from ``non_lora_trainables.safetensors``.
    ``load_kwargs`` go to ``load_model`` (attention kernel, Liger).
    """
    from peft import PeftConfig, PeftModel

    family = load_family(base_model)
    recorded = run.info.get("model_type")
    if recorded and recorded != family.model_type:
        raise MergeError(f"{run.folder} was trained on a {recorded} model but the base model {base_model} is "
                         f"{family.model_type}; pass the right --base_model")
    model, family = load_base_of(run, base_model, dtype, bits=bits, **load_kwargs)
    if bits not in (4, 8):  # a quantized model stays where bitsandbytes put it
        model.to(device)
    model.eval()

    peft_config = PeftConfig.from_pretrained(str(run.folder))
    peft_config.inference_mode = True
    try:
        peft_model = PeftModel(model, peft_config)
    except ValueError as exc:  # target modules not in this base model
        raise MergeError(f"the adapters in {run.folder} do not fit the base model {base_model}: {exc}") from None
    result = peft_model.load_adapter(str(run.folder), "default", torch_device=str(device))
    unexpected = [k for k in result.unexpected_keys if ".lora_" in k or "lora_magnitude" in k]
    if result.missing_keys or unexpected:
        raise MergeError(f"the adapters in {run.folder} do not match the base model {base_model}: "
                         f"missing {sorted(result.missing_keys)[:10]}, unexpected {sorted(unexpected)[:10]}")
    peft_model.eval()

    base = peft_model.get_base_model()
    trainables_file = run.folder / NON_LORA_FILE
    saved: dict[str, torch.Tensor] = load_file(str(trainables_file)) if trainables_file.is_file() else {}
    plan = run.plan
    missing: list[str] = []
    if plan is None:
        logger.warning("%s records no readable training plan: cannot check that every fully trained part was "
                       "saved; restoring the %d tensors of %s as they are", run.folder, len(saved), NON_LORA_FILE)
    else:
        missing = sorted(modes.fully_trained_names(base, family, plan) - set(saved))
    where = trainables_file if trainables_file.is_file() else f"{trainables_file} (absent)"
    lacks = (f"the run trained {len(missing)} parameter(s) fully ({plan.describe()}) that it lacks: {missing[:10]}"
             if missing else "")
    if saved:
        try:
            load_non_lora_trainables(base, saved)
        except (KeyError, ValueError) as exc:
            message = exc.args[0] if exc.args else str(exc)
            raise MergeError(f"{where}: {message}{'; ' + lacks if lacks else ''}; it does not fit the base model "
                             f"{base_model}, nothing merged") from None
    if missing:
        raise MergeError(f"{where}: {lacks}; nothing merged")
    logger.info("loaded %s + adapters from %s (%d LoRA layers, %d non-LoRA tensors restored)", base_model,
                run.folder, sum(1 for n, _ in base.named_modules() if n.endswith(".lora_A")), len(saved))
    return peft_model, family


def load_run_processor(run: RunInfo | None, base_model: str):
    """The processor to serve a run with: the one saved with the run (it carries the training budgets), else the
    base model's."""
    from transformers import AutoProcessor

    source = str(run.folder) if run is not None and (run.folder / PROCESSOR_FILE).is_file() else base_model
    return AutoProcessor.from_pretrained(source)


def run_budget(run: RunInfo | None, processor, family: Family, **overrides) -> media.MediaBudget:
    """The budgets a run trained with: the processor's, the run's recorded options on top, then ``overrides``."""
    values = run.budget_overrides if run is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return media.budget_from_processor(processor, family.factor, **values)


@dataclass
class Loaded:
    """A model ready for generation, with the processor, family and budgets it was trained with."""

    model: torch.nn.Module
    processor: object
    family: Family
    budget: media.MediaBudget
    source: str
    template_options: dict = field(default_factory=dict)
    """The chat-template switches the run trained with (``vlmtune_run.json``); empty for a model without a run."""


def load_for_inference(model: str | None, adapter: str | None = None, *, dtype: str | None = None,
                       device: str | None = None, budget_overrides: dict | None = None) -> Loaded:
    """A standalone model folder (base, merged, full fine-tune), or a base model with a run's adapters merged in
    memory (``adapter``, or ``model`` when it is a training output), on ``device`` in eval mode."""
    from transformers import AutoConfig

    check_inference_source(model, adapter)
    if model and reward.is_seq_cls_folder(model):
        raise ConfigError(f"{model} is a reward model in the sequence-classification layout (no LM head): it scores "
                          "replies, it does not generate them; give it as --reward_model")
    if model and not adapter and _is_adapter_run(Path(model)):
        model, adapter = None, model  # a training output: its run file names the base model
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if adapter:
        run = read_run(adapter)
        base = base_model_of(run, model)
        work_dtype = parse_dtype(dtype) or run.run_dtype or torch.float32
        peft_model, family = load_model_with_adapters(run, base, work_dtype, device)
        loaded = peft_model.merge_and_unload()
        processor = load_run_processor(run, base)
        source = f"{base} + adapters from {adapter}"
    else:
        config = AutoConfig.from_pretrained(model)
        run = read_run(model) if Path(model, RUN_FILE).is_file() else None
        loaded, family = load_model(model, dtype=parse_dtype(dtype) or saved_dtype(config) or torch.float32)
        processor = load_run_processor(run, model)
        source = model
    loaded.to(device).eval()
    budget = run_budget(run, processor, family, **(budget_overrides or {}))
    return Loaded(loaded, processor, family, budget, source, run.template_options if run is not None else {})
