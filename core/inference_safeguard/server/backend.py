"""`Backend`: the one seam between the server and what generates (a decoder or the engine).

The server asks a backend for two things, `agenerate` and `astream`, with the same
arguments as `Decoder`'s, and reads its `config` (the defaults that a request
overrides) and `lm` (to count a prompt's tokens). Any `Decoder` is a backend as it is,
and so is the batching engine, which shares that API; a backend that also has
`stats()` (queue length, rows in flight, ...) has its numbers exported on `/metrics`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from inference_safeguard.config import GuardConfig
from inference_safeguard.lm import LanguageModel, PromptInput
from inference_safeguard.results import GuardResult


class ResultStream(Protocol):
    """Committed text deltas of one response; `result` once they have ended."""

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def __anext__(self) -> str: ...

    @property
    def result(self) -> GuardResult | None: ...

    async def aclose(self) -> None: ...


class Backend(Protocol):
    """What the server calls: `Decoder`'s async API (see `inference_safeguard.decoder`).

    `astream` checks the prompt and settings at once (bad input raises there, before any
    delta), and closing the stream stops its search.
    """

    @property
    def config(self) -> GuardConfig: ...

    @property
    def lm(self) -> LanguageModel: ...

    async def agenerate(
        self,
        prompt: PromptInput,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **overrides: Any,
    ) -> GuardResult: ...

    def astream(
        self,
        prompt: PromptInput,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **overrides: Any,
    ) -> ResultStream: ...


def backend_stats(backend: object) -> dict[str, float]:
    """The finite numbers of `backend.stats()` by metric-safe name; {} for a backend
    without `stats()`.

    `stats()` may return a mapping or a dataclass; values that are not numbers (or are
    bools, nan or inf) are left out, since a gauge cannot show them.
    """
    stats = getattr(backend, "stats", None)
    if not callable(stats):
        return {}
    values = stats()
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        values = dataclasses.asdict(values)
    if not isinstance(values, Mapping):
        return {}
    return {
        re.sub(r"[^A-Za-z0-9_]", "_", str(name)): float(value)
        for name, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }
