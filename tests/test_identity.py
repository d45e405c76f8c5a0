"""Decoder identities: equal for setups that answer alike, different whenever anything
that changes an answer differs (they key LangChain's LLM cache)."""

from __future__ import annotations

import pytest
import torch

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.baselines import BestOfN, SamplingDecoder
from inference_safeguard.identity import digest, model_fingerprint
from inference_safeguard.scorers import CallableScorer, ClassifierScorer, KeywordCost, RegexCost
from inference_safeguard.testing import (
    build_random_critic,
    build_tiny_classifier,
    build_tiny_llama,
    build_tiny_tokenizer,
)


def zero(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0] * len(responses)


def one(prompts: list[str], responses: list[str]) -> list[float]:
    return [1.0] * len(responses)


@pytest.fixture(scope="module")
def parts(tiny_model, tiny_tokenizer):
    return {
        "model": tiny_model,
        "tokenizer": tiny_tokenizer,
        "other_model": build_tiny_llama(tiny_tokenizer, seed=1),
        "other_tokenizer": build_tiny_tokenizer(seed=1),
        "classifier": build_tiny_classifier(tiny_tokenizer, seed=0),
        "other_classifier": build_tiny_classifier(tiny_tokenizer, seed=1),
        "critic": build_random_critic(tiny_model, seed=0),
        "other_critic": build_random_critic(tiny_model, seed=1),
    }


def fingerprint(parts, **changes) -> str:
    settings = {
        "model": parts["model"],
        "tokenizer": parts["tokenizer"],
        "cost": KeywordCost(["bomb"]),
        "config": GuardConfig(),
        **changes,
    }
    return digest(InferenceGuard(**settings).identity())


def test_equal_setups_built_separately_share_an_identity(parts):
    assert fingerprint(parts) == fingerprint(parts)
    reward = ClassifierScorer(parts["classifier"], parts["tokenizer"])
    again = ClassifierScorer(parts["classifier"], parts["tokenizer"])
    assert fingerprint(parts, reward=reward) == fingerprint(parts, reward=again)


def test_the_same_checkpoint_loaded_twice_has_one_fingerprint(tiny_model_dir):
    first = InferenceGuard.from_pretrained(str(tiny_model_dir), cost=KeywordCost(["bomb"]))
    second = InferenceGuard.from_pretrained(str(tiny_model_dir), cost=KeywordCost(["bomb"]))
    assert first.lm.model is not second.lm.model
    assert digest(first.identity()) == digest(second.identity())


@pytest.mark.parametrize(
    "change",
    [
        lambda p: {"config": GuardConfig(budget=1.0)},
        lambda p: {"config": GuardConfig(refusal_text="No.")},
        lambda p: {"cost": KeywordCost(["knife"])},
        lambda p: {"cost": KeywordCost(["bomb"], weight=2.0)},
        lambda p: {"cost": RegexCost(r"\bbomb\b")},
        lambda p: {"cost": CallableScorer(zero)},
        lambda p: {"reward": ClassifierScorer(p["classifier"], p["tokenizer"])},
        lambda p: {"model": p["other_model"]},
        lambda p: {"tokenizer": p["other_tokenizer"]},
        lambda p: {"critic": p["critic"]},
        lambda p: {"allow_special_tokens_in_content": True},
    ],
    ids=[
        "budget",
        "refusal",
        "keywords",
        "weight",
        "regex",
        "callable",
        "reward",
        "weights",
        "tokenizer",
        "critic",
        "special-tokens",
    ],
)
def test_anything_that_changes_the_answer_changes_the_identity(parts, change):
    assert fingerprint(parts, **change(parts)) != fingerprint(parts)


def test_scorer_and_critic_weights_enter_the_identity(parts):
    classifier = ClassifierScorer(parts["classifier"], parts["tokenizer"])
    other = ClassifierScorer(parts["other_classifier"], parts["tokenizer"])
    assert fingerprint(parts, reward=classifier) != fingerprint(parts, reward=other)
    critics = [fingerprint(parts, critic=parts[name]) for name in ("critic", "other_critic")]
    assert critics[0] != critics[1]


def test_functions_are_told_apart_and_never_equal_across_processes(parts):
    assert fingerprint(parts, cost=CallableScorer(zero)) != fingerprint(
        parts, cost=CallableScorer(one)
    )
    guard = InferenceGuard(parts["model"], parts["tokenizer"], cost=CallableScorer(zero))
    settings = guard.identity()["cost"]["settings"]
    assert settings["fn"]["name"].endswith("zero") and settings["fn"]["id"] == id(zero)


def test_a_call_config_and_the_decoder_kind_enter_the_identity(parts):
    guard = InferenceGuard(parts["model"], parts["tokenizer"], cost=KeywordCost(["bomb"]))
    assert digest(guard.identity(guard.config.with_overrides(seed=1))) != digest(guard.identity())
    cost = KeywordCost(["bomb"])
    sampler = SamplingDecoder(parts["model"], parts["tokenizer"], cost=cost)
    best = BestOfN(parts["model"], parts["tokenizer"], cost=cost, scoring="lagrangian")
    assert len({digest(d.identity()) for d in (guard, sampler, best)}) == 3


def test_a_model_fingerprint_is_computed_once_per_model(parts, monkeypatch):
    model = build_tiny_llama(parts["tokenizer"], seed=2)
    first = model_fingerprint(model)
    monkeypatch.setattr(type(model), "state_dict", lambda *a, **k: pytest.fail("recomputed"))
    assert model_fingerprint(model) is first


def test_a_tensor_larger_than_float32_can_count_is_digested_up_to_its_last_value():
    # 49152 x 576: SmolLM2-135M's embedding matrix, more values than float32 counts exactly.
    weights = torch.zeros(49152 * 576, dtype=torch.uint8)
    before = digest(weights)
    weights[-1] = 1
    assert digest(weights) != before
