"""Process-wide cache of base models: weights load once per model, however many
LangChain objects are built on them (LangChain builds and copies models freely)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from inference_safeguard.lm import CausalLM


@dataclass(frozen=True)
class ModelSource:
    """Where and how to load a base model; equal sources share one loaded model.

    Attributes:
        name_or_path: hub name or local directory.
        device: device to put it on (default: CUDA when available, else CPU).
        dtype: torch dtype or its name (default: bfloat16 on CUDA, float32 on CPU).
        device_map: transformers device map (e.g. "auto") for a sharded model.
        trust_remote_code: run code shipped with the checkpoint.
    """

    name_or_path: str
    device: str | None = None
    dtype: str | None = None
    device_map: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def of(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        device_map: str | None = None,
        trust_remote_code: bool = False,
    ) -> ModelSource:
        """A source with a canonical key: local paths made absolute, dtypes named."""
        if os.path.isdir(name_or_path):
            name_or_path = os.path.abspath(name_or_path)
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        return cls(
            name_or_path=name_or_path,
            device=None if device is None else str(device),
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
        )


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
