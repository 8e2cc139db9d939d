"""Loss variants of the policy stages, as pure functions of log-probabilities and rewards (no model, no trainer).

Preference (``vlmtune dpo --loss_type``), reference-free: no reference policy is loaded or precomputed.

* **ORPO** (Hong et al. 2024, arXiv 2403.07691): the chosen reply's negative log-likelihood plus ``beta`` (the
  paper's lambda) times the odds-ratio loss ``-log sigmoid(log odds(chosen) - log odds(rejected))``, where
  ``odds(y) = P / (1 - P)`` and ``log P`` is the reply's mean token log-probability (as TRL's ``ORPOTrainer``).
* **SimPO** (Meng et al. 2024, arXiv 2405.14734): ``-log sigmoid(beta * (mean logp(chosen) - mean logp(rejected))
  - gamma)``, the length-normalised margin with a target ``gamma`` (TRL's ``CPOTrainer`` with ``loss_type simpo``).

Reinforcement (``vlmtune grpo``), from DAPO (Yu et al. 2025, arXiv 2503.14476) and GSPO (Zheng et al. 2025, arXiv
2507.18071):

* **GSPO**: the importance ratio of a completion is one number, ``exp(mean over its tokens of (logp - old logp))``,
  clipped as a whole, instead of one ratio per token (``importance_log_ratio``).
* **Dynamic sampling**: groups whose rewards are all equal have zero advantages and teach nothing; they are
  resampled, up to a limit (``varied_groups`` finds them).
* **Overlong shaping**: a soft penalty on completions that run into the last ``buffer`` tokens of the length limit
  (``overlong_penalty``), or the filter that drops truncated completions from the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2``."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """(per-pair ORPO loss, per-pair log odds ratio) from the replies' mean token log-probabilities (policy only):
    ``-chosen_mean - beta * log sigmoid(log_odds)``, the first term the chosen reply's NLL per token."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return -chosen_mean - beta * F.logsigmoid(log_odds), log_odds


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO loss from the replies' mean token log-probabilities (policy only); ``label_smoothing`` as in
    the DPO sigmoid loss (TRL's)."""
    logits = beta * (chosen_mean.float() - rejected_mean.float()) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def importance_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                         level: str = "token") -> torch.Tensor:
    """log of the importance ratio pi / pi_old: per token, (rows, length) (``token``, GRPO), or per completion,
    (rows, 1), the mean of its tokens' log ratios over ``mask`` (``sequence``, GSPO)."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    raise ValueError(f"importance sampling level must be 'token' or 'sequence', got {level!r}")


def clipped_objective(log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                      epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss ``-min(r A, clip(r, 1 - eps, 1 + eps_high) A)``, the ratio ``r``, whether the clip acted),
    ``advantages`` of shape (rows, 1); a sequence-level ``log_ratio`` (rows, 1) broadcasts to every token."""
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    is_clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return per_token, ratio, is_clipped


def varied_groups(rewards: torch.Tensor, group_size: int, tolerance: float = 1e-6) -> torch.Tensor:
    """(groups,) True where a group's rewards are not all equal (its advantages are not all zero)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(1).values - grouped.min(1).values) > tolerance


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward: 0 up to ``max_length - buffer`` tokens, then falling
    linearly to ``-factor`` at ``max_length`` (and ``-factor`` beyond)."""
    start = max_length - buffer
    over = (lengths.float() - start).clamp(min=0) / max(buffer, 1)
    return -factor * over.clamp(max=1)
