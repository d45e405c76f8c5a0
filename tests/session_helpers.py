"""What the safety-session tests share: a cost that charges 1 per answer, a guard on it,
and a counter of the model's forwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.scorers import CallableScorer

REFUSAL = GuardConfig().refusal_text


def says_anything() -> CallableScorer:
    """Cost 1 for any non-empty response but the refusal: each answer spends exactly 1."""
    return CallableScorer(
        lambda prompt, response: float(bool(response.strip()) and response != REFUSAL),
        batched=False,
    )


def answer_counting_guard(model, tokenizer, config: GuardConfig) -> InferenceGuard:
    """A guard whose every answer costs 1, with a per-response budget of 5."""
    return InferenceGuard(
        model,
        tokenizer,
        cost=says_anything(),
        config=config.with_overrides(budget=5.0, max_new_tokens=8),
    )


@contextmanager
def counted_forwards(model: torch.nn.Module) -> Iterator[list[int]]:
    """Counts `model`'s forwards while the block runs (in the list's one entry)."""
    calls = [0]
    handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()
