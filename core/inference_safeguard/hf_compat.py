"""What differs between the transformers versions the core runs on (5.0 to the newest).

transformers 5.24 renamed the KV-cache argument of `forward` and the output field that
returns it from `past_key_values` to `cache`; both names are read here, so the rest of
the core never spells either.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import PreTrainedModel

_CACHE_NAMES = ("cache", "past_key_values")
"""Newest first: the name of the KV cache in `forward`'s arguments and in its outputs."""


def cache_keyword(model: PreTrainedModel) -> str | None:
    """The keyword `model.forward` takes a KV cache by, or None when it takes none."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in _CACHE_NAMES if name in parameters), None)


def output_cache(output: Any) -> Any | None:
    """The KV cache a forward returned (None when it returned none)."""
    for name in _CACHE_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None
