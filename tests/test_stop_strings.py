"""Stop strings that begin inside a token: the response ends at the token boundary before
the stop string, so `token_ids` decode to `text`, and streams emit exactly that text."""

from __future__ import annotations

import pytest
from conftest import PROMPT

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.baselines import ARGS, BestOfN, SamplingDecoder
from inference_safeguard.scorers import KeywordCost

CONFIG = GuardConfig(
    num_candidates=4, beam_width=2, block_size=4, max_new_tokens=24, temperature=0, seed=0
)


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer) -> InferenceGuard:
    return InferenceGuard(tiny_model, tiny_tokenizer, cost=KeywordCost(["bomb"]), config=CONFIG)


def stop_inside_a_token(decoder) -> tuple[str, list[int]]:
    """A stop string that first occurs starting inside a token of the decoder's greedy
    response (after a few tokens), and the tokens before that token."""
    free = decoder.generate(PROMPT)
    decode = decoder.lm.tokenizer.decode
    for i in range(2, len(free.token_ids)):
        start = len(decode(free.token_ids[:i]))
        piece = decode(free.token_ids[: i + 1])[start:]
        word = piece.strip()
        if len(word) < 3 or not word.isalpha():
            continue
        stop = word[1:]
        at = free.text.find(stop)
        if start < at < start + len(piece):
            return stop, free.token_ids[:i]
    pytest.skip("the greedy response has no token to cut inside")


def test_token_ids_decode_to_text_when_a_stop_string_starts_inside_a_token(guard):
    stop, before = stop_inside_a_token(guard)
    result = guard.generate(PROMPT, stop=[stop])
    assert guard.lm.tokenizer.decode(result.token_ids, skip_special_tokens=True) == result.text
    assert result.token_ids == before
    assert stop not in result.text
    assert result.finish_reason == "stop"
    assert result.stats.completion_tokens == len(result.token_ids)


@pytest.mark.parametrize("commit", ["agreement", "block"])
def test_streams_emit_the_text_cut_at_the_token_boundary(guard, commit):
    stop, _ = stop_inside_a_token(guard)
    result = guard.generate(PROMPT, stop=[stop], stream_commit=commit)
    stream = guard.stream(PROMPT, stop=[stop], stream_commit=commit)
    deltas = list(stream)
    assert "".join(deltas) == result.text == stream.result.text
    assert stream.result.token_ids == result.token_ids


@pytest.mark.parametrize("baseline", [SamplingDecoder, BestOfN])
def test_baselines_cut_at_the_token_boundary_too(tiny_model, tiny_tokenizer, baseline):
    decoder = baseline(tiny_model, tiny_tokenizer, cost=KeywordCost(["bomb"]), config=CONFIG)
    stop, before = stop_inside_a_token(decoder)
    result = decoder.generate(PROMPT, stop=[stop])
    assert tiny_tokenizer.decode(result.token_ids, skip_special_tokens=True) == result.text
    assert result.token_ids == before


def test_args_cuts_at_the_token_boundary_too(tiny_model, tiny_tokenizer):
    decoder = ARGS(
        tiny_model, tiny_tokenizer, cost=KeywordCost(["bomb"]), config=CONFIG, reward_weight=0
    )
    stop, before = stop_inside_a_token(decoder)
    result = decoder.generate(PROMPT, stop=[stop])
    assert tiny_tokenizer.decode(result.token_ids, skip_special_tokens=True) == result.text
    assert result.token_ids == before
