"""The run folder: what a training run saves, and how resume, merge, predict and eval read it back.

A run's output folder (and each ``checkpoint-N`` inside it) holds:

* the model: PEFT adapter files (``adapter_config.json`` + weights) for LoRA runs, the whole model otherwise;
* ``non_lora_trainables.safetensors``: in LoRA runs, the parameters that trained fully beside the adapters (the
  merger, top layers), under the base model's in-memory names;
* the processor, with the pixel and frame budgets the run trained with;
* ``vlmtune_run.json``: the stage, base model, family, training plan, dtype, quantization bits and the budget
  options the user set (some, such as ``nframes`` or fixed image sizes, have no field in the processor's files);
  ``init_run`` when the run started from another LoRA run (DPO / GRPO after SFT): that run's adapters were merged
  into the base model first, and are merged again whenever this run's adapters are loaded.

Everything that writes or reads these files lives here, so the commands that need them (train, merge, predict,
eval) never import one another.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
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
    return RunInfo(path, info, has_adapter, has_model)


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
    if not (path / ADAPTER_CONFIG).is_file() or (path / "config.json").is_file():
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

    if not model and not adapter:
        raise ConfigError("give --model (a model folder, or a training output with adapters)")
    if model and not adapter:
        path = Path(model)
        if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
            model, adapter = None, model  # a training output: its run file names the base model
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if adapter:
        run = read_run(adapter)
        if not run.has_adapter:
            raise ConfigError(f"{adapter} holds no LoRA adapters ({ADAPTER_CONFIG}); it is a full model: "
                              "pass it as --model")
        base = base_model_of(run, model)
        work_dtype = parse_dtype(dtype) or run.run_dtype or torch.float32
        peft_model, family = load_model_with_adapters(run, base, work_dtype, device)
        loaded = peft_model.merge_and_unload()
        processor = load_run_processor(run, base)
        source = f"{base} + adapters from {adapter}"
    else:
        try:
            config = AutoConfig.from_pretrained(model)
        except OSError:
            what = "is not a model folder (no config.json)" if Path(model).is_dir() else "does not exist"
            raise ConfigError(f"--model {model} {what}; give a model folder or a training output") from None
        run = read_run(model) if Path(model, RUN_FILE).is_file() else None
        loaded, family = load_model(model, dtype=parse_dtype(dtype) or saved_dtype(config) or torch.float32)
        processor = load_run_processor(run, model)
        source = model
    loaded.to(device).eval()
    budget = run_budget(run, processor, family, **(budget_overrides or {}))
    return Loaded(loaded, processor, family, budget, source, run.template_options if run is not None else {})


# ---------------------------------------------------------------- checkpoints, resume and the run lock
#
# The Trainer writes a checkpoint in place, file by file: a process killed during a save leaves a
# ``checkpoint-N`` folder with some of its files, which transformers' own "newest checkpoint" then picks and fails
# on. vlmtune has every rank write into ``tmp-checkpoint-N/checkpoint-N`` and renames the folder to
# ``checkpoint-N`` once all ranks are done, so a ``checkpoint-N`` is always complete (``checkpoint_problem``
# still checks, for folders written by other tools or versions).

CHECKPOINT_PREFIX = "checkpoint"
"""transformers' ``PREFIX_CHECKPOINT_DIR``: checkpoints are ``checkpoint-<global step>``."""
STAGING_PREFIX = "tmp-checkpoint"
"""A checkpoint being written: ``tmp-checkpoint-N/checkpoint-N``, renamed to ``checkpoint-N`` when complete."""
TRAINER_STATE = "trainer_state.json"
LOCK_FILE = ".vlmtune.lock"
RESUME_NEWEST = ("last", "auto")
"""``--resume_from_checkpoint`` values that mean the newest complete checkpoint of ``--output_dir``."""
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json", "latest")  # latest: a DeepSpeed checkpoint
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
_STAGING_NAME = re.compile(rf"^{STAGING_PREFIX}-(\d+)")


def checkpoint_problem(folder: Path) -> str | None:
    """Why a ``checkpoint-N`` folder cannot be resumed from, or None when it is complete."""
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE}"
    try:
        json.loads(state.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{TRAINER_STATE} is unreadable"
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        return "no model or adapter weights"
    return None


@dataclass
class Checkpoints:
    """The checkpoints of a run folder: complete ones by step, and what a resume must skip."""

    complete: list[tuple[int, Path]]
    incomplete: list[tuple[int, Path, str]]  # (step, folder, why)


def scan_checkpoints(output_dir: str | Path) -> Checkpoints:
    folder = Path(output_dir)
    complete, incomplete = [], []
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        final, staged = _CHECKPOINT_NAME.match(child.name), _STAGING_NAME.match(child.name)
        if not child.is_dir() or not (final or staged):
            continue
        if staged:
            incomplete.append((int(staged.group(1)), child, "a save that did not finish"))
        elif problem := checkpoint_problem(child):
            incomplete.append((int(final.group(1)), child, problem))
        else:
            complete.append((int(final.group(1)), child))
    return Checkpoints(sorted(complete), sorted(incomplete))


def resolve_resume(value: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint folder ``--resume_from_checkpoint`` means, checked, or None to start from step 0.

    ``last`` / ``auto``: the newest complete checkpoint of ``output_dir``, named in one line, each newer incomplete
    one skipped with a one-line note; with none, ``last`` stops and ``auto`` starts from step 0 (one command for
    the first start and every restart of a preempted job). A path must be a complete checkpoint."""
    if not value:
        return None
    if value.lower() in RESUME_NEWEST:
        found = scan_checkpoints(output_dir)
        newest = found.complete[-1] if found.complete else None
        for step, path, why in found.incomplete:
            if newest is None or step > newest[0]:
                logger.info("skipping %s: incomplete (%s)", path, why)
        if newest is not None:
            logger.info("resuming from %s (step %d)", newest[1], newest[0])
            return str(newest[1])
        if value.lower() == "auto":
            logger.info("no complete checkpoint in %s: starting from step 0", output_dir)
            return None
        raise ConfigError(f"--resume_from_checkpoint last: {output_dir} holds no complete checkpoint; start without "
                          "the flag, or use `auto` (resumes when there is one)")
    path = Path(value)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise ConfigError(f"--resume_from_checkpoint {value} {what}; give a checkpoint-N folder, or `last` for the "
                          "newest complete checkpoint in --output_dir")
    problem = checkpoint_problem(path)
    if problem is None:
        return str(path)
    inside = scan_checkpoints(path).complete  # a run folder given instead of one of its checkpoints
    beside = [p for p in scan_checkpoints(path.parent).complete if p[1] != path]
    hint = (f"; it is a run folder, whose newest complete checkpoint is {inside[-1][1]}" if inside else
            f"; the newest complete one beside it is {beside[-1][1]}" if beside else "")
    raise ConfigError(f"--resume_from_checkpoint {value} is not a complete checkpoint ({problem}){hint}; or use "
                      "`last` for the newest complete checkpoint in --output_dir")


def staging_dir(output_dir: str | Path, step: int) -> Path:
    """Where the Trainer writes checkpoint ``step`` (its ``checkpoint-N`` inside) before it is published."""
    return Path(output_dir, f"{STAGING_PREFIX}-{step}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Give a fully written checkpoint its final name in one rename, after its files reached the disk.

    A checkpoint of the same step already there (from a run that went further before it was resumed from an
    earlier one) is replaced."""
    for path in sorted(staged.rglob("*")):
        if path.is_file():
            _fsync(path)
    old = None
    if final.exists():
        old = final.parent / f"{STAGING_PREFIX}-{final.name.rsplit('-', 1)[-1]}-replaced"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    staged.rename(final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if staged.parent != final.parent:
        shutil.rmtree(staged.parent, ignore_errors=True)


def rotate_checkpoints(output_dir: str | Path, limit: int | None, newest: Path, best: str | None = None) -> None:
    """After ``newest`` is complete: remove what unfinished saves left, then the oldest complete checkpoints
    beyond ``limit`` (``--save_total_limit``), in transformers' order, never ``newest`` nor the best one.

    Only complete checkpoints count: a folder a killed save left behind neither takes a place nor is kept
    as "the most recent"."""
    from transformers.trainer_utils import sort_checkpoints

    found = scan_checkpoints(output_dir)
    for _, path, _ in found.incomplete:
        if _STAGING_NAME.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
    if not limit or limit <= 0:
        return
    complete = {str(path) for _, path in found.complete}
    protected = {str(newest)} | ({str(Path(best))} if best else set())
    ordered = [p for p in sort_checkpoints(str(output_dir), use_mtime=True, best_model_checkpoint=best)
               if p in complete and p not in protected]
    excess = len(complete) - max(limit, len(protected & complete))
    for path in ordered[:max(excess, 0)]:
        logger.info("removing %s (--save_total_limit %d)", path, limit)
        shutil.rmtree(path, ignore_errors=True)


class RunLock:
    """Holds ``output_dir/.vlmtune.lock`` while a run trains there, so a second run in the same folder stops
    instead of interleaving checkpoints. The lock is the kernel's (``flock``): it goes when the process does,
    however it ends, so a killed run never leaves a stale lock."""

    def __init__(self, output_dir: str | Path):
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ConfigError(f"output folder {self.folder} is in use by another run ({holder}); wait for it "
                                  "to end, or give another --output_dir") from None
            except OSError as exc:  # a filesystem without locks
                os.close(fd)
                logger.warning("cannot lock %s (%s): nothing stops a second run from using the same folder",
                               self.path, exc.strerror)
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the last holder removed the file between our open and our lock: lock the new one
        import socket

        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                self.folder.rmdir()  # a run that wrote nothing leaves no folder
            except OSError:
                pass
