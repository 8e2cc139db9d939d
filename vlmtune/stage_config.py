"""Each stage's own flags, beside the shared ones of ``vlmtune.config`` (model, data, modes, training): one
dataclass per stage, every field with help text and, where it has one, its range (``flags.within``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vlmtune.errors import ConfigError
from vlmtune.flags import check_fields, within


@dataclass
class DPOArguments:
    """``vlmtune dpo``: direct preference optimisation on (prompt, chosen, rejected) records."""

    beta: float = field(
        default=0.1,
        metadata={"help": "How far the policy may move from the reference: the scale of the implicit rewards "
                  "beta * (log pi - log pi_ref). For IPO, the regularisation tau.", **within(0, low_open=True)},
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = field(
        default="sigmoid",
        metadata={"help": "sigmoid: the DPO paper's loss. ipo: (length-normalised margin - 1 / (2 beta))^2. "
                  "hinge: relu(1 - beta * margin) (SLiC). Reference-free (no reference model): orpo: the chosen "
                  "reply's NLL + beta x the odds-ratio loss (beta 0.1 as the paper's lambda); simpo: -log sigmoid("
                  "beta x mean-logp margin - simpo_gamma) (the paper uses beta 2 to 10)."},
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin gamma."})
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Sigmoid and SimPO losses: the assumed probability that a pair's labels are flipped "
                  "(cDPO), in [0, 0.5).", **within(0, 0.5, high_open=True)},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Score every pair with the reference in one pass before the first step, then keep no "
                  "reference in memory (full runs: no frozen copy). Saved with each checkpoint for resume."},
    )

    def __post_init__(self):
        check_fields(self)
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise ConfigError(f"--label_smoothing applies to the sigmoid and simpo losses, not --loss_type "
                              f"{self.loss_type}")
        if self.precompute_ref_log_probs and self.reference_free:
            raise ConfigError(f"--precompute_ref_log_probs: --loss_type {self.loss_type} uses no reference model; "
                              "drop the flag")

    @property
    def reference_free(self) -> bool:
        """Whether the loss compares no reference policy (ORPO, SimPO)."""
        return self.loss_type in ("orpo", "simpo")


@dataclass
class GRPOArguments:
    """``vlmtune grpo``: group relative policy optimisation with reward functions on prompt records."""

    num_generations: int = field(
        default=4, metadata={"help": "Completions sampled per prompt; their rewards are compared within the group.",
                              **within(2)}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use it too).",
                                                      **within(0, low_open=True)})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the smallest set of tokens whose "
                                                "probability reaches top_p.", **within(0, 1, low_open=True)})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens only (0: all).",
                                                **within(0)})
    max_completion_length: int = field(default=64, metadata={"help": "Most tokens generated per completion.",
                                                                 **within(1)})
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions, summed with --reward_weights: built-ins exact_match, similarity, math, "
                  "format, box_iou, or FILE.py:FUNCTION (called as FUNCTION(completions, **fields) -> list of floats). "
                  "Default: exact_match, or none beside --reward_model."},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (default: 1 each)."}
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "A `vlmtune reward-model` output (or its merged folder) scoring each "
                                "completion, added to the reward functions at --reward_model_weight."}
    )
    reward_model_weight: float = field(default=1.0, metadata={"help": "Weight of --reward_model's score."})
    beta: float = field(
        default=0.0,
        metadata={"help": "Weight of the KL penalty to the reference policy (0: no KL term and no reference).",
                  **within(0)},
    )
    epsilon: float = field(default=0.2, metadata={"help": "Clipping range of the probability ratio (lower side).",
                                                  **within(0, low_open=True)})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clipping range (default: --epsilon; DAPO raises it, e.g. 0.28).",
                              **within(0, low_open=True)}
    )
    num_iterations: int = field(
        default=1,
        metadata={"help": "Optimizer steps per batch of completions (above 1 the ratio moves from 1 and the clip "
                  "acts); each step group of prompts is then sampled again that many times.", **within(1)},
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = field(
        default="grpo",
        metadata={"help": "How token losses add up: grpo (mean per completion, then over completions), bnpo "
                  "(mean over the batch's completion tokens), dr_grpo (sum / (completions x "
                  "max_completion_length))."},
    )
    importance_sampling_level: Literal["token", "sequence"] = field(
        default="token",
        metadata={"help": "token: a probability ratio per token (GRPO). sequence: one ratio per completion, the "
                  "geometric mean of its tokens', clipped as a whole (GSPO; with --loss_type grpo)."},
    )
    dynamic_sampling: int = field(
        default=0,
        metadata={"help": "DAPO's dynamic sampling: groups whose rewards are all equal (zero advantages) are sampled "
                  "again, up to this many times; groups still equal are dropped from the step (0: off)."},
    )
    overlong_buffer: int = field(
        default=0,
        metadata={"help": "DAPO's overlong penalty: completions longer than max_completion_length - N tokens lose "
                  "up to --overlong_penalty_factor of reward, linearly to the limit (0: off)."},
    )
    overlong_penalty_factor: float = field(default=1.0, metadata={"help": "The overlong penalty at the limit."})
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "Overlong filter: completions cut by max_completion_length (no end token) train nothing."},
    )
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group",
        metadata={"help": "Advantages = reward - group mean, divided by the group's std (group), the batch's "
                  "(batch) or nothing (none, as Dr. GRPO)."},
    )
    log_completions: int = field(
        default=2, metadata={"help": "Sample completions written to completions.jsonl in the run folder at each "
                             "logging step (0: none).", **within(0)}
    )
    use_vllm: bool | None = field(
        default=None,
        metadata={"help": "Sample with vLLM (CUDA only; images and text, no video). Default: when vLLM is "
                  "installed and a CUDA device is present; else HF generate, said in one line."},
    )
    vllm_mode: Literal["colocate", "server"] = field(
        default="colocate", metadata={"help": "colocate: vLLM shares each training GPU; server: `trl vllm-serve`."}
    )
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "URL of the vLLM server (server "
                                                                            "mode)."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Share of GPU memory vLLM may take in colocate mode.",
                              **within(0, 1, low_open=True)}
    )

    def __post_init__(self):
        check_fields(self)  # ranges and finite numbers (--reward_weights too)
        if self.reward_funcs is None:
            self.reward_funcs = [] if self.reward_model else ["exact_match"]
        if not self.reward_funcs and not self.reward_model:
            raise ConfigError("no reward: give --reward_funcs, --reward_model or both")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"{len(self.reward_weights)} --reward_weights for {len(self.reward_funcs)} "
                              "--reward_funcs; give one weight per function")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.importance_sampling_level == "sequence" and self.loss_type != "grpo":
            raise ConfigError(f"--importance_sampling_level sequence (GSPO) gives one loss per completion, averaged "
                              f"with --loss_type grpo; --loss_type {self.loss_type} would weigh it by token count")
        if self.dynamic_sampling < 0 or not 0 <= self.overlong_buffer <= self.max_completion_length:
            raise ConfigError("--dynamic_sampling must be >= 0 and --overlong_buffer within [0, "
                              f"--max_completion_length {self.max_completion_length}]")


REWARD_FIELDS = ("reward_funcs", "reward_weights", "reward_model", "reward_model_weight", "num_generations",
                 "scale_rewards", "max_completion_length", "overlong_buffer", "overlong_penalty_factor")
"""``GRPOArguments``' fields that decide how a completion is scored: ``vlmtune view`` takes them as flags for a GRPO
data file, and shows a GRPO run's from its ``vlmtune_run.json``."""


@dataclass
class DistillArguments:
    """``vlmtune distill``: a student learns a teacher's token distributions on SFT records (and, GKD, on its own
    samples)."""

    teacher: str | None = field(default=None, metadata={"help": "The teacher: a model folder or training output "
                                                         "with the student's tokenizer and vision tokens."})
    beta: float = field(default=0.0, metadata={"help": "Generalized JSD interpolation: 0 forward KL(teacher || "
                                               "student), 1 reverse KL(student || teacher), between: JSD(beta)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of both distributions (and of "
                                                      "on-policy sampling)."})
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of the plain cross-entropy on the labels, added "
                                                    "to the divergence (off-policy steps)."})
    lmbda: float = field(default=0.0, metadata={"help": "Share of steps on-policy (GKD): the student samples its "
                                                "replies and the divergence is taken on them."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens per on-policy sample."})
    teacher_bits: Literal[16, 8] = field(default=16, metadata={
        "help": "16: the teacher in the run's dtype; 8: its language-model Linear layers in bitsandbytes' LLM.int8 "
                "(vision tower and LM head kept): about 0.6x a 7B teacher's bf16 weights. A model folder or merged "
                "run, not a LoRA run; no MoE teacher, no --deepspeed."})

    def __post_init__(self):
        check_fields(self)  # finite numbers
        if not 0 <= self.beta <= 1 or not 0 <= self.lmbda <= 1:
            raise ConfigError(f"--beta and --lmbda must be in [0, 1], got {self.beta} and {self.lmbda}")
        if self.temperature <= 0 or self.ce_weight < 0 or self.max_new_tokens < 1:
            raise ConfigError("--temperature must be positive, --ce_weight >= 0 and --max_new_tokens >= 1")


@dataclass
class SampleArguments:
    """``vlmtune sample``: rejection sampling. The model, the reward and the sampling flags are those of
    ``vlmtune predict`` and ``vlmtune grpo``."""

    data: str | None = field(default=None, metadata={"help": "Prompt records, as `vlmtune grpo` reads them (the "
                                                   "prompt turns plus the fields the reward functions read)."})
    output: str | None = field(default=None, metadata={
        "help": "The SFT records to write: OUTPUT.json (LLaVA JSON; .jsonl: JSON lines) or OUTPUT.parquet (images "
                "embedded). Beside it: OUTPUT.samples.jsonl (every reply and its scores, appended prompt by prompt; "
                "a rerun continues from it) and OUTPUT.summary.json."})
    num_samples: int = field(default=8, metadata={"help": "Replies sampled per prompt (one generate call each).",
                                                  **within(1)})
    keep: Literal["best", "all"] = field(default="best", metadata={
        "help": "best: the highest-scoring reply of each prompt (the first on ties); all: every reply scoring at "
                "least --min_score."})
    min_score: float | None = field(default=None, metadata={
        "help": "Keep only replies whose score (the weighted sum of the rewards) is at least this (default: any)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling: prompt i's replies are drawn from seed "
                                           "and i alone, so a resumed run writes what an uninterrupted one does."})

    def __post_init__(self):
        check_fields(self)


STAGE_ARGUMENTS = {"dpo": DPOArguments, "grpo": GRPOArguments, "distill": DistillArguments}
"""Each stage's own knobs, parsed after the shared ones."""
