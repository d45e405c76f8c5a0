"""Loading Hugging Face checkpoints: the device and dtype asked for, paths that hold
nothing loadable, and checkpoints of another kind than the one needed, each as a typed
error that says how to fix the call.

A checkpoint of the wrong kind loads silently in transformers: a causal LM loaded as a
sequence classifier gets a randomly initialised score head (its scores change from load
to load), and a classifier loaded as a causal LM a random LM head. Transformers reports
such weights as missing (newly initialised) or mismatched in its loading info; any of
them, or a checkpoint whose config names only task heads of another kind, is an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

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


# --------------------------------------------------------------------- device, dtype
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
    if dtype is None or dtype == "auto":
        return dtype
    resolved = (
        getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    )
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise LoadOptionError(
            f"dtype {dtype!r} is not a floating torch dtype; pass 'float32', 'bfloat16', "
            "'float16' (or the torch dtype), or 'auto' for the checkpoint's own"
        )
    return resolved


# ---------------------------------------------------------------------- checkpoints
def load_tokenizer(
    name_or_path: str | os.PathLike[str], *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub name or local checkpoint directory.

    Raises:
        ModelLoadError: nothing loadable there (see `check_source`).
    """
    check_source(name_or_path)
    with _load_errors(name_or_path, "tokenizer"):
        return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)


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
        ModelLoadError: nothing loadable there, or incomplete or corrupted files.
        CheckpointKindError: loading would leave newly initialised weights in the model,
            or the checkpoint is a classifier where a causal LM is needed.
    """
    check_source(name_or_path)
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


def check_source(name_or_path: str | os.PathLike[str]) -> None:
    """Reject a local path that holds no checkpoint before transformers reads it as a hub
    name (and reports a misleading "Repo id must be in the form ...").

    A name that exists locally must be a directory with a `config.json`; a name that can
    only be a path (absolute, `./`, `../`, `~`, or with more than one `/`) must exist.
    Anything else is left to the hub.

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
