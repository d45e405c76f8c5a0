"""InferenceGuard on a tiny random Llama: the budget holds, refusals, batching, streaming."""

from __future__ import annotations

import asyncio
import warnings

import pytest
import torch
from conftest import OTHER_PROMPT, PROMPT
from pydantic import ValidationError

from inference_safeguard import (
    ChatTemplateError,
    GuardConfig,
    InferenceGuard,
    InvalidPromptError,
    MissingCostModelError,
    PromptTooLongError,
    RefusalOverBudgetWarning,
    UnsafeGenerationError,
)
from inference_safeguard.baselines import SamplingDecoder
from inference_safeguard.scorers import CallableScorer, KeywordCost
from inference_safeguard.testing import build_tiny_llama, build_tiny_tokenizer

SEEDS = range(20)


@pytest.fixture()
def only_refusals_are_safe(small_config) -> CallableScorer:
    """A cost that rejects everything the model says and accepts the refusal text."""
    refusal = small_config.refusal_text
    return CallableScorer(lambda prompt, response: float(response != refusal), batched=False)


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer, keyword_cost, small_config) -> InferenceGuard:
    return InferenceGuard(tiny_model, tiny_tokenizer, cost=keyword_cost, config=small_config)


def test_plain_sampling_breaks_the_keyword_budget_for_most_seeds(
    tiny_model, tiny_tokenizer, keyword_cost, small_config
):
    sampler = SamplingDecoder(tiny_model, tiny_tokenizer, cost=keyword_cost, config=small_config)
    over = [not sampler.generate(PROMPT, seed=seed).safe for seed in SEEDS]
    assert sum(over) > len(SEEDS) / 2


def test_inference_guard_returns_no_over_budget_response_in_twenty_seeds(guard, keyword_cost):
    results = [guard.generate(PROMPT, seed=seed) for seed in SEEDS]
    returned_costs = keyword_cost([PROMPT] * len(results), [r.text for r in results])
    assert (returned_costs <= guard.config.budget).all()
    assert all(r.safe for r in results)
    # The search finds safe text; it does not get there by refusing.
    assert sum(r.refused for r in results) == 0
    assert all(r.finish_reason in ("stop", "length") and r.token_ids for r in results)


def test_unreachable_budget_ends_in_refusal(
    tiny_model, tiny_tokenizer, only_refusals_are_safe, small_config
):
    guard = InferenceGuard(
        tiny_model, tiny_tokenizer, cost=only_refusals_are_safe, config=small_config
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefusalOverBudgetWarning)
        result = guard.generate(PROMPT, budget=0.5, seed=0)
    assert result.refused
    assert not result.safe
    assert result.text == guard.config.refusal_text
    assert result.token_ids == tiny_tokenizer(result.text, add_special_tokens=False)["input_ids"]
    assert result.finish_reason == "safety"
    assert result.cost == 1.0
    assert result.stats.resample_rounds == guard.config.resample_rounds * result.stats.blocks


def test_impossible_budget_refuses_and_warns_that_the_refusal_is_over_budget_too(guard):
    with pytest.warns(RefusalOverBudgetWarning, match="set refusal_text"):
        result = guard.generate(PROMPT, budget=-1.0, seed=0)
    assert result.refused and not result.safe
    assert result.text == guard.config.refusal_text
    assert result.finish_reason == "safety"
    assert result.cost >= 0 > result.budget


def test_impossible_budget_raises_when_asked(guard):
    with pytest.raises(UnsafeGenerationError, match="over the safety budget") as caught:
        guard.generate_batch([PROMPT, OTHER_PROMPT], budget=-1.0, on_unsafe="raise", seed=0)
    assert not caught.value.result.safe
    assert len(caught.value.results) == 2
    assert all(r.text and not r.refused for r in caught.value.results)


def test_on_unsafe_return_flags_the_over_budget_response(guard, keyword_cost):
    result = guard.generate(PROMPT, budget=-1.0, on_unsafe="return", seed=0)
    assert not result.refused and not result.safe
    assert result.text != guard.config.refusal_text
    assert result.cost == pytest.approx(float(keyword_cost([PROMPT], [result.text])[0]))


def test_resampling_penalises_the_block_only_when_every_candidate_is_unsafe(guard):
    assert guard.generate(PROMPT, seed=3).stats.resample_rounds == 0
    with pytest.warns(RefusalOverBudgetWarning):
        none = guard.generate(PROMPT, budget=-1.0, resample_rounds=0, seed=3)
    assert none.stats.resample_rounds == 0
    assert none.stats.candidates_scored == none.stats.blocks * guard.config.num_candidates


def test_batched_prompts_of_different_lengths_match_one_by_one(guard):
    prompts = [PROMPT, OTHER_PROMPT, [{"role": "user", "content": "Hi"}], "Short."]
    batched = guard.generate_batch(prompts, seed=11)
    for prompt, result in zip(prompts, batched, strict=True):
        alone = guard.generate(prompt, seed=11)
        assert result.token_ids == alone.token_ids
        assert result.text == alone.text
        assert result.cost == alone.cost


def test_a_cost_model_that_forgets_cannot_wash_out_an_unsafe_prefix(
    tiny_model, tiny_tokenizer, small_config
):
    # Flags every text under 100 characters: each first block (8 tokens) is flagged,
    # while most full responses (64 tokens) are long enough to be "forgotten".
    forgetful = CallableScorer(lambda prompt, response: float(len(response) < 100), batched=False)
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=forgetful, config=small_config)
    with pytest.warns(RefusalOverBudgetWarning):
        results = guard.generate_batch([PROMPT, OTHER_PROMPT], budget=0.5, max_new_tokens=64)
    assert all(r.refused and not r.safe and r.cost == 1.0 for r in results)


def test_same_seed_reproduces_and_other_seeds_differ(guard):
    first, again = guard.generate(PROMPT, seed=5), guard.generate(PROMPT, seed=5)
    assert first.token_ids == again.token_ids
    assert len({tuple(guard.generate(PROMPT, seed=s).token_ids) for s in range(4)}) > 1


def test_reward_model_steers_the_search(tiny_model, tiny_tokenizer, keyword_cost, small_config):
    def vowels(prompts: list[str], responses: list[str]) -> list[float]:
        return [sum(c in "aeiou" for c in r.lower()) / max(len(r), 1) for r in responses]

    reward = CallableScorer(vowels)
    guard = InferenceGuard(
        tiny_model, tiny_tokenizer, cost=keyword_cost, reward=reward, config=small_config
    )
    sampler = SamplingDecoder(
        tiny_model, tiny_tokenizer, cost=keyword_cost, reward=reward, config=small_config
    )
    guided = [guard.generate(PROMPT, seed=s).reward for s in range(5)]
    plain = [sampler.generate(PROMPT, seed=s).reward for s in range(5)]
    assert min(guided) > max(plain)


def test_stop_string_ends_the_response_before_it(guard):
    free = guard.generate(PROMPT, seed=2, temperature=0)
    stop = free.text.split()[3]
    result = guard.generate(PROMPT, seed=2, temperature=0, stop=[stop])
    assert stop not in result.text
    assert free.text.startswith(result.text)
    assert result.finish_reason == "stop"
    assert len(result.token_ids) < len(free.token_ids)


def test_per_call_overrides_do_not_change_the_guard_config(guard, small_config):
    before = guard.config
    guard.generate(PROMPT, max_new_tokens=8, seed=0)
    assert guard.config == before
    # The tiny model ships no sampling settings, so unset ones take the package's own.
    assert guard.config == small_config.with_sampling_defaults({})
    assert len(guard.generate(PROMPT, max_new_tokens=8, seed=0).token_ids) <= 8


# ------------------------------------------------------------------ streaming
@pytest.mark.parametrize("commit", ["agreement", "block"])
def test_stream_deltas_join_to_the_result_text(guard, commit):
    deltas = list(guard.stream(PROMPT, seed=4, stream_commit=commit))
    assert "".join(deltas) == guard.last_result.text
    assert guard.last_result.safe and not guard.last_result.refused


def test_block_commit_streams_before_the_search_ends(guard):
    deltas = list(guard.stream(PROMPT, seed=4, stream_commit="block"))
    assert len(deltas) >= guard.config.max_new_tokens // guard.config.block_size - 1


def test_agreement_stream_matches_generate(guard):
    streamed = "".join(guard.stream(PROMPT, seed=8))
    assert streamed == guard.generate(PROMPT, seed=8).text


def test_stream_ending_in_refusal_finishes_with_safety(
    tiny_model, tiny_tokenizer, only_refusals_are_safe, small_config
):
    guard = InferenceGuard(
        tiny_model, tiny_tokenizer, cost=only_refusals_are_safe, config=small_config
    )
    deltas = list(guard.stream(PROMPT, seed=1, budget=0.5))
    assert "".join(deltas) == guard.config.refusal_text
    assert guard.last_result.refused
    assert guard.last_result.finish_reason == "safety"


# ---------------------------------------------------------------------- async
async def _ticks_while(awaitable) -> tuple[object, int]:
    ticks = 0
    task = asyncio.ensure_future(awaitable)
    while not task.done():
        ticks += 1
        await asyncio.sleep(0.001)
    return task.result(), ticks


async def test_agenerate_lets_other_coroutines_run(guard):
    result, ticks = await _ticks_while(guard.agenerate(PROMPT, seed=0, max_new_tokens=64))
    assert result.text == guard.generate(PROMPT, seed=0, max_new_tokens=64).text
    assert ticks >= 3


async def test_astream_delivers_deltas_while_the_loop_runs(guard):
    async def collect() -> list[str]:
        return [delta async for delta in guard.astream(PROMPT, seed=4, stream_commit="block")]

    deltas, ticks = await _ticks_while(collect())
    assert "".join(deltas) == guard.last_result.text
    assert len(deltas) > 1 and ticks >= 3


async def test_astream_surfaces_errors(guard):
    with pytest.raises(UnsafeGenerationError):
        async for _ in guard.astream(PROMPT, budget=-1.0, on_unsafe="raise", seed=0):
            pass


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ([], "empty"),
        (42, "string or a list"),
        (b"bytes", "string or a list"),
        ([{"role": "user"}], "content must be text"),
        ([{"role": "wizard", "content": "hi"}], "role"),
        (["hello"], "mapping"),
        ([{"role": "user", "content": "  "}], "empty"),
    ],
)
def test_bad_prompts_raise_invalid_prompt_error(guard, prompt, message):
    with pytest.raises(InvalidPromptError, match=message):
        guard.generate(prompt)


def test_generate_batch_rejects_a_bare_string(guard):
    with pytest.raises(InvalidPromptError, match="list of prompts"):
        guard.generate_batch(PROMPT)


def test_prompt_longer_than_the_context_window_is_rejected(guard):
    with pytest.raises(PromptTooLongError, match="context window is 512 tokens"):
        guard.generate("dog " * 600)
    with pytest.raises(PromptTooLongError, match="lower max_new_tokens"):
        guard.generate("dog " * 490, max_new_tokens=64)


def test_messages_without_a_chat_template_raise(tiny_model, keyword_cost):
    tokenizer = build_tiny_tokenizer(chat_template=False)
    guard = InferenceGuard(tiny_model, tokenizer, cost=keyword_cost)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        guard.generate([{"role": "user", "content": "hello"}])


def test_missing_cost_model_is_rejected(tiny_model, tiny_tokenizer):
    with pytest.raises(MissingCostModelError, match="cost=KeywordCost"):
        InferenceGuard(tiny_model, tiny_tokenizer)


def test_cost_of_the_wrong_type_is_rejected(tiny_model, tiny_tokenizer):
    with pytest.raises(TypeError, match="CallableScorer"):
        InferenceGuard(tiny_model, tiny_tokenizer, cost=["bad", "words"])


def test_invalid_overrides_are_rejected(guard):
    with pytest.raises(ValidationError, match="multiple of beam_width"):
        guard.generate(PROMPT, num_candidates=10)
    with pytest.raises(ValidationError, match="Extra inputs"):
        guard.generate(PROMPT, num_beams=3)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        guard.generate(PROMPT, unsafe_penalty=-1)


def test_from_pretrained_loads_a_local_checkpoint_without_remote_code(
    tiny_model_dir, keyword_cost, monkeypatch
):
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    guard = InferenceGuard.from_pretrained(
        str(tiny_model_dir), cost=keyword_cost, config=GuardConfig(max_new_tokens=8), device="cpu"
    )
    assert seen["trust_remote_code"] is False
    assert guard.lm.model.dtype == torch.float32
    result = guard.generate(PROMPT, seed=0)
    assert result.safe and 0 < len(result.token_ids) <= 8


def test_a_tokenizer_without_pad_token_works_and_is_not_modified():
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    guard = InferenceGuard(build_tiny_llama(tokenizer), tokenizer, cost=KeywordCost(["x"]))
    assert guard.lm.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token is None
    batched = guard.generate_batch([PROMPT, "Hi"], max_new_tokens=8, seed=0)
    assert batched[1].token_ids == guard.generate("Hi", max_new_tokens=8, seed=0).token_ids


def test_model_given_as_a_name_points_to_from_pretrained(tiny_tokenizer, keyword_cost):
    with pytest.raises(TypeError, match="from_pretrained"):
        InferenceGuard("some/model-id", tiny_tokenizer, cost=keyword_cost)


# ------------------------------------------------------------ batching of work
def counting(scorer):
    """Wrap a scorer so that each call's batch size is recorded."""
    calls: list[int] = []

    def score(prompts: list[str], responses: list[str]):
        calls.append(len(responses))
        return scorer(prompts, responses)

    return CallableScorer(score), calls


def test_each_step_scores_all_candidates_of_all_prompts_in_one_call(
    tiny_model, tiny_tokenizer, keyword_cost, small_config
):
    cost, calls = counting(keyword_cost)
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=cost, config=small_config)
    results = guard.generate_batch([PROMPT, OTHER_PROMPT], seed=0)
    assert all(r.stats.resample_rounds == 0 for r in results)
    # One call per step for both prompts' candidates; the final check reuses the cost
    # the search gave the chosen text.
    steps = max(r.stats.blocks for r in results)
    assert len(calls) == steps
    assert calls[0] == 2 * small_config.num_candidates
    assert sum(calls) == sum(r.stats.candidates_scored for r in results)
    for result in results:
        assert result.cost >= float(keyword_cost([PROMPT], [result.text])[0])


def test_generate_batch_prefills_all_prompts_once(guard, monkeypatch):
    prefills: list[int] = []
    original = guard.lm.prefill

    def spy(prompts):
        prefills.append(len(prompts))
        return original(prompts)

    monkeypatch.setattr(guard.lm, "prefill", spy)
    guard.generate_batch([PROMPT, OTHER_PROMPT, "Hi"], seed=0)
    assert prefills == [3]


def test_prompts_are_not_modified(guard):
    messages = [{"role": "user", "content": PROMPT}]
    snapshot = [dict(m) for m in messages]
    guard.generate(messages, seed=0)
    assert messages == snapshot
