"""`kv_cache.HeadroomLayer`: full-attention keys and values written in place, the same
as `DynamicLayer`'s concatenation through every change the search makes to a cache."""

from __future__ import annotations

import pytest
import torch
from transformers import cache_utils

from inference_safeguard.kv_cache import (
    HEADROOM,
    CacheCheckpoint,
    HeadroomLayer,
    is_full_attention_cache,
    merge_rows,
    select_rows,
    with_headroom,
)
from inference_safeguard.lm import CausalLM
from inference_safeguard.testing import build_tiny_llama, build_tiny_tokenizer

ROWS, HEADS, DIM = 3, 2, 4


def _states(tokens: int, seed: int, rows: int = ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, HEADS, tokens, DIM, generator=generator),
        torch.randn(rows, HEADS, tokens, DIM, generator=generator),
    )


def _pair() -> tuple[cache_utils.DynamicCache, cache_utils.DynamicCache]:
    """A plain cache and one with headroom, both holding the same 5-token prefill."""
    plain, roomy = cache_utils.DynamicCache(), cache_utils.DynamicCache()
    for cache in (plain, roomy):
        cache.update(*_states(5, seed=0), layer_idx=0)
    with_headroom(roomy)
    return plain, roomy


def _assert_same(plain: cache_utils.DynamicCache, roomy: cache_utils.DynamicCache) -> None:
    assert torch.equal(plain.layers[0].keys, roomy.layers[0].keys)
    assert torch.equal(plain.layers[0].values, roomy.layers[0].values)


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


def test_with_headroom_replaces_dynamic_layers_and_keeps_the_cache_full_attention() -> None:
    _, roomy = _pair()
    assert type(roomy.layers[0]) is HeadroomLayer
    assert is_full_attention_cache(roomy)


def test_tokens_are_written_in_place_until_the_room_runs_out() -> None:
    plain, roomy = _pair()
    buffers = set()
    for step in range(HEADROOM + 3):
        for cache in (plain, roomy):
            cache.update(*_states(1, seed=step + 1), layer_idx=0)
        buffers.add(roomy.layers[0].keys.data_ptr())
        _assert_same(plain, roomy)
    # One copy on the first token (the prefill's tensor has no room), one when the
    # HEADROOM positions it left are used up.
    assert len(buffers) == 2


def test_a_rewound_block_is_overwritten_as_a_cropped_cache_would_grow() -> None:
    plain, roomy = _pair()
    checkpoints = [CacheCheckpoint.take(cache, 4) for cache in (plain, roomy)]
    for step in range(4):
        for cache in (plain, roomy):
            cache.update(*_states(1, seed=10 + step), layer_idx=0)
    for cache, checkpoint in zip((plain, roomy), checkpoints, strict=True):
        checkpoint.restore(cache)
    _assert_same(plain, roomy)
    for step in range(4):
        for cache in (plain, roomy):
            cache.update(*_states(1, seed=20 + step), layer_idx=0)
        _assert_same(plain, roomy)


def test_pruned_fanned_out_and_merged_rows_grow_like_a_plain_cache() -> None:
    plain, roomy = _pair()
    for cache in (plain, roomy):
        cache.update(*_states(1, seed=1), layer_idx=0)
        select_rows(cache, torch.tensor([2, 0, 0, 1]))
        cache.update(*_states(1, seed=2, rows=4), layer_idx=0)
    _assert_same(plain, roomy)
    joiners = [cache_utils.DynamicCache() for _ in range(2)]
    for joiner in joiners:
        joiner.update(*_states(9, seed=3, rows=2), layer_idx=0)
    for cache, joiner in zip((plain, roomy), joiners, strict=True):
        merge_rows(cache, joiner)
        cache.update(*_states(1, seed=4, rows=6), layer_idx=0)
    _assert_same(plain, roomy)


def test_a_buffer_made_in_inference_mode_is_copied_rather_than_written_outside_it() -> None:
    plain, roomy = _pair()
    for cache in (plain, roomy):
        cache.update(*_states(1, seed=1), layer_idx=0)
    with torch.inference_mode(False):
        for cache in (plain, roomy):
            cache.update(*_states(1, seed=2), layer_idx=0)
    _assert_same(plain, roomy)


def test_the_model_decodes_the_same_logits_with_and_without_headroom() -> None:
    tokenizer = build_tiny_tokenizer()
    lm = CausalLM(build_tiny_llama(tokenizer).eval(), tokenizer)
    states = [lm.prefill([[5, 6, 7, 8], [9, 10]]) for _ in range(2)]
    plain = states[0].cache
    plain.layers[:] = [_as_dynamic(layer) for layer in plain.layers]
    tokens, real = torch.tensor([11, 12]), torch.tensor([True, True])
    for _ in range(5):
        for state in states:
            lm._feed(state, tokens, real)
        assert torch.equal(states[0].logits, states[1].logits)
    assert type(states[1].cache.layers[0]) is HeadroomLayer


def _as_dynamic(layer: cache_utils.DynamicLayer) -> cache_utils.DynamicLayer:
    plain = cache_utils.DynamicLayer.__new__(cache_utils.DynamicLayer)
    plain.__dict__.update({k: v for k, v in vars(layer).items() if k != "_buffers"})
    return plain
