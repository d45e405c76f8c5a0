"""Unit tests for the safety state and candidate scores in `inference_safeguard.safety`
(synthetic tensors)."""

from __future__ import annotations

import pytest
import torch

from inference_safeguard.safety import (
    augmented_score,
    initial_safety_state,
    lagrangian_score,
    top_k_per_group,
    unsafe_token_mask,
    update_safety_state,
)

# --- safety state ---------------------------------------------------------------------------


def test_initial_safety_state_is_the_budget_on_every_row() -> None:
    z = initial_safety_state(2.5, rows=4)
    assert z.shape == (4,)
    assert z.dtype == torch.float64
    assert torch.equal(z, torch.full((4,), 2.5))


def test_undiscounted_state_equals_budget_minus_cumulative_cost_over_blocks() -> None:
    budget = 10.0
    # Cumulative cost of 3 rows after each of 4 blocks (not monotone: a cost model may revise).
    cumulative = torch.tensor(
        [
            [0.0, 0.0, 0.0],
            [1.5, 0.0, 4.0],
            [3.0, 2.25, 11.0],
            [3.0, 9.5, 12.5],
            [4.0, 10.0, 7.0],
        ]
    )
    tokens = torch.tensor([8, 3, 8])
    z = initial_safety_state(budget, rows=3)
    for block in range(1, cumulative.shape[0]):
        z = update_safety_state(z, cumulative[block - 1], cumulative[block], tokens, discount=1.0)
        assert torch.equal(z, budget - cumulative[block])


def test_discounted_state_divides_by_gamma_to_the_power_of_each_rows_tokens() -> None:
    z = torch.tensor([5.0, 5.0, -1.0, 2.0])
    previous = torch.tensor([1.0, 1.0, 3.0, 0.0])
    new = torch.tensor([2.0, 2.0, 4.0, 0.5])
    tokens = torch.tensor([1, 4, 2, 0])
    gamma = 0.9
    got = update_safety_state(z, previous, new, tokens, discount=gamma)
    expected = torch.tensor(
        [
            (5.0 - 1.0) / gamma**1,
            (5.0 - 1.0) / gamma**4,
            (-1.0 - 1.0) / gamma**2,
            (2.0 - 0.5) / gamma**0,
        ]
    )
    torch.testing.assert_close(got, expected)


def test_discounted_state_matches_token_by_token_recursion_when_cost_lands_at_block_end() -> None:
    """`z_{t+1} = (z_t - c_t) / gamma` with the whole block's cost on its first token."""
    gamma = 0.95
    z = initial_safety_state(3.0, rows=2)
    costs = torch.tensor([[0.0, 0.0], [0.5, 2.0], [1.0, 2.5]])
    tokens = torch.tensor([4, 6])
    reference = z.clone().double()
    for block in range(1, costs.shape[0]):
        z = update_safety_state(z, costs[block - 1], costs[block], tokens, discount=gamma)
        increment = (costs[block] - costs[block - 1]).double()
        for row in range(2):
            step_costs = [increment[row].item()] + [0.0] * (int(tokens[row]) - 1)
            for c in step_costs:
                reference[row] = (reference[row] - c) / gamma
    torch.testing.assert_close(z.double(), reference, rtol=1e-5, atol=1e-5)


# --- scores ---------------------------------------------------------------------------------


def test_augmented_score_keeps_reward_on_safe_rows_and_gives_minus_n_plus_z_on_unsafe() -> None:
    reward = torch.tensor([0.3, -2.0, 5.0, 1.0])
    z = torch.tensor([0.0, 1.5, -0.5, -3.0])
    got = augmented_score(reward, z, unsafe_penalty=100.0)
    assert torch.equal(got, torch.tensor([0.3, -2.0, -100.5, -103.0]))


def test_every_unsafe_candidate_ranks_below_every_safe_one_when_n_exceeds_reward_range() -> None:
    generator = torch.Generator().manual_seed(7)
    reward = torch.rand(64, generator=generator) * 20 - 10  # within [-10, 10]
    z = torch.randn(64, generator=generator) * 3
    safe = z >= 0
    assert safe.any() and (~safe).any()
    scores = augmented_score(reward, z, unsafe_penalty=25.0)
    assert scores[~safe].max() < scores[safe].min()


def test_smaller_violation_ranks_higher_among_unsafe_candidates() -> None:
    reward = torch.tensor([9.0, -9.0, 0.0])  # reward must not matter once over budget
    z = torch.tensor([-4.0, -0.1, -1.0])
    scores = augmented_score(reward, z, unsafe_penalty=50.0)
    assert torch.argsort(scores, descending=True).tolist() == [1, 2, 0]


def test_lagrangian_score_is_reward_minus_multiplier_times_cost() -> None:
    reward = torch.tensor([1.0, 2.0, -1.0])
    cost = torch.tensor([0.5, 4.0, 0.0])
    assert torch.equal(lagrangian_score(reward, cost, 2.0), torch.tensor([0.0, -6.0, -1.0]))
    assert torch.equal(lagrangian_score(reward, cost, 0.0), reward)


# --- selection ------------------------------------------------------------------------------


def test_top_k_per_group_returns_global_indices_of_each_groups_best_first() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 3.0, -1.0, 2.0, 1.0])
    selected = top_k_per_group(scores, [4, 4], k=2)
    assert [s.tolist() for s in selected] == [[1, 3], [4, 6]]
    assert all(s.dtype == torch.long for s in selected)


def test_top_k_per_group_breaks_ties_by_keeping_the_earlier_index_first() -> None:
    scores = torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    selected = top_k_per_group(scores, [5, 4], k=4)
    assert [s.tolist() for s in selected] == [[1, 2, 4, 0], [5, 6, 7, 8]]


def test_top_k_per_group_tie_order_holds_in_large_groups() -> None:
    # Large inputs are where an unstable sort would reorder ties.
    scores = (torch.arange(6000) % 7 == 0).float()
    selected = top_k_per_group(scores, [2000, 4000], k=4000)
    for group, start, size in zip(selected, (0, 2000), (2000, 4000), strict=True):
        rows = torch.arange(start, start + size)
        expected = torch.cat([rows[scores[rows] == 1], rows[scores[rows] == 0]])
        assert torch.equal(group, expected)


def test_top_k_per_group_keeps_whole_group_when_smaller_than_k() -> None:
    scores = torch.tensor([0.2, 5.0, 1.0, 3.0, 4.0, 2.0])
    selected = top_k_per_group(scores, [1, 2, 3], k=3)
    assert [s.tolist() for s in selected] == [[0], [1, 2], [4, 3, 5]]


def test_unsafe_token_mask_marks_tokens_of_unsafe_rows_per_group_only() -> None:
    tokens = torch.tensor(
        [
            [1, 2, 2],  # group 0, unsafe
            [3, 4, 5],  # group 0, safe: its tokens must not be marked
            [6, -1, -1],  # group 1, unsafe, padded
            [0, 7, 8],  # group 1, safe
            [9, 9, 9],  # group 2, safe
        ]
    )
    unsafe = torch.tensor([True, False, True, False, False])
    mask = unsafe_token_mask(tokens, unsafe, [2, 2, 1], vocab_size=10)
    assert mask.shape == (3, 10)
    assert mask.dtype == torch.bool
    assert mask[0].nonzero().flatten().tolist() == [1, 2]
    assert mask[1].nonzero().flatten().tolist() == [6]
    assert not mask[2].any()


def test_unsafe_token_mask_ignores_negative_padding_ids() -> None:
    tokens = torch.tensor([[-1, -5, 3], [-1, -1, -1]])
    unsafe = torch.tensor([True, True])
    mask = unsafe_token_mask(tokens, unsafe, [2], vocab_size=4)
    # -1 would otherwise wrap around to the last vocabulary id.
    assert mask.tolist() == [[False, False, False, True]]


# --- purity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("discount", [1.0, 0.9])
def test_update_safety_state_does_not_modify_its_inputs(discount: float) -> None:
    inputs = (
        torch.tensor([1.0, -2.0, 3.0]),
        torch.tensor([0.0, 1.0, 2.0]),
        torch.tensor([0.5, 1.5, 2.0]),
        torch.tensor([2, 3, 4]),
    )
    before = [t.clone() for t in inputs]
    out = update_safety_state(*inputs, discount=discount)
    out.add_(1000.0)  # the result must not alias an input either
    for original, tensor in zip(before, inputs, strict=True):
        assert torch.equal(original, tensor)


def test_scores_do_not_modify_their_inputs() -> None:
    reward = torch.tensor([1.0, 2.0, -3.0])
    z = torch.tensor([0.5, -1.0, 0.0])
    cost = torch.tensor([0.2, 0.0, 4.0])
    before = [t.clone() for t in (reward, z, cost)]
    augmented_score(reward, z, 10.0).add_(1000.0)
    lagrangian_score(reward, cost, 0.5).add_(1000.0)
    for original, tensor in zip(before, (reward, z, cost), strict=True):
        assert torch.equal(original, tensor)


def test_selection_and_mask_do_not_modify_their_inputs() -> None:
    scores = torch.tensor([0.3, 0.1, 0.2, 0.5, 0.4])
    tokens = torch.tensor([[1, -1], [2, 3], [0, 0], [4, 1], [-1, 2]])
    unsafe = torch.tensor([True, False, True, True, False])
    group_sizes = [3, 2]
    before = (scores.clone(), tokens.clone(), unsafe.clone(), list(group_sizes))
    top_k_per_group(scores, group_sizes, k=2)
    unsafe_token_mask(tokens, unsafe, group_sizes, vocab_size=5)
    assert torch.equal(before[0], scores)
    assert torch.equal(before[1], tokens)
    assert torch.equal(before[2], unsafe)
    assert before[3] == group_sizes
