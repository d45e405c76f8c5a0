"""Identities of decoders and their parts: everything that changes what a decoder
returns, as JSON-able dicts, so that a cache (LangChain's LLM cache) never hands one
setup's answer to another.

- A model (base model, classifier, guard LLM, critic) is fingerprinted, not hashed
  whole: its class, name or path, config, and a SHA-256 over every tensor's name,
  shape, dtype and `SAMPLES_PER_TENSOR` evenly spaced values. Two checkpoints that
  differ anywhere but in the few values sampled of each tensor share a fingerprint, which
  no fine-tune or re-initialisation does in practice. The fingerprint is computed once
  per model object (kept while the object lives), so changing a model's weights in place
  after its first use goes unnoticed: build a new decoder for new weights.
- A tokenizer: class, name or path, vocabulary, added tokens and chat template.
- A scorer: its class and every attribute (keywords, patterns, weights, templates, its
  model and tokenizer as above); a scorer may describe itself instead with an
  `identity() -> dict` method.
- A function (`CallableScorer`) or any object this module cannot describe is named by
  its qualified name and `id()`: equal only to itself within one process, so answers of
  such setups are never shared across processes.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import BaseModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard.scorers import Scorer

SAMPLES_PER_TENSOR = 64
"""Values of each tensor that enter a model's weights fingerprint."""

_MAX_DEPTH = 8

_FINGERPRINTS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def digest(identity: Any) -> str:
    """SHA-256 (hex) of a JSON-able identity, independent of dict order."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def model_fingerprint(module: torch.nn.Module) -> dict[str, Any]:
    """Class, name or path, config hash and weights hash of a model (see the module
    docstring); computed once per model object."""
    return _cached(module, _model_fingerprint)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Class, name or path, and hashes of the vocabulary (added tokens included) and chat
    template of a tokenizer; computed once per tokenizer object."""
    return _cached(tokenizer, _tokenizer_fingerprint)


def scorer_identity(scorer: Scorer | None, depth: int = 0) -> dict[str, Any] | None:
    """What makes a scorer score as it does: its class and settings (see the module
    docstring); None for no scorer."""
    if scorer is None:
        return None
    own = getattr(scorer, "identity", None)
    settings = own() if callable(own) else vars(scorer)
    return {"class": _qualified_name(type(scorer)), "settings": describe(settings, depth + 1)}


def describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of `value` that differs whenever its behaviour may."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if depth > _MAX_DEPTH:
        return _object_id(value)
    if isinstance(value, torch.nn.Module):
        return model_fingerprint(value)
    if isinstance(value, PreTrainedTokenizerBase):
        return tokenizer_fingerprint(value)
    if isinstance(value, torch.Tensor):
        return {"tensor": _tensor_digest([("", value)])}
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, enum.Enum):
        return describe(value.value, depth + 1)
    if isinstance(value, re.Pattern):
        return {"pattern": value.pattern, "flags": int(value.flags)}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(key): describe(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(item, depth + 1) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((describe(item, depth + 1) for item in value), key=digest)
    if isinstance(value, Scorer):
        return scorer_identity(value, depth)
    return _object_id(value)


# ------------------------------------------------------------------ internals
def _cached(key: Any, compute: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    try:
        found = _FINGERPRINTS.get(key)
    except TypeError:  # not weakly referable or not hashable: compute every time
        return compute(key)
    if found is None:
        found = compute(key)
        _FINGERPRINTS[key] = found
    return found


def _model_fingerprint(module: torch.nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config_data: Any = config.to_dict()
    elif isinstance(config, BaseModel):
        config_data = config.model_dump(mode="json")
    else:
        config_data = None
    name = getattr(config, "_name_or_path", "") if config is not None else ""
    return {
        "class": _qualified_name(type(module)),
        "name_or_path": str(name or ""),
        "config_sha256": digest(config_data),
        "weights_sha256": _tensor_digest(module.state_dict(keep_vars=True).items()),
    }


@torch.no_grad()
def _tensor_digest(tensors: Any) -> str:
    """SHA-256 over each tensor's name, shape, dtype and evenly spaced sample of values."""
    sha = hashlib.sha256()
    for name, tensor in tensors:
        tensor = tensor.detach()
        sha.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{tensor.device.type}".encode())
        count = tensor.numel()
        if count == 0 or tensor.is_meta:
            continue
        positions = torch.linspace(0, count - 1, min(count, SAMPLES_PER_TENSOR)).round().long()
        try:
            sample = tensor.reshape(-1)[positions.to(tensor.device)]
            values = sample.to(device="cpu", dtype=torch.float64).numpy().tobytes()
        except (RuntimeError, TypeError, NotImplementedError):
            # A tensor type that cannot be sampled (e.g. quantized): only this object is
            # known to hold these weights.
            values = f"object {id(tensor)}".encode()
        sha.update(values)
    return sha.hexdigest()


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    vocab = sorted(tokenizer.get_vocab().items())
    added = sorted(
        (index, token.content, token.special, token.lstrip, token.rstrip, token.normalized)
        for index, token in tokenizer.added_tokens_decoder.items()
    )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return {
        "class": _qualified_name(type(tokenizer)),
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "vocab_sha256": digest([vocab, added]),
        # Normalizer, pre-tokenizer and merges decide how text splits into that vocabulary.
        "pipeline_sha256": digest(backend.to_str()) if backend is not None else None,
        "chat_template_sha256": digest(getattr(tokenizer, "chat_template", None)),
        "special_tokens": describe(tokenizer.special_tokens_map),
    }


def _object_id(value: Any) -> dict[str, Any]:
    kind = value if isinstance(value, type) else type(value)
    name = getattr(value, "__qualname__", None) if callable(value) else None
    return {
        "object": _qualified_name(kind),
        **({"name": f"{getattr(value, '__module__', '')}.{name}"} if name else {}),
        "id": id(value),
    }


def _qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"
