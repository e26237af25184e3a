"""GRPO's math as pure tensor functions: advantages from rewards, the clipped surrogate, the KL term, aggregation.

Each follows TRL 1.16's ``GRPOTrainer`` (``_generate_and_score_completions`` for the advantages, ``_compute_loss``
for the loss); ``tests/training/test_grpo_math.py`` runs TRL's own methods on the same tensors.

Shapes: ``B`` completions of a micro-batch, ``T`` completion positions (right-padded); ``mask`` ``[B, T]`` is 1 on
the completion tokens that are trained (0 on padding, and on a whole truncated completion with
``mask_truncated_completions``); ``logps`` are per-token log-probs of the completion tokens under the policy.

**The loop's sum/count convention.** The loop sums ``loss_sum`` over micro-batches and processes and divides by
the summed ``count`` (:mod:`aift.training.objectives`). Every loss type fits it exactly, given TRL's equal-sized
micro-batches:

==========  ===============================================  =====================  ============================
loss_type   TRL                                              loss_sum               count
==========  ===============================================  =====================  ============================
dapo        Σ token losses / tokens of the global batch      Σ token losses         completion tokens (mask)
grpo        mean over completions of each one's token mean   Σ per-completion mean  completions
dr_grpo     Σ token losses / (completions · L_max)           Σ token losses / L_max completions
bnpo        mean over micro-batches of each one's token      the micro-batch's      1 (one per micro-batch)
            mean (TRL: "normalised over the local batch")    token mean
==========  ===============================================  =====================  ============================

The logged metrics have their own denominators (tokens, or completions for sequence-level ratios), which are not
the loss's ``count`` for grpo/dr_grpo/bnpo: :func:`grpo_loss` returns each metric as a (sum, denominator) pair,
and :func:`metrics_for_loop` turns them into sums that, divided by the loop's total count, give TRL's values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from aift.training.grpo_config import GRPO_LOSS_TYPES

STD_EPS = 1e-4  # TRL adds it to the std before dividing: an all-equal group gets advantage 0, not NaN


# ---------------------------------------------------------------------- rewards -> advantages


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs (NaN with fewer than 2 values), as TRL's ``nanstd``."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, math.nan))
    std = torch.sqrt(variance * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)


def total_rewards(rewards_per_func: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``[N]`` weighted sum over reward functions, skipping None (NaN) values; NaN where all were None."""
    weights = torch.as_tensor(weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    total = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(rewards_per_func).all(dim=1)] = math.nan  # unscorable: out of the baseline, advantage 0
    return total


@dataclass
class Advantages:
    advantages: torch.Tensor  # [N], 0 for unscorable completions
    rewards: torch.Tensor  # [N] total rewards, NaN where unscorable
    std: torch.Tensor  # [N] the std each advantage was (or, with scale_rewards=none, would be) scaled by
    zero_std: torch.Tensor  # [N] bool: the completion's group (batch, for scale_rewards=batch) has no reward spread


def group_advantages(
    rewards_per_func: torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
) -> Advantages:
    """Group-relative advantages of ``[N, F]`` rewards of the WHOLE global batch (all processes, groups whole).

    ``N = prompts x num_generations`` with each prompt's completions adjacent. The advantage is the total reward
    minus its group's mean, divided by ``std + 1e-4``: the group's std (``group``), the whole batch's
    (``batch``), or not divided (``none``). Means and stds ignore unscorable completions.
    """
    rewards = total_rewards(rewards_per_func, weights)
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):
        std = nanstd(groups, dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards must be group, batch or none; got {scale_rewards!r}")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(advantages, nan=0.0), rewards, std, zero_std)


def truncated_completions(completion_ids: Iterable[Sequence[int]], stop_ids: Iterable[int]) -> torch.Tensor:
    """``[N]`` bool: the completion does not end with a stop id (EOS or padding): it hit max_completion_length.

    TRL's rule (``ids[-1] not in eos_and_pad``); an empty completion counts as stopped.
    """
    stop = set(stop_ids)
    return torch.tensor([bool(ids) and ids[-1] not in stop for ids in completion_ids], dtype=torch.bool)


# ---------------------------------------------------------------------- the loss


def importance_log_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """``[B, T]`` per-token log-ratios (``token``) or ``[B, 1]`` their mean over each completion (``sequence``, GSPO)."""
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level must be token or sequence; got {level!r}")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π‖π_ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased)."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def aggregate(
    per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, count)`` of a micro-batch for the loop's sum/count convention (table in the module doc)."""
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    num_completions = torch.tensor(float(mask.shape[0]), device=mask.device)
    if loss_type == "dapo":
        return masked.sum(), mask.sum()
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), num_completions
    if loss_type == "dr_grpo":
        return masked.sum() / max_completion_length, num_completions
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0), torch.ones((), device=mask.device)
    raise ValueError(f"loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}; got {loss_type!r}")


@dataclass
class GRPOLoss:
    loss_sum: torch.Tensor  # differentiable scalar
    count: torch.Tensor  # what the loop divides the summed loss_sum by
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (sum, denominator)


def grpo_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    entropies: torch.Tensor | None = None,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = True,
    max_completion_length: int = 512,
) -> GRPOLoss:
    """The clipped surrogate (plus ``beta`` times the KL) of a micro-batch, aggregated by ``loss_type``.

    ``old_logps`` are the log-probs at generation time (kept when ``num_iterations`` > 1); None means this is
    the policy that generated (the ratio is 1 and the gradient the policy gradient). ``ref_logps`` are needed
    when ``beta`` > 0. ``advantages`` ``[B]`` (or ``[B, T]``).
    """
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_logps = logps.detach() if old_logps is None else old_logps
    log_weights = importance_log_weights(logps - old_logps, mask, importance_sampling_level)
    ratio = torch.exp(log_weights)
    high = epsilon if epsilon_high is None else epsilon_high
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token_loss = -torch.min(unclipped * advantages, clipped * advantages)
    metrics = _clip_metrics(ratio, advantages, mask, epsilon, high)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs (ref_logps)")
        kl = k3_kl(logps, ref_logps)
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token_loss = per_token_loss + beta * kl
        metrics["kl"] = _masked_sum(kl, mask)
    if entropies is not None:
        metrics["entropy"] = _masked_sum(entropies, mask)
    loss_sum, count = aggregate(per_token_loss, mask, loss_type, max_completion_length)
    return GRPOLoss(loss_sum, count, metrics)


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of TRL's ``global_masked_mean``: over trained tokens, or over completions for ``[B, 1]``."""
    x = x.detach()
    if x.shape[1] == 1:
        return x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
    return (x * mask).sum(), mask.sum()


def _clip_metrics(ratio, advantages, mask, low: float, high: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Share of ratios clipped below (negative advantage), above (positive) and either: the clip region."""
    ratio = ratio.detach()
    is_low = (ratio < 1 - low) & (advantages < 0)
    is_high = (ratio > 1 + high) & (advantages > 0)
    return {
        "clip_ratio/low_mean": _masked_sum(is_low.to(mask.dtype), mask),
        "clip_ratio/high_mean": _masked_sum(is_high.to(mask.dtype), mask),
        "clip_ratio/region_mean": _masked_sum((is_low | is_high).to(mask.dtype), mask),
    }


def metrics_for_loop(
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]], denominators: dict[str, float], loop_count: float
) -> dict[str, torch.Tensor]:
    """Metric sums that the loop's ``Σ sums / Σ count`` turns into ``Σ sum / Σ denominator``.

    ``denominators`` holds each metric's global denominator for the step (all micro-batches, all processes;
    known after the rollout, before any forward), ``loop_count`` the step's total loss count. Each sum is scaled
    by ``loop_count / denominator``.
    """
    return {name: s * (loop_count / max(denominators[name], 1.0)) for name, (s, _) in metrics.items()}
