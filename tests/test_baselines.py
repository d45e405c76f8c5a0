"""Baselines share InferenceGuard's interface and do what their names promise."""

from __future__ import annotations

import pytest
from conftest import PROMPT

from inference_safeguard import InferenceGuard
from inference_safeguard.baselines import ARGS, BestOfN, BlockBeamSearch, SamplingDecoder

SEEDS = range(10)


def over_budget(decoder, **overrides) -> int:
    return sum(not decoder.generate(PROMPT, seed=s, **overrides).safe for s in SEEDS)


@pytest.fixture()
def parts(tiny_model, tiny_tokenizer, keyword_cost, small_config):
    return {
        "model": tiny_model,
        "tokenizer": tiny_tokenizer,
        "cost": keyword_cost,
        "config": small_config,
    }


def test_best_of_n_with_augmented_scoring_is_safer_than_sampling(parts):
    assert over_budget(BestOfN(**parts, scoring="augmented")) < over_budget(
        SamplingDecoder(**parts)
    )


def test_best_of_n_reward_picks_higher_reward_than_sampling(parts, length_reward):
    best = BestOfN(**parts, reward=length_reward, scoring="reward")
    plain = SamplingDecoder(**parts, reward=length_reward)
    best_rewards = [best.generate(PROMPT, seed=s).reward for s in SEEDS]
    plain_rewards = [plain.generate(PROMPT, seed=s).reward for s in SEEDS]
    # The best of 16 samples beats one sample on average, and beats its median sample.
    assert sum(best_rewards) > sum(plain_rewards)
    assert min(best_rewards) >= sorted(plain_rewards)[len(SEEDS) // 2]


def test_lagrangian_with_a_large_multiplier_lowers_cost(parts, length_reward):
    reward_only = BlockBeamSearch(**parts, reward=length_reward, scoring="reward")
    lagrangian = BlockBeamSearch(
        **parts, reward=length_reward, scoring="lagrangian", lagrange_multiplier=100.0
    )
    cost = lambda decoder: sum(decoder.generate(PROMPT, seed=s).cost for s in SEEDS)  # noqa: E731
    assert cost(lagrangian) < cost(reward_only)


def test_baselines_report_but_never_refuse(parts):
    for decoder in (
        SamplingDecoder(**parts),
        BestOfN(**parts, scoring="augmented"),
        BlockBeamSearch(**parts, scoring="augmented"),
    ):
        result = decoder.generate(PROMPT, budget=-1.0, seed=0)
        assert not result.safe and not result.refused and result.text


def test_block_beam_search_runs_block_by_block(parts):
    result = BlockBeamSearch(**parts, scoring="augmented").generate(PROMPT, seed=0)
    config = parts["config"]
    assert result.stats.blocks == config.max_new_tokens // config.block_size
    assert result.stats.resample_rounds == 0


def test_best_of_n_scores_n_whole_responses_in_one_step(parts):
    result = BestOfN(**parts, scoring="augmented").generate(PROMPT, seed=0)
    assert result.stats.blocks == 1
    assert result.stats.candidates_scored == parts["config"].num_candidates


def test_inference_guard_is_at_least_as_safe_as_every_baseline(parts):
    guard_over = over_budget(InferenceGuard(**parts))
    assert guard_over == 0
    for decoder in (
        SamplingDecoder(**parts),
        BestOfN(**parts, scoring="augmented"),
        BlockBeamSearch(**parts, scoring="augmented"),
    ):
        assert guard_over <= over_budget(decoder)


def test_args_with_a_cost_term_avoids_costly_tokens(parts):
    greedy = SamplingDecoder(**parts)
    guided = ARGS(**parts, reward_weight=0.0, cost_weight=50.0, num_tokens=8)
    assert over_budget(guided, temperature=0) <= over_budget(greedy, temperature=0)
    assert over_budget(guided) == 0


def test_args_follows_the_reward(parts, length_reward):
    guided = ARGS(**parts, reward=length_reward, reward_weight=10.0)
    plain = SamplingDecoder(**parts, reward=length_reward)
    assert guided.generate(PROMPT, seed=0).reward > plain.generate(PROMPT, seed=0).reward


def test_args_needs_a_reward_model_for_a_reward_term(parts):
    with pytest.raises(ValueError, match="needs a reward model"):
        ARGS(**parts)


def test_args_honours_stop_strings_and_length(parts):
    result = ARGS(**parts, reward_weight=0.0, cost_weight=1.0).generate(
        PROMPT, max_new_tokens=6, seed=0
    )
    assert len(result.token_ids) <= 6
    stop = result.text.split()[1]
    stopped = ARGS(**parts, reward_weight=0.0, cost_weight=1.0).generate(
        PROMPT, max_new_tokens=6, stop=[stop], seed=0
    )
    assert stop not in stopped.text and stopped.finish_reason == "stop"


async def test_baselines_share_the_async_and_streaming_interface(parts):
    decoder = BestOfN(**parts, scoring="augmented")
    result = await decoder.agenerate(PROMPT, seed=1)
    assert "".join(decoder.stream(PROMPT, seed=1)) == result.text
    assert [r.text for r in decoder.generate_batch([PROMPT], seed=1)] == [result.text]
