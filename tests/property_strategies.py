"""Hypothesis strategies and adversarial cost scorers for the property tests.

The profiles: `fast` (derandomized, a few hundred cases over the suite, run by
`make test`) and `long` (at least 5,000 cases, run by `make test-long`), chosen by the
environment variable `SAFEGUARD_HYPOTHESIS_PROFILE` (default `fast`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from inference_safeguard.scorers import CallableScorer

PROFILE_VARIABLE = "SAFEGUARD_HYPOTHESIS_PROFILE"
FAST_EXAMPLES = 30
"""Cases per property in the fast profile (10 properties: 300 cases)."""
LONG_EXAMPLES = 600
"""Cases per property in the long profile (9 properties of unbounded space: 5,400 cases, plus
the out-of-range values, a finite set tried in full)."""

_COMMON: dict[str, Any] = {
    "deadline": None,
    # Models are built once per session and shared; function-scoped fixtures
    # (network ban, torch seed) are the same for every case.
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    "print_blob": True,
}
settings.register_profile("fast", max_examples=FAST_EXAMPLES, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=LONG_EXAMPLES, **_COMMON)
settings.load_profile(os.environ.get(PROFILE_VARIABLE, "fast"))


# ------------------------------------------------------------------------ configs
def _floats(low: float, high: float, *edges: float) -> st.SearchStrategy[float]:
    return st.sampled_from([low, high, *edges]) | st.floats(
        low, high, allow_nan=False, allow_infinity=False
    )


@st.composite
def full_range_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Keyword arguments of a valid `GuardConfig`: every field over its whole valid range,
    edge values included (too large to decode with; for validation properties)."""
    beam_width = draw(st.integers(1, 4096))
    return {
        "budget": draw(_floats(-1e300, 1e300, 0.0, -0.0, 5e-324, -5e-324)),
        "num_candidates": beam_width * draw(st.integers(1, 4096 // beam_width)),
        "beam_width": beam_width,
        "block_size": draw(st.integers(1, 4096)),
        "max_new_tokens": draw(st.integers(1, 65536)),
        "resample_rounds": draw(st.integers(0, 64)),
        "unsafe_penalty": draw(_floats(0.0, 1e15)),
        "unsafe_logit_penalty": draw(_floats(0.0, 1e6)),
        "safety_discount": draw(_floats(1e-3, 1.0, 5e-324)),
        "temperature": draw(st.just(0.0) | _floats(1e-3, 100.0)),
        "top_p": draw(_floats(1e-3, 1.0, 5e-324, 1e-300)),
        "top_k": draw(st.integers(0, 2**31)),
        "scorer": draw(st.sampled_from(["auto", "models", "critic"])),
        "cost_probe": draw(st.booleans()),
        "critic_risk_weight": draw(_floats(0.0, 1e6)),
        "on_unsafe": draw(st.sampled_from(["refuse", "return", "raise"])),
        "refusal_text": draw(st.text(max_size=40)),
        "stop": draw(st.lists(st.text(min_size=1, max_size=5), max_size=3)),
        "stream_commit": draw(st.sampled_from(["agreement", "block"])),
        "seed": draw(st.none() | st.integers(0, 2**63)),
    }


@st.composite
def search_configs(draw: st.DrawFn, *, scorer: str = "models") -> dict[str, Any]:
    """`GuardConfig` overrides a tiny model decodes in milliseconds: every field over its
    valid range where that is cheap (penalties, discount, sampling, budget, stops), the
    sizes from their lower edge up to a few blocks."""
    beam_width = draw(st.integers(1, 4))
    return {
        "budget": draw(_floats(-1.0, 4.0, 0.0, 0.5, 1.0, 2.0)),
        "num_candidates": beam_width * draw(st.integers(1, 4)),
        "beam_width": beam_width,
        "block_size": draw(st.integers(1, 8)),
        "max_new_tokens": draw(st.integers(1, 24)),
        "resample_rounds": draw(st.integers(0, 3)),
        "unsafe_penalty": draw(_floats(0.0, 1e12, 1e4)),
        "unsafe_logit_penalty": draw(_floats(0.0, 1e6, 5.0)),
        "safety_discount": draw(_floats(1e-3, 1.0, 0.999)),
        "temperature": draw(_floats(1e-3, 100.0, 0.0, 1.0)),
        "top_p": draw(_floats(0.05, 1.0, 1e-300)),
        "top_k": draw(st.integers(0, 64)),
        "scorer": scorer,
        "cost_probe": draw(st.booleans()),
        "critic_risk_weight": draw(_floats(0.0, 100.0, 3.0)),
        "on_unsafe": draw(st.sampled_from(["refuse", "return", "raise"])),
        "refusal_text": draw(st.sampled_from(["I'm sorry, but I can't help with that.", "No."])),
        "stop": draw(st.lists(st.sampled_from(["the", ".", "e", "dog", "\n", "xyz"]), max_size=2)),
        "stream_commit": draw(st.sampled_from(["agreement", "block"])),
        "seed": draw(st.integers(0, 2**63)),
    }


# ------------------------------------------------------------------------ prompts
WORDS = ("the", "dog", "garden", "tell", "me", "about", "a", "small", "bird", "name", "good")
plain_prompts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)
"""Short prompts in the tiny model's own vocabulary: always valid."""

unicode_prompts = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=60
).filter(lambda s: s.strip())
"""Any non-blank text (emoji, CJK, combining marks, control characters)."""

long_prompts = st.integers(50, 700).map(lambda n: " ".join(WORDS[i % len(WORDS)] for i in range(n)))
"""Long prompts, some longer than the tiny model's context window."""

message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant"]), "content": plain_prompts | unicode_prompts}
)
chat_prompts = st.lists(message, min_size=1, max_size=4).map(
    lambda messages: [*messages[:-1], {"role": "user", "content": messages[-1]["content"]}]
)
"""Chat message lists that end with a user turn."""

prompts = plain_prompts | unicode_prompts | long_prompts | chat_prompts


# ---------------------------------------------------------------- cost scorers
def _fraction(prompt: str, response: str, salt: str) -> float:
    digest = hashlib.blake2b(f"{salt}\0{prompt}\0{response}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass
class AdversarialCost:
    """A named, deterministic cost function and what it promises.

    Attributes:
        name: shown in failure reports.
        fn: `(prompt, response) -> cost`.
        monotone: the cost never falls as the response grows (so the guard's reported
            cost, the highest over scored prefixes, equals the full text's).
        finite: every value is finite (else the guard must raise `ScorerOutputError`).
        raises: the exception type `fn` raises on some inputs, or None.
        returned: every value `fn` returned, for the properties to inspect.
        prompts_seen: every prompt the guard handed to it.
    """

    name: str
    fn: Callable[[str, str], float]
    monotone: bool = False
    finite: bool = True
    raises: type[Exception] | None = None
    returned: list[float] = field(default_factory=list)
    prompts_seen: set[str] = field(default_factory=set)

    def scorer(self) -> CallableScorer:
        def score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
            self.prompts_seen.update(prompts)
            values = [self.fn(p, r) for p, r in zip(prompts, responses, strict=True)]
            self.returned.extend(values)
            return values

        return CallableScorer(score)

    def __repr__(self) -> str:
        return f"AdversarialCost({self.name})"


class ScorerFailure(RuntimeError):
    """Raised by the raising cost scorers."""


def _keywords(words: Sequence[str], weight: float) -> Callable[[str, str], float]:
    def fn(prompt: str, response: str) -> float:
        found = {w.strip(".,!?").lower() for w in response.split()}
        return weight * sum(w in found for w in words)

    return fn


@st.composite
def adversarial_costs(draw: st.DrawFn, frequent_words: Sequence[str]) -> AdversarialCost:
    """Cost scorers that the tiny model's own samples break, that change non-monotonically
    with the prefix, that go negative, that return NaN or infinity, or that raise."""
    kind = draw(
        st.sampled_from(
            ["model-words", "length", "hashed", "parity", "negative", "nonfinite", "raising"]
        )
    )
    scale = draw(_floats(1e-3, 10.0, 1.0))
    if kind == "model-words":
        count = draw(st.integers(1, len(frequent_words)))
        return AdversarialCost(
            f"{kind}({count}, {scale})", _keywords(frequent_words[:count], scale)
        )
    if kind == "length":
        return AdversarialCost(f"{kind}({scale})", lambda p, r: scale * len(r) / 40, monotone=True)
    if kind == "hashed":
        salt = draw(st.text(max_size=4))
        return AdversarialCost(
            f"{kind}({salt!r}, {scale})", lambda p, r: scale * _fraction(p, r, salt)
        )
    if kind == "parity":
        return AdversarialCost(f"{kind}({scale})", lambda p, r: scale * (len(r.split()) % 2))
    if kind == "negative":
        offset = draw(_floats(-10.0, 0.0))
        return AdversarialCost(
            f"{kind}({offset}, {scale})", lambda p, r: offset - scale * _fraction(p, r, "n")
        )
    if kind == "nonfinite":
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        threshold = draw(st.floats(0.0, 1.0))
        return AdversarialCost(
            f"{kind}({bad}, {threshold})",
            lambda p, r: bad if _fraction(p, r, "b") >= threshold else 0.0,
            finite=False,
        )
    threshold = draw(st.floats(0.0, 1.0))

    def raising(p: str, r: str) -> float:
        if _fraction(p, r, "r") >= threshold:
            raise ScorerFailure("the cost model failed")
        return 0.0

    return AdversarialCost(f"{kind}({threshold})", raising, raises=ScorerFailure)
