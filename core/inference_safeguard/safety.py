"""Safety state and candidate scores: the pure tensor math of InferenceGuard.

The safety state follows the Sauté augmentation of the paper: `z_0 = d` (budget),
`z_{t+1} = (z_t - c_t) / gamma_c`. Costs are only observed at block ends, so a
block's cost increment is applied at once and then discounted once per token of the
block: `z' = (z - (C_new - C_old)) / gamma_c ** tokens`. With `gamma_c = 1` this is
exactly `z = d - C(x, y)`. The cost of the empty response is 0, so `z_0 = d`; costs may
be negative (a cost model that rewards some text), and a negative budget can then be met.

With several constraints (`inference_safeguard.constraints`) costs, budgets and safety
states are `(rows, constraints)`: one column per constraint. A row is within budget only
when every column is `>= 0`, and its worst violation is its smallest column. Every
function here takes `(rows,)` (one constraint) or `(rows, constraints)`.
No function here modifies its inputs.
"""

from __future__ import annotations

import torch


def initial_safety_state(
    budget: float, rows: int, device: torch.device | None = None
) -> torch.Tensor:
    """`(rows,)` float64 tensor of `z_0 = budget`.

    Float64, like the scorers' costs, so that a cost equal to the budget leaves `z == 0`
    (within budget) instead of a float32 rounding error either way.
    """
    return torch.full((rows,), float(budget), dtype=torch.float64, device=device)


def update_safety_state(
    z: torch.Tensor,
    previous_cost: torch.Tensor,
    new_cost: torch.Tensor,
    tokens: torch.Tensor,
    discount: float = 1.0,
) -> torch.Tensor:
    """Advance the safety state over one block.

    Args:
        z: `(rows,)` or `(rows, constraints)` safety state before the block.
        previous_cost: cumulative cost C(x, y_<t) before the block, shaped like `z`.
        new_cost: cumulative cost after the block, shaped like `z`.
        tokens: `(rows,)` tokens the block added (the discount's exponent).
        discount: gamma_c in (0, 1].

    Returns:
        The safety state after the block, shaped like `z`.
    """
    z_after = z - (new_cost - previous_cost)
    if discount == 1.0:
        return z_after
    exponent = tokens.to(z_after.dtype)
    if z_after.dim() == 2:
        exponent = exponent[:, None]
    return z_after / discount**exponent


def worst_margin(z: torch.Tensor) -> torch.Tensor:
    """`(rows,)` smallest entry of each row's safety state (`(rows,)` is its own)."""
    return z if z.dim() == 1 else z.amin(dim=-1)


def over_budget(z: torch.Tensor) -> torch.Tensor:
    """`(rows,)` bool: True where any constraint's safety state is below 0."""
    return worst_margin(z) < 0


def augmented_score(reward: torch.Tensor, z: torch.Tensor, unsafe_penalty: float) -> torch.Tensor:
    """The augmented objective: `R` when `z >= 0`, else `-n + z` (smaller violation ranks higher).

    Args:
        reward: `(rows,)` reward of each candidate.
        z: `(rows,)` or `(rows, constraints)` safety state of each candidate; with several
            constraints an unsafe candidate scores `-n + min(z)`, its worst violation.
        unsafe_penalty: n >= 0.

    Returns:
        `(rows,)` scores; every unsafe candidate ranks below every safe one when n exceeds
        the reward range.
    """
    margin = worst_margin(z)
    return torch.where(margin >= 0, reward, margin - unsafe_penalty)


def lagrangian_score(reward: torch.Tensor, cost: torch.Tensor, multiplier: float) -> torch.Tensor:
    """`R - lambda * C`: the Lagrangian scoring of the baselines.

    `reward` is `(rows,)`; `cost` `(rows,)`, or `(rows, constraints)`, whose costs are
    summed (one multiplier for every constraint). Returns `(rows,)`."""
    total = cost if cost.dim() == 1 else cost.sum(dim=-1)
    return reward - multiplier * total


def top_k_per_group(scores: torch.Tensor, group_sizes: list[int], k: int) -> list[torch.Tensor]:
    """Indices of the `k` best scores in each contiguous group, best first.

    Ties keep the earlier index first, so selection is deterministic.

    Args:
        scores: `(rows,)` with rows grouped contiguously.
        group_sizes: size of each group; they sum to `rows`.
        k: how many to keep per group (fewer when a group is smaller).

    Returns:
        One `(min(k, size),)` long tensor of row indices into `scores` per group.
    """
    selected = []
    for group_scores, start in zip(
        scores.split(group_sizes), _group_starts(group_sizes), strict=True
    ):
        order = torch.sort(group_scores, descending=True, stable=True).indices
        selected.append(order[: min(k, group_scores.numel())] + start)
    return selected


def unsafe_token_mask(
    tokens: torch.Tensor, unsafe: torch.Tensor, group_sizes: list[int], vocab_size: int
) -> torch.Tensor:
    """Per group, the tokens that occur in its unsafe candidate blocks.

    Args:
        tokens: `(rows, block)` long tokens of each candidate block; negative ids are
            padding and ignored.
        unsafe: `(rows,)` bool, True for over-budget candidates.
        group_sizes: rows per group (contiguous).
        vocab_size: V.

    Returns:
        `(groups, V)` bool mask.
    """
    groups = len(group_sizes)
    group_of_row = torch.repeat_interleave(
        torch.arange(groups, device=tokens.device),
        torch.tensor(group_sizes, device=tokens.device),
    )
    keep = unsafe[:, None] & (tokens >= 0)
    mask = torch.zeros(groups, vocab_size, dtype=torch.bool, device=tokens.device)
    rows = group_of_row[:, None].expand_as(tokens)[keep]
    mask[rows, tokens[keep]] = True
    return mask


def _group_starts(group_sizes: list[int]) -> list[int]:
    starts, total = [], 0
    for size in group_sizes:
        starts.append(total)
        total += size
    return starts
