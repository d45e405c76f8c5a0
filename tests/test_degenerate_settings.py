"""Degenerate settings: rejected by `GuardConfig` with a fix, the same way through both
integrations, and sound at the edges of their ranges."""

from __future__ import annotations

import math
from typing import Any

import pytest
from conftest import PROMPT
from pydantic import ValidationError

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.scorers import KeywordCost

CONFIG = GuardConfig(num_candidates=4, beam_width=2, block_size=4, max_new_tokens=8)

DEGENERATE = [
    ({"budget": True}, "got the bool True"),
    ({"num_candidates": True}, "got the bool True"),
    ({"unsafe_logit_penalty": math.inf}, "finite"),
    ({"temperature": 1e-300}, "use temperature=0 for greedy decoding"),
]


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer) -> InferenceGuard:
    return InferenceGuard(tiny_model, tiny_tokenizer, cost=KeywordCost(["bomb"]), config=CONFIG)


@pytest.mark.parametrize(("setting", "hint"), DEGENERATE)
def test_per_call_degenerate_settings_fail_before_decoding(guard, setting, hint) -> None:
    with pytest.raises(ValidationError, match=hint):
        guard.generate(PROMPT, **setting)


@pytest.mark.parametrize(("setting", "hint"), DEGENERATE)
def test_langchain_models_reject_degenerate_settings_like_guard_config(
    guard, setting: dict[str, Any], hint: str
) -> None:
    from langchain_safeguard import ChatSafeguard, SafeguardLLM

    for model in (ChatSafeguard, SafeguardLLM):
        with pytest.raises(ValidationError, match=hint):
            model(guard=guard, **setting)
    with pytest.raises(ValidationError, match=hint):
        SafeguardLLM(guard=guard).invoke(PROMPT, **setting)


def test_langchain_max_tokens_is_not_a_bool(guard) -> None:
    from langchain_safeguard import ChatSafeguard

    with pytest.raises(ValidationError, match="got the bool True"):
        ChatSafeguard(guard=guard, max_tokens=True)


@pytest.mark.parametrize(("setting", "hint"), DEGENERATE)
def test_llamaindex_llm_rejects_degenerate_settings_like_guard_config(
    guard, setting: dict[str, Any], hint: str
) -> None:
    from llamaindex_safeguard import SafeguardLLM

    with pytest.raises(ValidationError, match=hint):
        SafeguardLLM(guard, **setting)
    with pytest.raises(ValidationError, match=hint):
        SafeguardLLM(guard).complete(PROMPT, **setting)


def test_a_vanishing_top_p_decodes_greedily(guard) -> None:
    greedy = guard.generate(PROMPT, temperature=0, seed=0)
    nucleus = guard.generate(PROMPT, top_p=1e-300, seed=0)
    assert nucleus.token_ids == greedy.token_ids
    assert nucleus.text == greedy.text and nucleus.text.strip()


def test_the_largest_logit_penalty_resamples_without_nan(guard) -> None:
    result = guard.generate(
        PROMPT, unsafe_logit_penalty=1e6, budget=-1.0, on_unsafe="return", seed=0
    )
    assert result.stats.resample_rounds == CONFIG.resample_rounds * result.stats.blocks
    assert result.text.strip()
