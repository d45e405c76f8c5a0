"""Calibrated rewards (InfAlign): a reward replaced by its quantile among the base model's samples.

InfAlign (Balashankar et al., 2024) calibrates a reward model per prompt: a response's
calibrated reward is `F_x(R(x, y))`, the fraction of the base model's own responses to
`x` whose reward is below it. The quantile does not move under any strictly increasing
transform of the reward model (rescaling, shifting, squashing), so a Lagrangian scoring
`q - lambda * C` has a multiplier whose meaning ("a unit of cost is worth this much
reward quantile") is the same for every reward model and every prompt.

Reference samples: the candidates a search scores for one prompt at one step are the
base model's samples from that prompt (and beam prefix), drawn before any selection, so
they are the reference itself and cost nothing extra. They follow the base model's
distribution exactly at temperature 1 without truncation; under another temperature,
top-p/top-k/min-p or a grammar they follow the sampling distribution actually used,
and the quantile is relative to that distribution rather than the untempered model (the
ranking within a prompt is the same either way; only how far apart two quantiles lie
changes). Candidates resampled with penalised logits are their own reference likewise.

Ties take the mid-rank: `q = (#below + #equal / 2) / n` over the `n` candidates of the
group, the candidate itself included, so equal rewards get equal quantiles and a group
of one gets 0.5. Quantiles lie in (0, 1).

"exponential" is InfAlign's transform for Best-of-N, `exp(t * q)`, here normalised to
`(exp(t * q) - 1) / (exp(t) - 1)` (a positive affine map, so it ranks as `exp(t * q)`
does and keeps rewards in (0, 1) like the quantile): a larger `t` widens the gaps among
the top quantiles, which Best-of-N's maximum draws on, so the cost term trades against
the top of the distribution rather than its middle.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

RewardCalibration = Literal["none", "quantile", "exponential"]
"""How a search transforms rewards before scoring: raw, quantile, or exponential of the quantile."""


def quantile_rewards(reward: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
    """Each reward's mid-rank quantile within its contiguous group.

    Args:
        reward: `(rows,)` rewards, rows grouped contiguously (one group per prompt).
        group_sizes: rows per group; they sum to `rows`.

    Returns:
        `(rows,)` float64 quantiles in (0, 1), on `reward`'s device.
    """
    if sum(group_sizes) != reward.numel():
        raise ValueError(
            f"group_sizes sum to {sum(group_sizes)} but there are {reward.numel()} rewards"
        )
    values = reward.to(torch.float64)
    quantiles = []
    for group in values.split(group_sizes):
        below = (group[None, :] < group[:, None]).sum(-1)
        equal = (group[None, :] == group[:, None]).sum(-1)
        quantiles.append((below + 0.5 * equal).to(torch.float64) / group.numel())
    if not quantiles:
        return values.clone()
    return torch.cat(quantiles)


def exponential_rewards(quantile: torch.Tensor, exponent: float) -> torch.Tensor:
    """InfAlign's Best-of-N transform of quantiles, `(exp(t q) - 1) / (exp(t) - 1)`.

    Args:
        quantile: `(rows,)` quantiles in [0, 1].
        exponent: t > 0.

    Returns:
        `(rows,)` float64 in [0, 1], increasing in `quantile`.
    """
    if not math.isfinite(exponent) or exponent <= 0:
        raise ValueError(f"the calibration exponent must be a finite number > 0, got {exponent}")
    return torch.expm1(exponent * quantile.to(torch.float64)) / math.expm1(exponent)


def calibrate_rewards(
    reward: torch.Tensor,
    group_sizes: list[int],
    calibration: RewardCalibration,
    exponent: float,
) -> torch.Tensor:
    """`reward` (`(rows,)`, contiguous groups of `group_sizes`) under `calibration`:
    unchanged for "none", else float64 `(rows,)` quantiles or their exponential transform."""
    if calibration == "none":
        return reward
    quantile = quantile_rewards(reward, group_sizes)
    if calibration == "quantile":
        return quantile
    if calibration == "exponential":
        return exponential_rewards(quantile, exponent)
    raise ValueError(
        f"reward_calibration must be 'none', 'quantile' or 'exponential', got {calibration!r}"
    )
