"""The model's own sampling settings (generation_config) unless the user sets them, and
min_p and the repetition penalty inside the search."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import OTHER_PROMPT, PROMPT
from transformers import GenerationConfig

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard import lm as lm_module
from inference_safeguard import search as search_module
from inference_safeguard.scorers import CallableScorer, KeywordCost
from inference_safeguard.testing import build_tiny_llama

SHIPPED = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}


@pytest.fixture(scope="module")
def shipped_model(tiny_tokenizer):
    """The tiny Llama with sampling settings in its generation_config, as authors ship."""
    model = build_tiny_llama(tiny_tokenizer, seed=0)
    model.generation_config = GenerationConfig(
        do_sample=True, eos_token_id=tiny_tokenizer.eos_token_id, **SHIPPED
    )
    return model


@pytest.fixture(scope="module")
def shipped_model_dir(shipped_model, tiny_tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-shipped")
    shipped_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _sampling(config: GuardConfig) -> dict[str, float | int | None]:
    return {name: getattr(config, name) for name in SHIPPED}


def test_unset_sampling_fields_take_the_generation_config_of_a_loaded_model(shipped_model_dir):
    guard = InferenceGuard.from_pretrained(str(shipped_model_dir), cost=KeywordCost(["x"]))
    assert _sampling(guard.config) == SHIPPED


def test_a_model_without_sampling_settings_samples_plainly(tiny_model, tiny_tokenizer):
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=KeywordCost(["x"]))
    assert _sampling(guard.config) == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }


def test_settings_the_user_gives_win_over_the_models(shipped_model, tiny_tokenizer):
    guard = InferenceGuard(
        shipped_model,
        tiny_tokenizer,
        cost=KeywordCost(["x"]),
        config=GuardConfig(temperature=1.0, top_k=0),
    )
    assert _sampling(guard.config) == {**SHIPPED, "temperature": 1.0, "top_k": 0}
    per_call = guard.call_config({"top_p": 1.0, "temperature": None})
    assert _sampling(per_call) == {**SHIPPED, "top_k": 0, "top_p": 1.0}


def test_the_search_uses_the_resolved_settings(shipped_model, tiny_tokenizer, monkeypatch):
    seen: list[tuple[float, int, float, float]] = []
    original = search_module.PromptSamplers.sample

    def spy(self, logits, group_sizes, prompt_ids, temperature, top_k=0, top_p=1.0, min_p=0.0):
        seen.append((temperature, top_k, top_p, min_p))
        return original(self, logits, group_sizes, prompt_ids, temperature, top_k, top_p, min_p)

    monkeypatch.setattr(search_module.PromptSamplers, "sample", spy)
    guard = InferenceGuard(shipped_model, tiny_tokenizer, cost=KeywordCost(["x"]))
    guard.generate(PROMPT, max_new_tokens=4, num_candidates=4, beam_width=2, seed=0)
    assert set(seen) == {(0.6, 20, 0.9, 0.05)}


def test_greedy_decoding_with_a_repetition_penalty_matches_transformers(tiny_model, tiny_tokenizer):
    guard = InferenceGuard(
        tiny_model,
        tiny_tokenizer,
        cost=KeywordCost(["zzzz"]),
        config=GuardConfig(
            num_candidates=1,
            beam_width=1,
            block_size=4,
            max_new_tokens=32,
            temperature=0.0,
            repetition_penalty=1.8,
        ),
    )
    for prompt in (PROMPT, OTHER_PROMPT):
        result = guard.generate(prompt)
        ids = torch.tensor([guard.lm.encode(prompt).ids])
        expected = tiny_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            repetition_penalty=1.8,
            max_new_tokens=32,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        expected = [t for t in expected if t not in guard.lm.eos_token_ids]
        assert result.token_ids == expected
        # Unpenalised, greedy decoding repeats a token within these 32 (block 5 on).
        plain = guard.generate(prompt, repetition_penalty=1.0)
        assert len(set(plain.token_ids)) < len(plain.token_ids) == len(result.token_ids)
        assert plain.token_ids != result.token_ids


def test_a_prompt_decodes_the_same_alone_or_batched_with_min_p_and_repetition_penalty(
    tiny_model, tiny_tokenizer, small_config
):
    guard = InferenceGuard(
        tiny_model,
        tiny_tokenizer,
        cost=KeywordCost(["zzzz"]),
        config=small_config.with_overrides(min_p=0.05, repetition_penalty=1.3, seed=7),
    )
    batched = guard.generate_batch([PROMPT, OTHER_PROMPT])
    alone = [guard.generate(PROMPT), guard.generate(OTHER_PROMPT)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def test_repetition_histories_follow_the_rows_through_fan_out_and_resampling(
    tiny_model, tiny_tokenizer, monkeypatch
):
    histories: list[list[list[int]]] = []
    original = lm_module.RepetitionPenalty  # the Hugging Face backend builds it per block

    def record(penalty, rows, vocab_size, device):
        histories.append([list(h) for h in rows])
        return original(penalty, rows, vocab_size, device)

    monkeypatch.setattr(lm_module, "RepetitionPenalty", record)
    guard = InferenceGuard(
        tiny_model,
        tiny_tokenizer,
        cost=CallableScorer(lambda prompts, responses: [1.0] * len(responses)),
        config=GuardConfig(
            num_candidates=8,
            beam_width=2,
            block_size=4,
            max_new_tokens=12,
            repetition_penalty=1.3,
            on_unsafe="return",
            seed=0,
        ),
    )
    prompts = [guard.lm.encode(p).ids for p in (PROMPT, OTHER_PROMPT)]
    results = guard.generate_batch([PROMPT, OTHER_PROMPT])
    assert all(r.stats.resample_rounds == 6 for r in results)  # every block resampled twice
    for rows in histories:
        for history in rows:
            prompt = next(p for p in prompts if history[: len(p)] == p)
            response = history[len(prompt) :]
            # Every history is its row's prompt and a whole number of blocks of a beam.
            assert len(response) % 4 == 0 and len(response) <= 8
    # Per step: one build for the block's decode and one per resample round.
    assert len(histories) == 3 * 3


def test_the_integrations_report_and_override_the_models_sampling_settings(
    shipped_model, tiny_tokenizer
):
    from langchain_safeguard import ChatSafeguard
    from llamaindex_safeguard import SafeguardLLM

    guard = InferenceGuard(shipped_model, tiny_tokenizer, cost=KeywordCost(["x"]))
    chat = ChatSafeguard(guard=guard, min_p=0.2)
    params = chat.safeguard_params()
    assert params["temperature"] == 0.6 and params["min_p"] == 0.2
    call = chat.call_config(chat.config_overrides(kwargs={"repetition_penalty": 1.5}))
    assert call.repetition_penalty == 1.5 and call.top_k == 20
    llm = SafeguardLLM(guard, repetition_penalty=1.0)
    assert _sampling(llm.config) == {**SHIPPED, "repetition_penalty": 1.0}
