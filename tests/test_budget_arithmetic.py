"""Budget arithmetic: a cost is compared with the budget as the cost model returned it
(float64, no rounding to float32), and negative costs are kept, so a negative budget can
be met. Through InferenceGuard (models and critic mode, generate and stream) and the
baselines."""

from __future__ import annotations

import pytest
from conftest import PROMPT

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.baselines import ARGS, BestOfN, BlockBeamSearch, SamplingDecoder
from inference_safeguard.scorers import CallableScorer
from inference_safeguard.testing import build_random_critic

CONFIG = GuardConfig(num_candidates=4, beam_width=2, block_size=4, max_new_tokens=8, seed=0)
REFUSAL = CONFIG.refusal_text


def constant_cost(value: float) -> CallableScorer:
    """Costs `value` for every text but the refusal, which is within any budget here."""
    return CallableScorer(lambda prompt, response: -100.0 if response == REFUSAL else value, False)


def _guard(tiny_model, tiny_tokenizer, value: float, **kwargs) -> InferenceGuard:
    return InferenceGuard(
        tiny_model, tiny_tokenizer, cost=constant_cost(value), config=CONFIG, **kwargs
    )


@pytest.mark.parametrize(
    ("cost", "budget"),
    [(0.1, 0.1), (1 / 3, 1 / 3), (-1.0, -0.5), (-2.0, -2.0), (1e-9, 1e-9)],
)
def test_a_cost_within_the_budget_is_returned_as_the_model_gave_it(
    tiny_model, tiny_tokenizer, cost: float, budget: float
) -> None:
    guard = _guard(tiny_model, tiny_tokenizer, cost)
    result = guard.generate(PROMPT, budget=budget)
    assert (result.safe, result.refused, result.cost) == (True, False, cost)
    assert result.text.strip()
    stream = guard.stream(PROMPT, budget=budget)
    assert "".join(stream) == result.text
    assert (stream.result.safe, stream.result.cost) == (True, cost)


@pytest.mark.parametrize(
    ("cost", "budget"),
    [(0.1000000016, 0.1000000015), (0.0, -1e-12), (-0.5, -0.6), (0.1 + 1e-16 * 2, 0.1)],
)
def test_a_cost_over_the_budget_by_less_than_float32_resolution_is_refused(
    tiny_model, tiny_tokenizer, cost: float, budget: float
) -> None:
    result = _guard(tiny_model, tiny_tokenizer, cost).generate(PROMPT, budget=budget)
    assert (result.safe, result.refused, result.cost) == (False, True, cost)
    assert result.text == REFUSAL


def test_critic_mode_meets_a_negative_budget_with_negative_costs(tiny_model, tiny_tokenizer):
    critic = build_random_critic(tiny_model, budget=-0.5, block_size=CONFIG.block_size)
    guard = _guard(tiny_model, tiny_tokenizer, -1.0, critic=critic)
    result = guard.generate(PROMPT, budget=-0.5)
    assert (result.safe, result.refused, result.cost) == (True, False, -1.0)


@pytest.mark.parametrize("baseline", [SamplingDecoder, BestOfN, BlockBeamSearch])
def test_baselines_report_negative_and_boundary_costs_exactly(
    tiny_model, tiny_tokenizer, baseline
) -> None:
    for cost, budget in ((-1.0, -0.5), (0.1, 0.1)):
        decoder = baseline(tiny_model, tiny_tokenizer, cost=constant_cost(cost), config=CONFIG)
        result = decoder.generate(PROMPT, budget=budget)
        assert (result.safe, result.cost) == (True, cost)
        over = decoder.generate(PROMPT, budget=cost - 1e-12)
        assert (over.safe, over.cost) == (False, cost)


def test_args_reports_a_negative_cost_exactly(tiny_model, tiny_tokenizer) -> None:
    decoder = ARGS(
        tiny_model, tiny_tokenizer, cost=constant_cost(-1.0), config=CONFIG, reward_weight=0
    )
    result = decoder.generate(PROMPT, budget=-0.5, max_new_tokens=4)
    assert (result.safe, result.cost) == (True, -1.0)


def test_a_cost_that_reaches_the_budget_over_several_blocks_is_within_it(
    tiny_model, tiny_tokenizer
):
    # Summed per-block increments (d - c1) - (c2 - c1) - (c3 - c2) round below 0 here.
    d, c1, c2 = 0.405559060977284, 0.010362045542475249, 0.22096673355551888
    assert ((d - c1) - (c2 - c1)) - (d - c2) < 0
    config = CONFIG.with_overrides(temperature=0, block_size=4, max_new_tokens=12, budget=d)
    plain = SamplingDecoder(tiny_model, tiny_tokenizer, cost=constant_cost(0.0), config=config)
    ids = plain.generate(PROMPT).token_ids
    assert len(ids) == 12
    costs = {plain.lm.decode([ids[:n]])[0]: c for n, c in ((4, c1), (8, c2), (12, d))}
    cost = CallableScorer(
        lambda prompt, response: -100.0 if response == REFUSAL else costs.get(response, 10.0),
        batched=False,
    )
    result = InferenceGuard(tiny_model, tiny_tokenizer, cost=cost, config=config).generate(PROMPT)
    assert (result.safe, result.refused, result.cost) == (True, False, d)
    assert result.token_ids == ids and result.stats.resample_rounds == 0
