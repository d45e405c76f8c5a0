"""Calibrated rewards: quantiles within a prompt's candidates, invariant to the reward's scale."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PROMPT
from hypothesis import given, settings
from hypothesis import strategies as st
from property_strategies import PROFILE_VARIABLE

from inference_safeguard import GuardConfig
from inference_safeguard.baselines import BestOfN, BlockBeamSearch
from inference_safeguard.calibration import (
    calibrate_rewards,
    exponential_rewards,
    quantile_rewards,
)
from inference_safeguard.scorers import CallableScorer

SEEDS = range(3)
SEARCH_EXAMPLES = 4
"""Cases of the search property (each decodes 6 responses), on top of the loaded profile
(`PROFILE_VARIABLE` chooses it)."""
assert PROFILE_VARIABLE


def test_quantiles_are_mid_ranks_within_each_group():
    reward = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, -1.0, 7.0])
    quantile = quantile_rewards(reward, [4, 1, 2])
    # Group 1: 1 < 2 = 2 < 3; the tied pair shares the middle ranks.
    expected = [3.5 / 4, 0.5 / 4, 2.0 / 4, 2.0 / 4, 0.5, 0.25, 0.75]
    assert quantile.tolist() == pytest.approx(expected)
    assert quantile.dtype == torch.float64


def test_quantiles_check_the_groups_cover_the_rewards():
    with pytest.raises(ValueError, match="group_sizes sum to 3"):
        quantile_rewards(torch.zeros(4), [1, 2])


def test_exponential_transform_is_increasing_from_zero_to_one():
    q = torch.linspace(0, 1, 11)
    out = exponential_rewards(q, 5.0)
    assert out[0] == 0 and out[-1] == pytest.approx(1.0)
    assert bool((out.diff() > 0).all())
    assert out[5] == pytest.approx(math.expm1(2.5) / math.expm1(5.0))
    with pytest.raises(ValueError, match="exponent must be a finite number > 0"):
        exponential_rewards(q, 0.0)


def test_no_calibration_returns_the_rewards_themselves():
    reward = torch.tensor([0.3, -2.0])
    assert calibrate_rewards(reward, [2], "none", 5.0) is reward


@given(
    rewards=st.lists(st.integers(-20, 20), min_size=1, max_size=24),
    scale=st.floats(0.01, 100.0),
    shift=st.floats(-1e3, 1e3),
    split=st.integers(0, 24),
)
def test_quantiles_ignore_any_increasing_transform(rewards, scale, shift, split):
    reward = torch.tensor(rewards, dtype=torch.float64) / 4  # exact ties stay ties
    cut = min(split, len(rewards))
    groups = [size for size in (cut, len(rewards) - cut) if size]
    for method in ("quantile", "exponential"):
        raw = calibrate_rewards(reward, groups, method, 5.0)
        for transformed in (scale * reward + shift, torch.tanh(reward / 8), reward**3):
            assert torch.equal(calibrate_rewards(transformed, groups, method, 5.0), raw)


# ------------------------------------------------------------------- in the search
def _scaled(reward: CallableScorer, scale: float, shift: float) -> CallableScorer:
    return CallableScorer(lambda prompts, responses: scale * reward(prompts, responses) + shift)


@pytest.fixture()
def parts(tiny_model, tiny_tokenizer, keyword_cost):
    return {"model": tiny_model, "tokenizer": tiny_tokenizer, "cost": keyword_cost}


def _texts(decoder_type, parts, reward, config, multiplier):
    decoder = decoder_type(
        **parts, reward=reward, config=config, scoring="lagrangian", lagrange_multiplier=multiplier
    )
    return [decoder.generate(PROMPT, seed=s).text for s in SEEDS]


@pytest.mark.parametrize("decoder_type", [BestOfN, BlockBeamSearch])
@pytest.mark.parametrize("calibration", ["quantile", "exponential"])
@settings(max_examples=SEARCH_EXAMPLES)
@given(scale=st.floats(1e-3, 1e3), shift=st.floats(-100.0, 100.0))
def test_calibrated_lagrangian_choice_ignores_the_reward_scale(
    parts, length_reward, decoder_type, calibration, scale, shift
):
    config = GuardConfig(
        num_candidates=8,
        beam_width=2,
        block_size=8,
        max_new_tokens=16,
        reward_calibration=calibration,
    )
    plain = _texts(decoder_type, parts, length_reward, config, 0.3)
    rescaled = _texts(decoder_type, parts, _scaled(length_reward, scale, shift), config, 0.3)
    assert rescaled == plain


@pytest.mark.parametrize("decoder_type", [BestOfN, BlockBeamSearch])
def test_uncalibrated_lagrangian_choice_follows_the_reward_scale(
    parts, length_reward, decoder_type
):
    config = GuardConfig(num_candidates=8, beam_width=2, block_size=8, max_new_tokens=16)
    small = _texts(decoder_type, parts, _scaled(length_reward, 1e-3, 0.0), config, 0.3)
    large = _texts(decoder_type, parts, _scaled(length_reward, 1e3, 0.0), config, 0.3)
    assert small != large
    # Calibrated, the same two reward models choose alike.
    calibrated = config.with_overrides(reward_calibration="quantile")
    assert _texts(decoder_type, parts, _scaled(length_reward, 1e-3, 0.0), calibrated, 0.3) == (
        _texts(decoder_type, parts, _scaled(length_reward, 1e3, 0.0), calibrated, 0.3)
    )


def test_calibration_keeps_the_raw_reward_in_results(parts, length_reward):
    config = GuardConfig(
        num_candidates=8,
        beam_width=1,
        block_size=16,
        max_new_tokens=16,
        reward_calibration="quantile",
    )
    decoder = BestOfN(**parts, reward=length_reward, config=config, scoring="lagrangian")
    result = decoder.generate(PROMPT, seed=0)
    assert result.reward == pytest.approx(float(length_reward([PROMPT], [result.text])[0]))


def test_calibration_off_leaves_the_search_unchanged(parts, length_reward):
    config = GuardConfig(num_candidates=8, beam_width=2, block_size=8, max_new_tokens=16)
    explicit = config.with_overrides(reward_calibration="none", calibration_exponent=2.0)
    for decoder_type in (BestOfN, BlockBeamSearch):
        assert _texts(decoder_type, parts, length_reward, config, 0.3) == _texts(
            decoder_type, parts, length_reward, explicit, 0.3
        )


def test_calibration_is_a_command_line_option():
    from inference_safeguard.cli import build_parser
    from inference_safeguard.cli_options import guard_config

    parser = build_parser()
    flags = "--reward-calibration exponential --calibration-exponent 3"
    for command in ("generate", "eval"):
        extra = ["--model", "m", "--prompt", "p"] if command == "generate" else []
        args = parser.parse_args([command, *extra, *flags.split()])
        config = guard_config(args)
        assert (config.reward_calibration, config.calibration_exponent) == ("exponential", 3.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--reward-calibration", "rank"])


def test_calibration_exponent_must_be_positive():
    with pytest.raises(ValueError, match="calibration_exponent"):
        GuardConfig(calibration_exponent=0.0)
