"""Finished responses are charged their finished cost: in the search (a candidate that
ends in its block), in the critic's cost-probe path, and in every decoder's final check,
so that a constraint only a whole response can break (a required word, a minimum
length) is enforced like any other."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import PROMPT

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.baselines import ARGS, BestOfN, SamplingDecoder
from inference_safeguard.constraints import Constraint, Constraints
from inference_safeguard.errors import RefusalOverBudgetWarning
from inference_safeguard.programmatic import ConstraintScorer, LengthCost, RequiredKeywordsCost
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.testing import build_random_critic

SEEDS = range(8)
WORD = "close"  # in about a quarter of the tiny model's plain samples of PROMPT
MIN_WORDS = 20  # about a third of its plain samples are this long

# The default refusal lacks the word and is short: the guard rightly warns of it.
pytestmark = pytest.mark.filterwarnings(
    "ignore::inference_safeguard.errors.RefusalOverBudgetWarning"
)


def plain_samples(tiny_model, tiny_tokenizer, cost, config, n=24):
    sampler = SamplingDecoder(tiny_model, tiny_tokenizer, cost=cost, config=config)
    torch.manual_seed(5)
    return sampler.generate_batch([PROMPT] * n, seed=None)


def guarded(tiny_model, tiny_tokenizer, config, **kwargs):
    guard = InferenceGuard(tiny_model, tiny_tokenizer, config=config, **kwargs)
    return [guard.generate(PROMPT, seed=seed) for seed in SEEDS]


class CountingRequired(RequiredKeywordsCost):
    """A required-keywords cost that counts its prefix and finished calls."""

    def __init__(self, words) -> None:
        super().__init__(words)
        self.prefix_calls = self.finished_calls = 0

    def _score(self, prompts, responses):
        self.prefix_calls += 1
        return super()._score(prompts, responses)

    def _score_complete(self, prompts, responses):
        self.finished_calls += 1
        return super()._score_complete(prompts, responses)


# ------------------------------------------------------------------ the search
def test_a_guard_never_returns_a_response_missing_a_required_word_unflagged(
    tiny_model, tiny_tokenizer, small_config
):
    required = RequiredKeywordsCost([WORD])
    config = small_config.with_overrides(budget=0.0)
    plain = plain_samples(tiny_model, tiny_tokenizer, required, config)
    missing = [r for r in plain if required.missing(r.text)]
    assert missing, "plain sampling should miss the word sometimes"
    assert all(not r.safe and r.cost == 1.0 for r in missing)  # the final check sees it
    results = guarded(tiny_model, tiny_tokenizer, config, cost=required)
    kept = [r for r in results if not r.refused]
    for result in kept:
        assert result.safe and not required.missing(result.text), result.text
        assert result.cost == 0.0
    assert all(r.refused or r.safe for r in results)
    # The search seeks the word out rather than refusing: more responses carry it.
    assert len(kept) / len(results) > 1 - len(missing) / len(plain)


def test_a_guard_never_returns_a_response_under_the_minimum_length_unflagged(
    tiny_model, tiny_tokenizer, small_config
):
    length = LengthCost(min_length=MIN_WORDS)
    config = small_config.with_overrides(budget=0.0)
    plain = plain_samples(tiny_model, tiny_tokenizer, length, config)
    short = [r for r in plain if len(r.text.split()) < MIN_WORDS]
    assert short and all(not r.safe for r in short)
    results = guarded(tiny_model, tiny_tokenizer, config, cost=length)
    kept = [r for r in results if not r.refused]
    assert kept
    for result in kept:
        assert result.safe and len(result.text.split()) >= MIN_WORDS, result.text


def test_several_constraints_each_get_their_finished_cost(tiny_model, tiny_tokenizer, small_config):
    costs = {
        "required": (RequiredKeywordsCost([WORD]), 0.0),
        "length": (LengthCost(min_length=MIN_WORDS - 5), 0.0),
        "words": (KeywordCost(["zzz"]), 0.0),  # a plain scorer beside them
    }
    results = guarded(tiny_model, tiny_tokenizer, small_config, costs=costs)
    assert any(not r.refused for r in results)
    for result in results:
        if result.refused:
            continue
        assert WORD in result.text.lower() and len(result.text.split()) >= MIN_WORDS - 5
        assert {c.name: c.cost for c in result.constraints} == {
            "required": 0.0,
            "length": 0.0,
            "words": 0.0,
        }


def test_the_critics_cost_probe_path_charges_finished_costs(
    tiny_model, tiny_tokenizer, small_config
):
    config = small_config.with_overrides(block_size=4, budget=0.0)
    critic = build_random_critic(tiny_model, budget=0.0, block_size=4)
    required = RequiredKeywordsCost([WORD])
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=required, critic=critic, config=config)
    results = [guard.generate(PROMPT, seed=seed, cost_probe=True) for seed in SEEDS]
    for result in results:
        assert result.refused or (result.safe and not required.missing(result.text))
    returned = [guard.generate(PROMPT, seed=s, cost_probe=True, on_unsafe="return") for s in SEEDS]
    for result in returned:  # what the search kept carries its finished cost
        assert result.cost == float(len(required.missing(result.text)))


# ------------------------------------------------------------- final check
@pytest.mark.parametrize(
    "decoder",
    [
        lambda m, t, c, cfg: BestOfN(m, t, cost=c, config=cfg),
        lambda m, t, c, cfg: SamplingDecoder(m, t, cost=c, config=cfg),
        lambda m, t, c, cfg: ARGS(m, t, cost=c, config=cfg, reward_weight=0.0, cost_weight=1.0),
    ],
    ids=["best-of-n", "sampling", "args"],
)
def test_baselines_report_the_finished_cost_of_what_they_return(
    decoder, tiny_model, tiny_tokenizer, small_config
):
    required = RequiredKeywordsCost([WORD, "zzzz"])  # "zzzz" is never said
    baseline = decoder(tiny_model, tiny_tokenizer, required, small_config.with_overrides(budget=0))
    for seed in range(3):
        result = baseline.generate(PROMPT, seed=seed)
        assert result.cost == float(len(required.missing(result.text))) >= 1.0
        assert not result.safe


def test_the_final_check_reuses_the_searchs_finished_cost(tiny_model, tiny_tokenizer, small_config):
    required = CountingRequired([WORD])
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=required, config=small_config)
    guard.generate(PROMPT, seed=0, on_unsafe="return")
    blocks = small_config.max_new_tokens // small_config.block_size
    # At most two calls per scored batch (finished rows, the rest); none after the search
    # but the refusal's own check.
    assert required.finished_calls >= 1
    assert required.prefix_calls + required.finished_calls <= 2 * blocks * (
        1 + small_config.resample_rounds
    )


# ------------------------------------------------------------- Constraints.score
def test_constraints_score_finished_rows_in_one_call_and_the_rest_in_another():
    required = CountingRequired(["paris"])
    constraints = Constraints([Constraint("required", required)])
    responses = ["in paris", "in rome", "in rome", "paris"]
    scored = constraints.score(["p"] * 4, responses, [True, True, False, False])
    assert scored[:, 0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert (required.prefix_calls, required.finished_calls) == (1, 1)
    assert constraints.score(["p"] * 4, responses, finished=True)[:, 0].tolist() == [
        0.0,
        1.0,
        1.0,
        0.0,
    ]
    assert constraints.score(["p"] * 4, responses)[:, 0].tolist() == [0.0] * 4
    assert isinstance(required, ConstraintScorer)
    with pytest.raises(ValueError, match="finished has 1 flags for 4 responses"):
        constraints.score(["p"] * 4, responses, [True])


def test_the_refusal_is_checked_as_a_finished_response(tiny_model, tiny_tokenizer):
    config = GuardConfig(
        num_candidates=4,
        beam_width=2,
        block_size=8,
        max_new_tokens=16,
        budget=0.0,
        refusal_text="I cannot help with that; the answer needs zzzz.",
    )
    guard = InferenceGuard(
        tiny_model, tiny_tokenizer, cost=RequiredKeywordsCost(["zzzz"]), config=config
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefusalOverBudgetWarning)
        result = guard.generate(PROMPT, seed=0)
    assert result.refused and result.text == config.refusal_text
    with pytest.warns(RefusalOverBudgetWarning):
        guard.generate(PROMPT, seed=0, refusal_text="I cannot help with that.")
