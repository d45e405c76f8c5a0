"""Process-wide cache of base models: weights load once per model, however many
LangChain objects are built on them (LangChain builds and copies models freely)."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from inference_safeguard.lm import CausalLM


@dataclass(frozen=True)
class ModelSource:
    """Where and how to load a base model; equal sources share one loaded model.

    Attributes:
        name_or_path: hub name or local directory.
        device: device to put it on (default: CUDA when available, else CPU).
        dtype: torch dtype or its name (default: bfloat16 on CUDA, float32 on CPU).
        device_map: transformers device map (e.g. "auto", or a dict) for a sharded model.
        trust_remote_code: run code shipped with the checkpoint.
        model_kwargs: more options of the model's `from_pretrained`.
        tokenizer_kwargs: more options of the tokenizer's `from_pretrained`.
        key: what makes two sources equal: every option above in a hashable form.
    """

    name_or_path: str
    device: str | None = None
    dtype: str | None = None
    device_map: str | dict[str, Any] | None = field(default=None, compare=False)
    trust_remote_code: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict, compare=False)
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict, compare=False)
    key: Any = ()

    @classmethod
    def of(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        device_map: str | Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
    ) -> ModelSource:
        """A source with a canonical key: local paths made absolute, dtypes named."""
        if os.path.exists(name_or_path):
            name_or_path = os.path.abspath(name_or_path)
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        device_map = dict(device_map) if isinstance(device_map, Mapping) else device_map
        model_kwargs, tokenizer_kwargs = dict(model_kwargs or {}), dict(tokenizer_kwargs or {})
        return cls(
            name_or_path=name_or_path,
            device=None if device is None else str(device),
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            model_kwargs=model_kwargs,
            tokenizer_kwargs=tokenizer_kwargs,
            key=_frozen((device_map, model_kwargs, tokenizer_kwargs)),
        )


def _frozen(value: Any) -> Any:
    """A hashable stand-in for loading options: mappings and sequences recursively, a
    config object (e.g. `BitsAndBytesConfig`) by its `to_dict()`, anything else by repr."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if callable(getattr(value, "to_dict", None)):
        return (type(value).__name__, _frozen(value.to_dict()))
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return repr(value)


_LOADED: dict[ModelSource, CausalLM] = {}
_LOCK = threading.Lock()


def load_model(source: ModelSource) -> CausalLM:
    """The model and tokenizer of `source`, loaded on first use and shared afterwards."""
    with _LOCK:  # one load at a time: two threads asking for one model load it once
        lm = _LOADED.get(source)
        if lm is None:
            lm = CausalLM.from_pretrained(
                source.name_or_path,
                device=source.device,
                dtype=source.dtype,
                device_map=source.device_map,
                trust_remote_code=source.trust_remote_code,
                model_kwargs=source.model_kwargs,
                tokenizer_kwargs=source.tokenizer_kwargs,
            )
            _LOADED[source] = lm
        return lm


def loaded_models() -> dict[ModelSource, CausalLM]:
    """The models loaded so far, by source (a snapshot)."""
    with _LOCK:
        return dict(_LOADED)


def clear_model_cache() -> None:
    """Forget every loaded model, so that its memory is freed once nothing else uses it."""
    with _LOCK:
        _LOADED.clear()
