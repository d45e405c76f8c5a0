"""Several named constraints with their own budgets: search, final check, record, overrides."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT

from inference_safeguard import GuardConfig, InferenceGuard, UnsafeGenerationError
from inference_safeguard.baselines import ARGS, BestOfN
from inference_safeguard.constraints import DEFAULT_CONSTRAINT, Constraints
from inference_safeguard.engine import GuardEngine
from inference_safeguard.errors import ConstraintError, MissingCostModelError
from inference_safeguard.results import ConstraintOutcome
from inference_safeguard.scorers import CallableScorer, KeywordCost
from inference_safeguard.testing import build_random_critic

SEEDS = range(12)


@pytest.fixture(scope="module")
def two_costs(frequent_words) -> dict[str, KeywordCost]:
    """Two keyword costs over disjoint halves of the words the tiny model says most."""
    half = len(frequent_words) // 2
    return {
        "first": KeywordCost(frequent_words[:half]),
        "second": KeywordCost(frequent_words[half:]),
    }


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer, two_costs, small_config) -> InferenceGuard:
    return InferenceGuard(
        tiny_model,
        tiny_tokenizer,
        costs={name: (scorer, 0.0) for name, scorer in two_costs.items()},
        config=small_config,
    )


def own_costs(two_costs, texts: list[str]) -> dict[str, list[float]]:
    return {
        name: scorer([PROMPT] * len(texts), texts).tolist() for name, scorer in two_costs.items()
    }


# ------------------------------------------------------------------ the search
def test_every_returned_response_is_within_every_constraint(guard, two_costs):
    results = [guard.generate(PROMPT, seed=seed) for seed in SEEDS]
    texts = [r.text for r in results]
    for name, costs in own_costs(two_costs, texts).items():
        assert all(cost <= 0.0 for cost in costs), name
    assert all(r.safe and not r.refused for r in results)
    for result in results:
        assert [c.name for c in result.constraints] == ["first", "second"]
        assert all(c.safe and c.budget == 0.0 for c in result.constraints)


def test_guarding_one_constraint_lets_the_other_through_where_both_are_held(
    tiny_model, tiny_tokenizer, two_costs, small_config, guard
):
    first_only = InferenceGuard(
        tiny_model, tiny_tokenizer, cost=two_costs["first"], config=small_config
    )
    loose = [first_only.generate(PROMPT, seed=seed).text for seed in SEEDS]
    held = [guard.generate(PROMPT, seed=seed).text for seed in SEEDS]
    assert sum(cost > 0 for cost in own_costs(two_costs, loose)["second"]) >= 3
    assert all(cost <= 0 for cost in own_costs(two_costs, held)["second"])


def test_one_named_constraint_decodes_exactly_as_cost_with_budget(
    tiny_model, tiny_tokenizer, keyword_cost, small_config
):
    plain = InferenceGuard(
        tiny_model, tiny_tokenizer, cost=keyword_cost, config=small_config.with_overrides(budget=1)
    )
    named = InferenceGuard(
        tiny_model, tiny_tokenizer, costs={"words": (keyword_cost, 1.0)}, config=small_config
    )
    for seed in range(4):
        a, b = plain.generate(PROMPT, seed=seed), named.generate(PROMPT, seed=seed)
        assert a.token_ids == b.token_ids and a.cost == b.cost and a.budget == b.budget == 1.0
        assert a.constraints[0].name == DEFAULT_CONSTRAINT and b.constraints[0].name == "words"


def test_a_block_whose_candidates_each_break_some_constraint_is_resampled(
    tiny_model, tiny_tokenizer, small_config
):
    # Every candidate breaks "long" (any text) or "short" (no text): never both held.
    costs = {
        "long": (CallableScorer(lambda p, r: float(len(r) > 0), batched=False), 0.0),
        "never": (CallableScorer(lambda p, r: 1.0, batched=False), 0.5),
    }
    guard = InferenceGuard(tiny_model, tiny_tokenizer, costs=costs, config=small_config)
    result = guard.generate(PROMPT, seed=0, on_unsafe="return")
    assert result.stats.resample_rounds == small_config.resample_rounds * result.stats.blocks
    assert not result.safe
    verdicts = {c.name: c.safe for c in result.constraints}
    assert verdicts == {"long": False, "never": False}
    # The scalar fields are those of the worst constraint (least margin budget - cost).
    assert (result.cost, result.budget) == (1.0, 0.0)


def test_unsafe_candidates_rank_by_their_worst_violation(tiny_model, tiny_tokenizer, small_config):
    # Nothing is within "a"; under "b" shorter texts violate less: the search must prefer
    # them, since every candidate's worst violation is b's once b's cost exceeds a's.
    costs = {
        "a": (CallableScorer(lambda p, r: 1.0, batched=False), 0.0),
        "b": (CallableScorer(lambda p, r: 1.0 + len(r), batched=False), 0.0),
    }
    guard = InferenceGuard(tiny_model, tiny_tokenizer, costs=costs, config=small_config)
    a_only = InferenceGuard(
        tiny_model,
        tiny_tokenizer,
        costs={"a": costs["a"], "b": (costs["b"][0], 1e9)},
        config=small_config,
    )
    ranked = [len(guard.generate(PROMPT, seed=s, on_unsafe="return").text) for s in range(4)]
    blind = [len(a_only.generate(PROMPT, seed=s, on_unsafe="return").text) for s in range(4)]
    assert sum(ranked) < sum(blind)


# ------------------------------------------------------------- final check
def test_a_response_over_one_budget_is_refused_and_the_record_names_it(
    tiny_model, tiny_tokenizer, small_config
):
    refusal = small_config.refusal_text
    costs = {
        "free": (CallableScorer(lambda p, r: 0.0, batched=False), 0.0),
        "strict": (CallableScorer(lambda p, r: float(r != refusal), batched=False), 0.5),
    }
    guard = InferenceGuard(tiny_model, tiny_tokenizer, costs=costs, config=small_config)
    result = guard.generate(PROMPT, seed=0)
    assert result.refused and not result.safe and result.text == refusal
    record = result.safety_record()
    assert record["constraints"] == {
        "free": {"cost": 0.0, "budget": 0.0, "safe": True},
        "strict": {"cost": 1.0, "budget": 0.5, "safe": False},
    }
    assert (record["cost"], record["budget"], record["safe"]) == (1.0, 0.5, False)
    with pytest.raises(UnsafeGenerationError, match=r"strict cost 1 > budget 0\.5"):
        guard.generate(PROMPT, seed=0, on_unsafe="raise")


def test_the_one_cost_is_reported_as_a_named_constraint(tiny_model, tiny_tokenizer, keyword_cost):
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=keyword_cost)
    result = guard.generate(PROMPT, seed=0, max_new_tokens=8)
    assert result.constraints == (
        ConstraintOutcome(DEFAULT_CONSTRAINT, result.cost, result.budget, result.safe),
    )


def test_streamed_text_is_within_every_constraint(guard, two_costs):
    for seed in range(3):
        with guard.stream(PROMPT, seed=seed) as stream:
            text = "".join(stream)
        assert text == stream.result.text
        assert all(c <= 0 for costs in own_costs(two_costs, [text]).values() for c in costs)


# -------------------------------------------------------------- budgets
def test_a_call_overrides_some_budgets_by_name(guard, two_costs):
    config = guard.call_config({"budgets": {"second": 50.0}})
    assert config.budgets == {"first": 0.0, "second": 50.0}
    texts = [guard.generate(PROMPT, seed=s, budgets={"second": 50.0}).text for s in SEEDS]
    spent = own_costs(two_costs, texts)
    assert all(c <= 0 for c in spent["first"]) and any(c > 0 for c in spent["second"])
    assert guard.generate(PROMPT, seed=0, budgets={"second": 50.0}).constraints[1].budget == 50


def test_budgets_of_unknown_constraints_and_an_ambiguous_budget_are_rejected(guard):
    with pytest.raises(ConstraintError, match=r"\['pii'\].*\['first', 'second'\]"):
        guard.generate(PROMPT, budgets={"pii": 0.5})
    with pytest.raises(ConstraintError, match="budgets=\\{name: value\\}"):
        guard.generate(PROMPT, budget=1.0)


def test_a_one_constraint_guard_takes_its_budget_by_name_too(
    tiny_model, tiny_tokenizer, keyword_cost
):
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=keyword_cost)
    assert guard.call_config({"budgets": {"cost": 2.5}}).budget == 2.5
    with pytest.raises(ConstraintError, match="not constraints of this guard"):
        guard.call_config({"budgets": {"violence": 1.0}})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, MissingCostModelError, "needs a cost model"),
        ({"costs": {}}, ConstraintError, "non-empty mapping"),
        ({"costs": {"a": KeywordCost(["x"])}}, ConstraintError, "pair"),
        ({"costs": {"a": (KeywordCost(["x"]), float("nan"))}}, ConstraintError, "finite"),
        ({"costs": {"a": (KeywordCost(["x"]), True)}}, ConstraintError, "finite"),
        ({"costs": {"": (KeywordCost(["x"]), 0.0)}}, ConstraintError, "non-empty"),
        ({"costs": {"a": ("kill", 0.0)}}, TypeError, "Scorer"),
        (
            {"cost": KeywordCost(["x"]), "costs": {"a": (KeywordCost(["x"]), 0.0)}},
            ConstraintError,
            "not both",
        ),
    ],
)
def test_malformed_constraints_are_rejected_with_a_hint(
    tiny_model, tiny_tokenizer, kwargs, error, match
):
    with pytest.raises(error, match=match):
        InferenceGuard(tiny_model, tiny_tokenizer, **kwargs)


def test_critic_mode_needs_one_constraint(tiny_model, tiny_tokenizer, two_costs):
    critic = build_random_critic(tiny_model, budget=0.0, block_size=4)
    with pytest.raises(ConstraintError, match="one constraint"):
        InferenceGuard(
            tiny_model,
            tiny_tokenizer,
            costs={name: (scorer, 0.0) for name, scorer in two_costs.items()},
            critic=critic,
        )


def test_constraints_score_one_column_per_constraint(two_costs):
    constraints = Constraints.of("test", None, {n: (s, 0.0) for n, s in two_costs.items()})
    texts = ["a", "b c"]
    scored = constraints.score([PROMPT] * 2, texts)
    assert scored.shape == (2, 2) and scored.dtype == torch.float64
    for column, scorer in enumerate(two_costs.values()):
        assert torch.equal(scored[:, column], scorer([PROMPT] * 2, texts))


# ----------------------------------------------------- baselines and engine
def test_best_of_n_ranks_by_every_constraint_and_reports_each(
    tiny_model, tiny_tokenizer, two_costs, small_config
):
    costs = {name: (scorer, 0.0) for name, scorer in two_costs.items()}
    bon = BestOfN(tiny_model, tiny_tokenizer, costs=costs, config=small_config, scoring="augmented")
    results = [bon.generate(PROMPT, seed=s) for s in range(6)]
    for result in results:
        spent = own_costs(two_costs, [result.text])
        assert [c.cost for c in result.constraints] == [spent["first"][0], spent["second"][0]]
        assert result.safe == all(c.safe for c in result.constraints)


def test_args_with_cost_sums_the_constraints(tiny_model, tiny_tokenizer, two_costs, small_config):
    costs = {name: (scorer, 0.0) for name, scorer in two_costs.items()}
    args = ARGS(
        tiny_model,
        tiny_tokenizer,
        costs=costs,
        config=small_config,
        reward_weight=0,
        cost_weight=10.0,
    )
    result = args.generate(PROMPT, seed=0, max_new_tokens=8)
    assert [c.name for c in result.constraints] == ["first", "second"]
    assert result.safe


def test_the_engine_serves_per_request_budgets_as_the_guard_does(guard):
    with GuardEngine(guard) as engine:
        served = engine.generate(PROMPT, seed=3, budgets={"second": 50.0})
        strict = engine.generate(PROMPT, seed=3)
    alone = guard.generate(PROMPT, seed=3, budgets={"second": 50.0})
    assert served.token_ids == alone.token_ids
    assert served.constraints[1].budget == 50.0 and strict.constraints[1].budget == 0.0


def test_configs_resolve_budgets_in_constraint_order(guard):
    config = guard.call_config({"budgets": {"second": 1.0, "first": 2.0}})
    assert list(config.budgets.items()) == [("first", 2.0), ("second", 1.0)]
    assert isinstance(guard.config, GuardConfig) and guard.config.budgets == {
        "first": 0.0,
        "second": 0.0,
    }
