"""Every cache layout the guard meets in local models: full attention, sliding windows
shorter than the prompt, and linear-attention / recurrent hybrids.

Each family is a tiny random-weight model built from its config (no hub). The search
runs with resampling forced (the cost rejects every candidate, so every block is
rewound and resampled), streaming and critic hidden states; and a rewound and replayed
block must give the logits of a fresh forward over the same tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, cache_utils

from inference_safeguard import GuardConfig, InferenceGuard, kv_cache
from inference_safeguard.lm import BlockCheckpoint, CausalLM
from inference_safeguard.scorers import CallableScorer, GuardModelCost
from inference_safeguard.testing import build_random_critic

WINDOW = 8
"""Sliding window of the sliding-attention families: shorter than every prompt here."""

ATTENTION = {
    "llama": {},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "gemma2": {"sliding_window": WINDOW, "head_dim": 16},
    "gemma3_text": {
        "sliding_window": WINDOW,
        "head_dim": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "mistral": {"sliding_window": WINDOW},
    "phi3": {"sliding_window": WINDOW},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "gpt_neox": {},
}
"""Attention-only families: model type -> config overrides."""

_MAMBA2_HEADS = {"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 8}
LINEAR = {
    "qwen3_next": {
        "layer_types": ["linear_attention", "full_attention"],
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "head_dim": 8,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    },
    "qwen3_5_text": {
        "layer_types": ["linear_attention", "full_attention"],
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "head_dim": 8,
    },
    "falcon_h1": {
        "mamba_d_ssm": 32,
        "mamba_n_heads": 4,
        "mamba_d_head": 8,
        "mamba_n_groups": 1,
        "mamba_d_state": 8,
        "head_dim": 8,
    },
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "num_experts": 2,
        "mamba_d_state": 8,
        "mamba_dt_rank": 4,
    },
    "bamba": {"attn_layer_indices": [1], **_MAMBA2_HEADS},
    "granitemoehybrid": {
        "layer_types": ["mamba", "attention"],
        "num_local_experts": 2,
        "num_experts_per_tok": 1,
        **_MAMBA2_HEADS,
    },
    "lfm2": {"layer_types": ["conv", "full_attention"], "block_ff_dim": 64},
    "mamba2": {"num_heads": 4, "head_dim": 16, "state_size": 8, "n_groups": 1},
    "nemotron_h": {
        "hybrid_override_pattern": "M*",
        "mamba_num_heads": 4,
        "mamba_head_dim": 16,
        "n_groups": 1,
        "ssm_state_size": 8,
        "head_dim": 8,
    },
    "mamba": {"state_size": 8},
    "falcon_mamba": {"state_size": 8},
}
"""Linear-attention (recurrent or convolution state) and hybrid families."""

LINEAR_ATTENTION_CACHE = hasattr(cache_utils, "LinearAttentionLayer")
"""Whether this transformers release keeps linear-attention states in its `Cache`."""


def build_model(model_type: str, tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type} models")
    overrides = {**ATTENTION, **LINEAR}[model_type]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().eval()


def causal_lm(model_type: str, tokenizer: Any) -> CausalLM:
    model = build_model(model_type, tokenizer)
    # Releases before linear-attention cache layers, and Mamba models that still take
    # their state as `cache_params` (5.19 does), keep recurrent states outside any Cache:
    # the guard must refuse those with a typed error when it is built.
    state_outside_cache = "cache_params" in inspect.signature(model.forward).parameters
    if model_type in LINEAR and (not LINEAR_ATTENTION_CACHE or state_outside_cache):
        with pytest.raises(NotImplementedError, match=model_type):
            CausalLM(model, tokenizer)
        pytest.skip(
            f"{model_type} keeps its state outside transformers' Cache in "
            f"{transformers.__version__}; refused with NotImplementedError"
        )
    return CausalLM(model, tokenizer)


FAMILIES = [*ATTENTION, *LINEAR]

PROMPTS = (
    "Tell me a long story about the dog, the cat and the bird who live in the old house "
    "by the river, and what they do every day.",
    "What is a good name for a small bird that sings in the garden early in the morning "
    "when the sun comes up over the trees?",
)


# --------------------------------------------------------------- rewind exactness
def no_eos(lm: CausalLM, seed: int):
    """A seeded sampler that never picks EOS, so every row decodes the whole block."""
    generator = torch.Generator().manual_seed(seed)
    eos = sorted(lm.eos_token_ids)

    def choose(logits: torch.Tensor, step: int) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        probs[:, eos] = 0
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return choose


def assert_rewind_is_exact(
    lm: CausalLM, after_prefill: Callable[[Any], None] | None = None
) -> None:
    """Decode a block, rewind and resample it twice, rewind and replay it: the replay
    must give the first pass's logits and those of a fresh forward over the tokens."""
    length = 3 * WINDOW
    prompts = [lm.encode(p).ids[:length] for p in PROMPTS]
    assert all(len(p) == length for p in prompts)  # longer than the window, no padding
    state = lm.prefill(prompts)
    if after_prefill is not None:
        after_prefill(state.cache)
    lm.fan_out(state, 2)
    lm.select_rows(state, torch.tensor([3, 0, 0, 2]))  # prune and fan out at once
    rows = [prompts[1], prompts[0], prompts[0], prompts[1]]
    before = lm.decode_block(state, 5, no_eos(lm, seed=1)).tokens
    block = WINDOW + 2  # a block longer than the window pushes all of it out
    checkpoint = BlockCheckpoint.of(state, block)
    first = lm.decode_block(state, block, no_eos(lm, seed=2)).tokens
    first_logits = state.logits.clone()
    for seed in (3, 4):  # resampled twice: a checkpoint is restored more than once
        checkpoint.rewind(state)
        assert not torch.equal(lm.decode_block(state, block, no_eos(lm, seed)).tokens, first)
    checkpoint.rewind(state)

    seen: list[torch.Tensor] = []

    def replay(logits: torch.Tensor, step: int) -> torch.Tensor:
        seen.append(logits.clone())
        return first[:, step]

    assert torch.equal(lm.decode_block(state, block, replay).tokens, first)
    seen.append(state.logits.clone())
    replayed = torch.stack(seen[1:], dim=1)  # after each token of the block
    torch.testing.assert_close(state.logits, first_logits, rtol=1e-5, atol=1e-5)

    sequences = torch.cat([torch.tensor(rows), before, first], dim=1)
    with torch.inference_mode():
        fresh = lm.model(input_ids=sequences, use_cache=False).logits.float()
    start = length + before.shape[1]
    torch.testing.assert_close(replayed, fresh[:, start:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_rewound_and_replayed_block_gives_the_logits_of_a_fresh_forward(
    model_type, tiny_tokenizer
):
    assert_rewind_is_exact(causal_lm(model_type, tiny_tokenizer))


class ModelOwnWindowLayer(cache_utils.DynamicSlidingWindowLayer):
    """A model's own layer class: its layout is not assumed from its base class."""


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3_5_text"])
def test_only_full_attention_caches_take_the_rows_of_another_batch(model_type, tiny_tokenizer):
    lm = causal_lm(model_type, tiny_tokenizer)
    running = lm.prefill([lm.encode(PROMPTS[0]).ids])
    joining = lm.prefill([lm.encode(PROMPTS[1]).ids])
    if model_type != "llama":
        assert not lm.can_merge(running)
        with pytest.raises(NotImplementedError, match="full-attention"):
            lm.merge(running, joining)
        return
    assert lm.can_merge(running)
    lm.merge(running, joining)
    assert running.rows == 2 and running.cache.get_seq_length() == running.attention_mask.shape[1]


def test_a_layer_class_it_does_not_know_is_rewound_from_a_copy(tiny_tokenizer):
    def own_layers(cache: Any) -> None:
        for layer in cache.layers:
            layer.__class__ = ModelOwnWindowLayer

    assert_rewind_is_exact(causal_lm("mistral", tiny_tokenizer), own_layers)


def test_a_cache_it_cannot_rewind_is_refused_when_the_guard_is_built(tiny_tokenizer, monkeypatch):
    model = build_model("qwen3", tiny_tokenizer)
    monkeypatch.setattr(kv_cache, "output_cache", lambda out: object())
    with pytest.raises(NotImplementedError, match=r"model type 'qwen3'.*upgrade transformers"):
        InferenceGuard(model, tiny_tokenizer, cost=CallableScorer(reject_all))


# ------------------------------------------------------------------------ search
def reject_all(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """A cost over every budget: every block of every prompt is resampled."""
    return torch.ones(len(responses))


SEARCH = GuardConfig(
    budget=0.0,
    num_candidates=4,
    beam_width=2,
    block_size=6,
    max_new_tokens=18,
    resample_rounds=2,
    on_unsafe="return",
    seed=7,
)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_search_resamples_streams_and_reads_hidden_states(model_type, tiny_tokenizer):
    lm = causal_lm(model_type, tiny_tokenizer)
    critic = build_random_critic(lm.model, block_size=SEARCH.block_size)
    hidden: list[torch.Tensor] = []
    predict = critic.predict
    critic.predict = lambda h, z: hidden.append(h) or predict(h, z)  # type: ignore[method-assign]
    guard = InferenceGuard(
        lm.model, tiny_tokenizer, cost=CallableScorer(reject_all), critic=critic, config=SEARCH
    )
    prompt = [{"role": "user", "content": PROMPTS[0]}]
    assert len(lm.encode(prompt).ids) > 3 * WINDOW

    result = guard.generate(prompt, scorer="models")
    assert not result.safe and not result.refused
    assert result.stats.blocks >= 2
    assert result.stats.resample_rounds == result.stats.blocks * SEARCH.resample_rounds
    assert "".join(guard.stream(prompt, scorer="models")) == result.text
    assert guard.last_result.token_ids == result.token_ids

    batch = guard.generate_batch([prompt, PROMPTS[1]], scorer="models")
    assert batch[0].token_ids == result.token_ids  # the same alone or batched

    critic_result = guard.generate(prompt, scorer="critic", cost_probe=False)
    assert critic_result.stats.resample_rounds == (
        critic_result.stats.blocks * SEARCH.resample_rounds
    )
    states = torch.cat(hidden)
    assert states.shape[-1] == lm.model.config.get_text_config().hidden_size
    assert bool(states.isfinite().all()) and bool((states.abs().sum(-1) > 0).all())


# ----------------------------------------------------------------------- scorers
@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text", "qwen3_next", "mamba"])
def test_a_guard_model_cost_gives_the_same_costs_with_a_shared_prompt_cache(
    model_type, tiny_tokenizer
):
    model = build_model(model_type, tiny_tokenizer)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]]
    responses = ["", "The dog is happy", "and the garden is green and " * 3, "A bird."]
    shared = GuardModelCost(model, tiny_tokenizer, batch_size=4)
    whole = GuardModelCost(model, tiny_tokenizer, batch_size=4, share_prompt_cache=False)
    torch.testing.assert_close(
        shared(prompts, responses), whole(prompts, responses), rtol=0, atol=1e-5
    )


# ------------------------------------------------------------- synthetic layers
def layer_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor the cache's layers hold, layer by layer."""
    tensors = []
    for layer in cache.layers:
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
        for states in ("conv_states", "recurrent_states"):
            tensors += list(getattr(layer, states, {}).values())
    return [t for t in tensors if t is not None]


def holds_keys(layer: Any) -> bool:
    return hasattr(layer, "keys") and type(layer).__name__ != "DummyLayer"


def feed(cache: Any, tokens: int, generator: torch.Generator) -> None:
    """Feed `tokens` random tokens to every layer, one at a time, as a decode does."""
    rows = cache.layers[0].keys.shape[0]
    for _ in range(tokens):
        for layer in cache.layers:
            if hasattr(layer, "update_conv_state"):
                layer.update_conv_state(torch.randn(rows, 6, 1, generator=generator))
                layer.update_recurrent_state(torch.randn(rows, 2, 3, 3, generator=generator))
            if holds_keys(layer):
                kv = torch.randn(2, rows, 2, 1, 4, generator=generator)
                layer.update(kv[0], kv[1])


@pytest.mark.skipif(not LINEAR_ATTENTION_CACHE, reason="needs LinearAttentionLayer")
def test_every_layer_class_is_restored_exactly_and_fans_out_whole():
    generator = torch.Generator().manual_seed(0)
    window = 5
    # Every layer class this transformers release has (the hybrid and placeholder
    # classes arrived after the plain linear-attention layer).
    classes = [
        ("DynamicLayer", {}),
        ("DynamicSlidingWindowLayer", {"sliding_window": window}),
        ("LinearAttentionLayer", {}),
        ("LinearAttentionAndFullAttentionLayer", {}),
        ("LinearAttentionAndSlidingWindowAttentionLayer", {"sliding_window": window}),
        ("DummyLayer", {}),
    ]
    cache = cache_utils.Cache(
        layers=[
            getattr(cache_utils, name)(**kwargs)
            for name, kwargs in classes
            if hasattr(cache_utils, name)
        ]
    )
    rows, prompt = 3, 2 * window
    for layer in cache.layers:  # prefill: the conv states get their kernel width
        if hasattr(layer, "update_conv_state"):
            layer.update_conv_state(torch.randn(rows, 6, 4, generator=generator))
            layer.update_recurrent_state(torch.randn(rows, 2, 3, 3, generator=generator))
        if holds_keys(layer):
            kv = torch.randn(2, rows, 2, prompt, 4, generator=generator)
            layer.update(kv[0], kv[1])
    for block in (2, window - 1, window + 3):
        before = [t.clone() for t in layer_tensors(cache)]
        checkpoint = kv_cache.CacheCheckpoint.take(cache, block)
        for _ in range(2):
            feed(cache, block, generator)
            changed = zip(layer_tensors(cache), before, strict=True)
            assert all(not torch.equal(a, b) for a, b in changed)
            checkpoint.restore(cache)
            for restored, expected in zip(layer_tensors(cache), before, strict=True):
                assert torch.equal(restored, expected)
        feed(cache, 1, generator)  # move on, so each block starts from another state

    before = [t.clone() for t in layer_tensors(cache)]
    kv_cache.repeat_rows(cache, 2, rows)
    for grown, expected in zip(layer_tensors(cache), before, strict=True):
        assert torch.equal(grown, expected.repeat_interleave(2, dim=0))
    kv_cache.select_rows(cache, torch.tensor([5, 0, 0]))
    for kept, expected in zip(layer_tensors(cache), before, strict=True):
        assert torch.equal(kept, expected[[2, 0, 0]])
