"""Loading Hugging Face models and tokenizers: the options every public loader shares.

Every loader of the package (`InferenceGuard.from_pretrained`, the scorers'
`from_pretrained`, both integrations, the CLI) goes through `load_pretrained`, so that
they all take the same options:

- `device_map` as a string ("auto") or a dict (module name -> device);
- `model_kwargs`, passed to the model's `from_pretrained` (`quantization_config`,
  `attn_implementation`, `revision`, `gguf_file`, ...);
- `tokenizer_kwargs`, passed to the tokenizer's `from_pretrained`; the options that name
  *which* checkpoint to read (`gguf_file`, `revision`, `subfolder`, `cache_dir`,
  `local_files_only`, `token`) reach the tokenizer from `model_kwargs` too, unless
  `tokenizer_kwargs` sets them;
- a path to a `.gguf` file as the name: split into its directory and `gguf_file`.

A model placed by transformers (device-mapped or quantized) is never moved with `.to()`:
accelerate's hooks or the quantized weights would break.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

DeviceMap = str | dict[str, Any]
"""A transformers device map: "auto", "balanced", ... or module name -> device."""

_SHARED_WITH_TOKENIZER = (
    "gguf_file",
    "revision",
    "subfolder",
    "cache_dir",
    "local_files_only",
    "token",
)
"""`model_kwargs` that say which checkpoint to read, so the tokenizer needs them too."""

_OWN_ARGUMENTS = ("trust_remote_code", "device_map", "dtype", "torch_dtype")
"""Options that have their own argument; given in `model_kwargs` they are refused, so
that one switch (above all `trust_remote_code`) has one place."""


def split_gguf_path(
    name_or_path: str, model_kwargs: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """`(directory, model_kwargs with gguf_file)` for a path to a `.gguf` file; other
    names come back as they are.

    Raises:
        ValueError: a `.gguf` path together with another `gguf_file` in `model_kwargs`.
    """
    kwargs = dict(model_kwargs or {})
    if not (str(name_or_path).lower().endswith(".gguf") and os.path.isfile(name_or_path)):
        return name_or_path, kwargs
    directory, file_name = os.path.split(os.path.abspath(name_or_path))
    given = kwargs.get("gguf_file")
    if given is not None and given != file_name:
        raise ValueError(
            f"the model path names the GGUF file {file_name!r} but model_kwargs names "
            f"gguf_file={given!r}; give one of them"
        )
    kwargs["gguf_file"] = file_name
    return directory, kwargs


def tokenizer_options(
    model_kwargs: Mapping[str, Any], tokenizer_kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The tokenizer's `from_pretrained` options: the checkpoint-naming ones of
    `model_kwargs`, then `tokenizer_kwargs` on top."""
    shared = {key: model_kwargs[key] for key in _SHARED_WITH_TOKENIZER if key in model_kwargs}
    return {**shared, **(tokenizer_kwargs or {})}


def check_kwargs(model_kwargs: Mapping[str, Any], tokenizer_kwargs: Mapping[str, Any]) -> None:
    """Refuse options that have their own argument inside the kwargs dicts.

    Raises:
        TypeError: naming the option and the argument to use instead.
    """
    for where, kwargs in (("model_kwargs", model_kwargs), ("tokenizer_kwargs", tokenizer_kwargs)):
        for key in _OWN_ARGUMENTS:
            if key in kwargs:
                argument = "dtype" if key == "torch_dtype" else key
                raise TypeError(
                    f"{where} must not hold {key!r}: pass {argument}=... as its own argument "
                    "of the loader"
                )


def load_pretrained(
    auto_class: Any,
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: DeviceMap | None = None,
    trust_remote_code: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    tokenizer_kwargs: Mapping[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a tokenizer and a model (in eval mode) with `auto_class` and place it.

    Args:
        auto_class: the transformers auto class (e.g. `AutoModelForCausalLM`).
        name_or_path: hub name, local directory, or path to a `.gguf` file.
        device: where to move the model; ignored for a model transformers placed
            itself (device-mapped or quantized). None leaves it where it loaded.
        dtype: torch dtype or its name; None: the checkpoint's own.
        device_map: transformers device map, a string or a dict.
        trust_remote_code: run code shipped with the checkpoint; off unless set.
        model_kwargs: more options of the model's `from_pretrained`.
        tokenizer_kwargs: more options of the tokenizer's `from_pretrained`.

    Raises:
        TypeError: `trust_remote_code`, `device_map` or `dtype` inside the kwargs.
        ValueError: a `.gguf` path that conflicts with `model_kwargs["gguf_file"]`.
    """
    check_kwargs(model_kwargs or {}, tokenizer_kwargs or {})
    name_or_path, kwargs = split_gguf_path(name_or_path, model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path,
        trust_remote_code=trust_remote_code,
        **tokenizer_options(kwargs, tokenizer_kwargs),
    )
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = auto_class.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, **kwargs
    ).eval()
    if device is not None and not is_placed(model):
        model = model.to(device)
    return model, tokenizer


def is_placed(model: torch.nn.Module) -> bool:
    """Whether transformers placed the model itself (device-mapped across devices, or
    quantized), so that `.to(device)` must not move it."""
    if getattr(model, "hf_device_map", None):
        return True
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return True
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    config = getattr(model, "config", None)
    return getattr(config, "quantization_config", None) is not None
