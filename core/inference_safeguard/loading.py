"""Loading Hugging Face models and tokenizers: the options every public loader shares,
and every way a load can go wrong as a typed error that says how to fix the call.

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

A checkpoint of the wrong kind loads silently in transformers: a causal LM loaded as a
sequence classifier gets a randomly initialised score head (its scores change from load
to load), and a classifier loaded as a causal LM a random LM head. Transformers reports
such weights as missing (newly initialised) or mismatched in its loading info; any of
them, or a checkpoint whose config names only task heads of another kind, is an error
(`CheckpointKindError`). A device this machine lacks or a dtype that is not one is a
`LoadOptionError`; a path with nothing loadable, or corrupted files, a `ModelLoadError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, overload

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard.errors import CheckpointKindError, LoadOptionError, ModelLoadError

CheckpointKind = Literal["causal-lm", "sequence-classification"]

_NEEDS: dict[CheckpointKind, str] = {
    "causal-lm": "a causal-LM checkpoint (AutoModelForCausalLM) with a trained LM head",
    "sequence-classification": "a sequence-classification checkpoint "
    "(AutoModelForSequenceClassification) with a trained score head",
}
_INSTEAD: dict[CheckpointKind, str] = {
    "causal-lm": "a sequence classifier belongs in ClassifierScorer, as a reward or cost model",
    "sequence-classification": "a causal LM serves as the base model or as GuardModelCost",
}
# Architecture suffixes and what they are, most specific first.
_ARCHITECTURES = (
    ("ForCausalLM", "a causal LM"),
    ("LMHeadModel", "a causal LM"),
    ("ForConditionalGeneration", "a generative model"),
    ("ForSequenceClassification", "a sequence classifier"),
    ("ForTokenClassification", "a token classifier"),
    ("ForQuestionAnswering", "a question-answering model"),
    ("ForMultipleChoice", "a multiple-choice model"),
    ("Model", "a bare transformer without a task head"),
)
# Task heads that are never a causal LM, whatever the loading info says (tied weights
# can hide a missing LM head).
_NOT_CAUSAL = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


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


# --------------------------------------------------------------------- device, dtype
@overload
def resolve_device(device: None) -> None: ...
@overload
def resolve_device(device: str | torch.device) -> torch.device: ...
@overload
def resolve_device(device: str | torch.device | None) -> torch.device | None: ...
def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """`device` as a `torch.device`, checked to be available here; None stays None.

    Raises:
        LoadOptionError: not a device name, or a device this machine does not have.
    """
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise LoadOptionError(
            f"device {device!r} is not a torch device ({error}); pass 'cpu', 'cuda', "
            "'cuda:1' or 'mps'"
        ) from error
    if not _available(resolved):
        raise LoadOptionError(
            f"device {str(resolved)!r} is not available on this machine (torch "
            f"{torch.__version__}: {_accelerators()}); pass device='cpu', or leave the device "
            "unset to use CUDA when it is available"
        )
    return resolved


def _available(device: torch.device) -> bool:
    if device.type in ("cpu", "meta"):
        return True
    if device.type == "mps":
        return torch.backends.mps.is_available()
    module = getattr(torch, device.type, None)
    is_available = getattr(module, "is_available", None)
    if not callable(is_available) or not is_available():
        return False
    count = getattr(module, "device_count", None)
    return device.index is None or not callable(count) or device.index < count()


def _accelerators() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} CUDA device(s)"
    return "no CUDA device" if torch.version.cuda else "built without CUDA"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | Literal["auto"] | None:
    """`dtype` as a floating `torch.dtype` (from a dtype or its name, e.g. "bfloat16" or
    "torch.float16"), "auto" (the checkpoint's own) or None.

    Raises:
        LoadOptionError: not the name of a floating torch dtype.
    """
    if dtype is None:
        return None
    if dtype == "auto":
        return "auto"
    resolved = (
        getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    )
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise LoadOptionError(
            f"dtype {dtype!r} is not a floating torch dtype; pass 'float32', 'bfloat16', "
            "'float16' (or the torch dtype), or 'auto' for the checkpoint's own"
        )
    return resolved


# -------------------------------------------------------------------- options
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
    name_or_path: str | os.PathLike[str],
    *,
    kind: CheckpointKind,
    owner: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: DeviceMap | None = None,
    trust_remote_code: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    tokenizer_kwargs: Mapping[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a tokenizer and a model (in eval mode) with `auto_class`, check the model is
    of `kind`, and place it.

    Args:
        auto_class: the transformers auto class (e.g. `AutoModelForCausalLM`).
        name_or_path: hub name, local directory, or path to a `.gguf` file.
        kind: the kind of checkpoint the caller needs.
        owner: what needs it, for error messages ("ClassifierScorer").
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
        LoadOptionError: a device this machine lacks, or not a floating dtype.
        ModelLoadError: nothing loadable there, or incomplete or corrupted files.
        CheckpointKindError: loading would leave newly initialised weights in the model,
            or the checkpoint is a classifier where a causal LM is needed.
    """
    check_kwargs(model_kwargs or {}, tokenizer_kwargs or {})
    device, resolved_dtype = resolve_device(device), resolve_dtype(dtype)
    name, kwargs = split_gguf_path(str(name_or_path), model_kwargs)
    check_source(name, gguf_file=kwargs.get("gguf_file"))
    with _load_errors(name, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(
            name,
            trust_remote_code=trust_remote_code,
            **tokenizer_options(kwargs, tokenizer_kwargs),
        )
    if resolved_dtype is not None:
        kwargs["dtype"] = resolved_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = load_model(
        auto_class, name, kind=kind, owner=owner, trust_remote_code=trust_remote_code, **kwargs
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


# ---------------------------------------------------------------------- checkpoints
def load_model(
    auto_class: Any,
    name_or_path: str | os.PathLike[str],
    *,
    kind: CheckpointKind,
    owner: str,
    **kwargs: Any,
) -> PreTrainedModel:
    """`auto_class.from_pretrained(name_or_path, **kwargs)`, checked to be of `kind`.

    Args:
        auto_class: the transformers auto class (`AutoModelForCausalLM`, ...).
        kind: the kind of checkpoint the caller needs.
        owner: what needs it, for the error message ("ClassifierScorer").

    Raises:
        ModelLoadError: incomplete or corrupted files (`load_pretrained` checks the
            source first).
        CheckpointKindError: loading would leave newly initialised weights in the model,
            or the checkpoint is a classifier where a causal LM is needed.
    """
    with _load_errors(name_or_path, "model"):
        try:
            model, info = auto_class.from_pretrained(
                str(name_or_path), output_loading_info=True, **kwargs
            )
        except ValueError as error:
            if "Unrecognized configuration class" not in str(error):
                raise
            raise CheckpointKindError(
                f"{str(name_or_path)!r} holds a {_model_type(error)} checkpoint, which has "
                f"no {kind} form; {owner} needs {_NEEDS[kind]}"
            ) from error
    check_kind(model, info, name_or_path, kind=kind, owner=owner)
    return model


def check_kind(
    model: PreTrainedModel,
    loading_info: Any,
    name_or_path: str | os.PathLike[str],
    *,
    kind: CheckpointKind,
    owner: str,
) -> None:
    """Reject a model that transformers loaded with newly initialised weights.

    Args:
        loading_info: what `from_pretrained(..., output_loading_info=True)` returned
            with the model: a mapping (or an object) with `missing_keys` and
            `mismatched_keys` (lists, sets, or for mismatches `(key, shape, shape)` tuples).

    Raises:
        CheckpointKindError: saying what was expected and what the checkpoint holds.
    """
    fresh = sorted(
        {str(key) for key in _entries(loading_info, "missing_keys")}
        | {
            str(key[0] if isinstance(key, tuple) else key)
            for key in _entries(loading_info, "mismatched_keys")
        }
    )
    architectures = list(getattr(model.config, "architectures", None) or [])
    wrong_head = (
        kind == "causal-lm"
        and bool(architectures)
        and all(name.endswith(_NOT_CAUSAL) for name in architectures)
    )
    if not fresh and not wrong_head:
        return
    found = _described(architectures)
    shown = ", ".join(fresh[:5]) + (f" and {len(fresh) - 5} more" if len(fresh) > 5 else "")
    randomly = (
        f": loading it as one would leave {shown} randomly initialised, so its outputs "
        "would change from load to load"
        if fresh
        else ""
    )
    raise CheckpointKindError(
        f"{str(name_or_path)!r} holds {found}; {owner} needs {_NEEDS[kind]}{randomly}. "
        f"Pass a checkpoint of that kind; {_INSTEAD[kind]}"
    )


def check_source(name_or_path: str | os.PathLike[str], *, gguf_file: str | None = None) -> None:
    """Reject a local path that holds no checkpoint before transformers reads it as a hub
    name (and reports a misleading "Repo id must be in the form ...").

    A name that exists locally must be a directory with a `config.json` (or with the
    `gguf_file` named); a name that can only be a path (absolute, `./`, `../`, `~`, or
    with more than one `/`) must exist. Anything else is left to the hub.

    Raises:
        ModelLoadError: saying what is missing.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelLoadError(
            f"a model is named by a hub name or a local directory, got {name_or_path!r}"
        )
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise ModelLoadError(f"{text!r} holds no GGUF file {gguf_file!r}")
            return
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{text!r} holds no config.json, so it is not a Hugging Face checkpoint; pass "
                "the directory that save_pretrained wrote (config.json, weights, tokenizer)"
            )
        return
    if path.exists():
        raise ModelLoadError(
            f"{text!r} is a file; pass the checkpoint directory that holds it (with "
            "config.json), or a hub name"
        )
    looks_local = (
        path.is_absolute() or text.startswith((".", "~")) or "\\" in text or text.count("/") > 1
    )
    if looks_local:
        raise ModelLoadError(
            f"no such directory: {text!r}; check the path (a hub name has the form 'org/name')"
        )


@contextmanager
def _load_errors(name_or_path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turn transformers' and safetensors' loading errors into `ModelLoadError`."""
    text = str(name_or_path)
    try:
        yield
    except SafetensorError as error:
        raise ModelLoadError(
            f"the weights of {text!r} are incomplete or corrupted ({_first_line(error)}); "
            "download or save the model again"
        ) from error
    except OSError as error:
        if isinstance(error, ModelLoadError):
            raise
        where = (
            ""
            if Path(text).expanduser().exists()
            else "it is not a local directory, and as a hub name: "
        )
        raise ModelLoadError(
            f"cannot load the {what} of {text!r}: {where}{_first_line(error)}"
        ) from error


def _entries(info: Any, name: str) -> Iterable[Any]:
    value = info.get(name) if isinstance(info, dict) else getattr(info, name, None)
    return value or ()


def _described(architectures: list[str]) -> str:
    if not architectures:
        return "a checkpoint whose config.json names no architecture"
    name = architectures[0]
    what = next((what for suffix, what in _ARCHITECTURES if name.endswith(suffix)), None)
    return f"{what} ({name})" if what else f"a {name} checkpoint"


def _model_type(error: ValueError) -> str:
    text = str(error)
    marker = "Unrecognized configuration class "
    start = text.find(marker)
    return text[start + len(marker) :].split()[0].strip("<>'.,") if start >= 0 else "model"


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
