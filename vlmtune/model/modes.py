"""What trains: one table of policies (frozen / lora / full) for vision tower, merger and language model.

The presets ``full``, ``lora`` and ``lora_vision`` are rows of that table and the freeze / LoRA flags adjust
single cells. The same table puts LoRA on the right modules, keeps the right parameters trainable after PEFT
wraps the model, builds the optimizer's parameter groups and decides what is saved beside the adapters.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from vlmtune.config import ModeArguments
from vlmtune.errors import ConfigError
from vlmtune.families import Family

logger = logging.getLogger(__name__)

PARTS = ("vision", "merger", "llm")
PEFT_PREFIX = "base_model.model."
_NO_LORA_BY_DEFAULT = ("lm_head", "embed_tokens")


@dataclass(frozen=True)
class TrainPlan:
    """The policy of each part, plus how many top layers / blocks train fully beside it."""

    vision: str
    merger: str
    llm: str
    topk_llm: int = 0
    topk_vision: int = 0
    train_router: bool = False
    """MoE models: the routers train fully (frozen otherwise, in every preset)."""

    def policy(self, part: str) -> str:
        return getattr(self, part)

    @property
    def uses_lora(self) -> bool:
        return "lora" in (self.vision, self.merger, self.llm)

    def describe(self) -> str:
        extra = "".join(f", top {n} {what} full" for n, what in ((self.topk_llm, "LLM layers"),
                                                              (self.topk_vision, "vision blocks")) if n)
        router = ", routers trained" if self.train_router else ""
        return f"vision {self.vision}, merger {self.merger}, llm {self.llm}{extra}{router}"


PRESETS = {
    "full": TrainPlan(vision="frozen", merger="full", llm="full"),
    "lora": TrainPlan(vision="frozen", merger="frozen", llm="lora"),
    "lora_vision": TrainPlan(vision="lora", merger="full", llm="lora"),
}


def plan_from_args(args: ModeArguments) -> TrainPlan:
    """The preset's row with each given flag applied; contradictory flags raise ``ConfigError``."""
    if args.mode not in PRESETS:
        raise ConfigError(f"--mode must be one of {sorted(PRESETS)}, got {args.mode!r}")
    plan = PRESETS[args.mode]
    if args.vision_lora and args.freeze_vision_tower is False:
        raise ConfigError("--vision_lora True with --freeze_vision_tower False: the vision tower is either LoRA-tuned "
                          "or trained fully; drop one of the two")
    if args.lora_enable and args.freeze_llm:
        raise ConfigError("--lora_enable True with --freeze_llm True: LoRA on a frozen language model; drop one")
    if args.freeze_vision_tower is not None:
        plan = replace(plan, vision="frozen" if args.freeze_vision_tower else "full")
    if args.vision_lora is not None:
        off = "frozen" if plan.vision == "lora" else plan.vision
        plan = replace(plan, vision="lora" if args.vision_lora else off)
    if args.freeze_merger is not None:
        plan = replace(plan, merger="frozen" if args.freeze_merger else "full")
    if args.lora_enable is not None:
        plan = replace(plan, llm="lora" if args.lora_enable else ("full" if plan.llm == "lora" else plan.llm))
    if args.freeze_llm is not None:
        plan = replace(plan, llm="frozen" if args.freeze_llm else ("full" if plan.llm == "frozen" else plan.llm))
    if args.unfreeze_topk_llm and plan.llm == "full":
        raise ConfigError("--unfreeze_topk_llm has no effect: the whole language model already trains fully")
    if args.unfreeze_topk_vision and plan.vision == "full":
        raise ConfigError("--unfreeze_topk_vision has no effect: the whole vision tower already trains fully")
    plan = replace(plan, topk_llm=args.unfreeze_topk_llm, topk_vision=args.unfreeze_topk_vision,
                   train_router=args.train_router)
    if not plan.uses_lora and (args.use_dora or args.use_rslora or args.lora_target):
        raise ConfigError("--use_dora / --use_rslora / --lora_target are set but no part uses LoRA")
    if plan.policy("vision") == plan.policy("merger") == plan.policy("llm") == "frozen" and not (
        plan.topk_llm or plan.topk_vision or plan.train_router
    ):
        raise ConfigError("nothing would train: every part is frozen")
    return plan


def part_of(name: str, family: Family) -> str:
    """'vision', 'merger' or 'llm' for a module or parameter name (PEFT's prefix ignored)."""
    name = name.removeprefix(PEFT_PREFIX)
    if any(name == m or name.startswith(m + ".") for m in family.mergers):
        return "merger"
    if name.startswith(family.vision + "."):
        return "vision"
    return "llm"


def _topk_prefixes(model: nn.Module, family: Family, plan: TrainPlan) -> tuple[str, ...]:
    """Name prefixes of the top LLM layers and vision blocks that train fully."""
    prefixes = []
    if plan.topk_llm:
        n = model.config.text_config.num_hidden_layers
        prefixes += [f"{family.language_model}.layers.{i}." for i in range(max(0, n - plan.topk_llm), n)]
    if plan.topk_vision:
        n = model.config.vision_config.depth
        prefixes += [f"{family.vision}.blocks.{i}." for i in range(max(0, n - plan.topk_vision), n)]
    return tuple(prefixes)


def _suffix_match(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def is_router(name: str, family: Family) -> bool:
    """Whether a module or parameter name belongs to an MoE router (PEFT's prefix and wrappers ignored)."""
    name = clean_name(name)
    return _suffix_match(name, family.routers) or _suffix_match(name.rsplit(".", 1)[0], family.routers)


def is_expert_weight(name: str, family: Family) -> bool:
    """Whether a parameter name is one of the fused MoE expert stacks (PEFT's prefix and wrappers ignored)."""
    return _suffix_match(clean_name(name), family.experts)


def _wanted(lora_target: str | None) -> list[str] | None:
    return [s.strip() for s in lora_target.split(",") if s.strip()] if lora_target else None


def lora_targets(model: nn.Module, family: Family, plan: TrainPlan, lora_target: str | None = None) -> list[str]:
    """Full names of the linear layers that get LoRA (MoE routers only when named in ``lora_target``)."""
    wanted = _wanted(lora_target)
    topk = _topk_prefixes(model, family, plan)
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or plan.policy(part_of(name, family)) != "lora":
            continue
        if name.startswith(topk) or (name + ".").startswith(topk):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if wanted is not None:
            if leaf in wanted or name in wanted:
                targets.append(name)
        elif leaf not in _NO_LORA_BY_DEFAULT and not is_router(name, family):
            targets.append(name)
    if wanted is not None:
        experts = lora_target_parameters(model, family, plan, lora_target)
        leaves = ({t.rsplit(".", 1)[-1] for t in targets} | set(targets)
                  | {e.rsplit(".", 1)[-1] for e in experts} | set(experts) | ({"experts"} if experts else set()))
        missing = [w for w in wanted if w not in leaves]
        if missing:
            raise ConfigError(f"--lora_target {missing} match no linear layer (or MoE expert weight) in the parts set "
                              "to LoRA")
    return targets


def lora_target_parameters(model: nn.Module, family: Family, plan: TrainPlan,
                           lora_target: str | None = None) -> list[str]:
    """Full names of the fused MoE expert weights that get LoRA through PEFT's ``target_parameters``: all of them
    when the language model is in LoRA mode (top fully-trained layers excepted), or those ``lora_target`` names
    (``experts``, ``gate_up_proj``, ``down_proj`` or full names)."""
    if not family.is_moe or plan.llm != "lora":
        return []
    wanted = _wanted(lora_target)
    topk = _topk_prefixes(model, family, plan)
    names = []
    for name, _ in model.named_parameters():
        if not is_expert_weight(name, family) or name.startswith(topk):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if wanted is None or "experts" in wanted or leaf in wanted or name in wanted:
            names.append(name)
    return names


def lora_config(model: nn.Module, family: Family, plan: TrainPlan, args: ModeArguments):
    """PEFT's ``LoraConfig`` for the plan. LoRA on fused MoE experts (PEFT's ``ParamWrapper``) has no dropout, and
    one ``LoraConfig`` sets dropout for every LoRA layer: with experts targeted, dropout is 0 (said in one log line)."""
    from peft import LoraConfig

    parameters = lora_target_parameters(model, family, plan, args.lora_target)
    dropout = args.lora_dropout
    if parameters:
        if args.use_dora:
            raise ConfigError("--use_dora cannot reach the fused MoE experts (PEFT's LoRA on parameters has no DoRA): "
                              "drop --use_dora, or leave the experts out with --lora_target (e.g. q_proj,k_proj,v_proj,"
                              "o_proj)")
        if dropout:
            logger.info("LoRA dropout %g -> 0: PEFT's LoRA on the fused MoE experts (target_parameters) has no dropout "
                        "and one setting covers every LoRA layer", dropout)
            dropout = 0.0
    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=dropout,
        target_modules=lora_targets(model, family, plan, args.lora_target),
        target_parameters=parameters or None,
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
    )


def check_family(plan: TrainPlan, family: Family) -> None:
    """Plan settings that the family cannot take (before the model loads)."""
    if plan.train_router and not family.is_moe:
        raise ConfigError(f"--train_router: {family.model_type} is not a mixture-of-experts model, it has no router")


def apply_plan(model: nn.Module, family: Family, plan: TrainPlan, args: ModeArguments) -> nn.Module:
    """Freeze, add LoRA and unfreeze per the plan; returns the model (a ``PeftModel`` when LoRA is used)."""
    check_family(plan, family)
    model.requires_grad_(False)
    if plan.uses_lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(model, family, plan, args))
    base = model.get_base_model() if plan.uses_lora else model
    full = fully_trained_names(base, family, plan)
    for name, param in base.named_parameters():
        if clean_name(name) in full and not is_lora_name(name):
            param.requires_grad_(True)
    return model


def fp32_master_weights(model: nn.Module) -> int:
    """Keep every trained half-precision parameter in fp32 (the forward still runs in bf16 / fp16 through the
    Trainer's autocast); returns how many elements were upcast. In bf16, AdamW's small updates round away (at
    lr 1e-5 most weights never move) and fp16's grad scaler refuses fp16 gradients. For runs without DeepSpeed,
    which keeps fp32 masters of its own. PEFT already keeps LoRA weights in fp32."""
    upcast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            upcast += param.numel()
    return upcast


def cast_trained(model: nn.Module, dtype: torch.dtype) -> None:
    """Trained floating parameters back to ``dtype`` (the end of a run whose masters were fp32)."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def fully_trained_names(model: nn.Module, family: Family, plan: TrainPlan) -> set[str]:
    """Base-model names of the parameters the plan trains fully (saved beside the adapters in LoRA runs). MoE
    routers train only with ``plan.train_router``, then whatever their part's policy."""
    topk = _topk_prefixes(model, family, plan)
    names = set()
    for name, _ in model.named_parameters():
        if is_lora_name(name):
            continue
        name = clean_name(name)
        if is_router(name, family):
            if plan.train_router:
                names.add(name)
        elif plan.policy(part_of(name, family)) == "full" or name.startswith(topk):
            names.add(name)
    return names


def is_lora_name(name: str) -> bool:
    return ".lora_" in name or ".lora_magnitude_vector" in name


_BASE_LAYERS = re.compile(r"(\.base_layer)+\.")


def clean_name(name: str) -> str:
    """The base model's own name of a parameter seen through PEFT (wrappers can nest: LoRA on two parameters of
    one module, such as an MoE's fused experts, gives ``experts.base_layer.base_layer.gate_up_proj``)."""
    return _BASE_LAYERS.sub(".", name.removeprefix(PEFT_PREFIX))


def trainable_report(model: nn.Module, family: Family) -> str:
    """A table of trainable parameters per part: count and percent of the part."""
    totals = dict.fromkeys(PARTS, 0)
    trainable = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():
        part = part_of(name, family)
        n = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        totals[part] += n
        if param.requires_grad:
            trainable[part] += n
    rows = [f"{'part':<8}{'trainable':>14}{'total':>16}{'%':>8}"]
    for part in PARTS:
        pct = 100 * trainable[part] / totals[part] if totals[part] else 0.0
        rows.append(f"{part:<8}{trainable[part]:>14,}{totals[part]:>16,}{pct:>8.2f}")
    all_t, all_n = sum(trainable.values()), sum(totals.values())
    rows.append(f"{'all':<8}{all_t:>14,}{all_n:>16,}{100 * all_t / max(all_n, 1):>8.2f}")
    return "\n".join(rows)


_NO_DECAY = re.compile(r"(bias|norm|ln_q|layernorm)", re.IGNORECASE)


def parameter_groups(
    model: nn.Module, family: Family, learning_rate: float, weight_decay: float,
    vision_lr: float | None = None, merger_lr: float | None = None,
) -> list[dict]:
    """Optimizer groups: one learning rate per part, no weight decay on biases and norms."""
    lrs = {"vision": vision_lr or learning_rate, "merger": merger_lr or learning_rate, "llm": learning_rate}
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name, family)
        ndim = len(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the real shape in ds_shape
        decay = ndim >= 2 and not _NO_DECAY.search(clean_name(name).rsplit(".", 2)[-2])
        group = groups.setdefault((part, decay), {
            "name": f"{part}{'' if decay else '/no_decay'}", "params": [], "lr": lrs[part],
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(param)
    # The language model's groups first: Trainer logs the first group's rate as `learning_rate`.
    return sorted(groups.values(), key=lambda g: (PARTS[::-1].index(g["name"].split("/")[0]), g["name"]))
