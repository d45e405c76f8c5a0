"""Tests for the programmatic constraints (`inference_safeguard.programmatic`) and the
composite scorers (`inference_safeguard.composite`): costs on prefixes never charge what
a continuation could still fix, and finished responses are charged in full."""

from __future__ import annotations

import json

import pytest
import torch

from inference_safeguard.composite import ScorerMax, ScorerSum
from inference_safeguard.errors import InvalidPromptError
from inference_safeguard.programmatic import (
    KeywordReward,
    LengthCost,
    RequiredKeywordsCost,
    ShapeCost,
    score_complete,
)
from inference_safeguard.scorers import CallableScorer, KeywordCost
from inference_safeguard.testing import build_tiny_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


def prefixes(text: str) -> list[str]:
    return [text[:end] for end in range(len(text) + 1)]


def test_scorers_are_importable_from_the_scorers_module():
    from inference_safeguard import scorers

    assert scorers.LengthCost is LengthCost
    assert scorers.ScorerSum is ScorerSum
    with pytest.raises(AttributeError):
        _ = scorers.NoSuchScorer


def test_length_cost_charges_a_prefix_over_the_maximum_and_a_short_response_only_at_the_end():
    cost = LengthCost(max_length=3, min_length=2, weight=2.0)
    responses = ["one", "one two three", "one two three four five"]
    assert cost(["p"] * 3, responses).tolist() == [0.0, 0.0, 4.0]
    assert cost.score_complete(["p"] * 3, responses).tolist() == [2.0, 0.0, 4.0]


def test_length_cost_on_prefixes_never_exceeds_the_finished_cost():
    cost = LengthCost(max_length=4, min_length=3)
    text = "a quick brown fox jumps over"
    final = cost.score_complete(["p"], [text]).item()
    costs = cost(["p"] * (len(text) + 1), prefixes(text)).tolist()
    assert all(c <= final for c in costs)
    assert costs == sorted(costs)  # grows with the prefix


def test_length_cost_counts_tokens_with_a_tokenizer():
    tokenizer = build_tiny_tokenizer()
    text = "the dog ran to the river"
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    cost = LengthCost(max_length=tokens - 1, tokenizer=tokenizer)
    assert cost(["p"], [text]).item() == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"max_length": -1}, {"max_length": 2, "min_length": 3}, {"max_length": 1.5}],
)
def test_length_cost_rejects_bad_limits(kwargs):
    with pytest.raises(ValueError, match="LengthCost"):
        LengthCost(**kwargs)


def test_required_keywords_cost_nothing_on_prefixes_and_count_missing_at_the_end():
    cost = RequiredKeywordsCost(["Paris", "Eiffel Tower"], weight=3.0)
    responses = ["I love it", "Paris has the Eiffel\n tower", "paris!"]
    assert cost(["p"] * 3, responses).tolist() == [0.0, 0.0, 0.0]
    assert cost.score_complete(["p"] * 3, responses).tolist() == [6.0, 0.0, 3.0]
    assert cost.missing("Parisian towers") == ["paris", "eiffel tower"]


def test_keyword_reward_counts_distinct_words_present():
    reward = KeywordReward(["paris", "seine"], weight=0.5)
    assert reward(["p"] * 3, ["Paris, Paris", "the Seine in Paris", "Lyon"]).tolist() == [
        0.5,
        1.0,
        0.0,
    ]


def test_shape_cost_charges_a_regex_prefix_only_once_it_can_no_longer_match():
    cost = ShapeCost.regex(r"(yes|no)\. [A-Z][a-z]+\.")
    assert cost(["p"] * 4, ["", " ye", "yes. Bo", "maybe"]).tolist() == [0.0, 0.0, 0.0, 1.0]
    finished = cost.score_complete(["p"] * 3, ["yes. Bob.", "yes. Bo", "yes. bob."])
    assert finished.tolist() == [0.0, 1.0, 1.0]


def test_shape_cost_follows_a_json_schema_over_every_prefix():
    cost = ShapeCost.json_schema(SCHEMA, weight=5.0)
    good = json.dumps({"city": "Paris", "population": 2100000})
    assert cost(["p"] * (len(good) + 1), prefixes(good)).tolist() == [0.0] * (len(good) + 1)
    assert cost.score_complete(["p"], [good]).item() == 0.0
    assert cost.score_complete(["p"], [good[:-1]]).item() == 5.0  # unfinished object
    assert cost(["p"], ['{"city": "Paris", "population": "many"']).item() == 5.0
    assert cost(["p"], ['{"country": ']).item() == 5.0


def test_shape_cost_rejects_a_pattern_that_does_not_compile():
    with pytest.raises(ValueError, match="ShapeCost"):
        ShapeCost.regex("(unclosed")
    with pytest.raises(ValueError, match="not valid JSON"):
        ShapeCost.json_schema("{nope")


def test_sum_and_max_weigh_their_parts_and_pass_finished_scores_through():
    length = LengthCost(max_length=2, min_length=2)
    forbidden = KeywordCost(["bomb"])
    total = ScorerSum([(length, 2.0), forbidden])
    worst = ScorerMax([(length, 2.0), (forbidden, 10.0)])
    responses = ["bomb", "a b c bomb"]
    assert total(["p"] * 2, responses).tolist() == [1.0, 5.0]
    assert total.score_complete(["p"] * 2, responses).tolist() == [3.0, 5.0]
    assert worst(["p"] * 2, responses).tolist() == [10.0, 10.0]
    assert score_complete(worst, ["p"], ["a"]).tolist() == [2.0]
    assert score_complete(forbidden, ["p"], ["bomb bomb"]).tolist() == [2.0]


def test_a_reward_minus_a_cost_is_a_signed_sum():
    reward = KeywordReward(["paris"])
    score = ScorerSum([(reward, 1.0), (CallableScorer(lambda p, r: [len(x) for x in r]), -0.1)])
    assert score(["p"], ["Paris"]).tolist() == pytest.approx([0.5])


def test_composites_reject_bad_terms():
    with pytest.raises(TypeError, match="ScorerSum"):
        ScorerSum([])
    with pytest.raises(TypeError, match="not a Scorer"):
        ScorerSum([lambda p, r: r])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=">= 0"):
        ScorerMax([(KeywordCost(["x"]), -1.0)])


def test_specs_build_each_scorer(tmp_path):
    assert LengthCost.from_spec("max_words=3; min_words=1").max_length == 3
    required = RequiredKeywordsCost.from_spec("words=Paris, Eiffel Tower;weight=2")
    assert required.words == ("paris", "eiffel tower") and required.weight == 2.0
    assert KeywordReward.from_spec("words=a,b").words == ("a", "b")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    shape = ShapeCost.from_spec(f"json_schema={schema}")
    assert shape(["p"], ["[1"]).item() == 1.0
    assert ShapeCost.from_spec("regex=[0-9]+").score_complete(["p"], ["42"]).item() == 0.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("max_words", "not key=value"),
        ("colour=red", "unknown option"),
        ("max_words=1;max_words=2", "given twice"),
        ("max_words=many", "not an integer"),
        ("max_words=3;weight=inf", "finite"),
    ],
)
def test_bad_specs_say_how_to_write_them(spec, message):
    with pytest.raises(ValueError, match=message):
        LengthCost.from_spec(spec)


def test_score_complete_validates_its_inputs():
    cost = RequiredKeywordsCost(["x"])
    with pytest.raises(InvalidPromptError):
        cost.score_complete(["p"], ["a", "b"])
    assert cost.score_complete([], []).shape == torch.Size([0])
