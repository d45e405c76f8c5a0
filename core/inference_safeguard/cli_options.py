"""Command-line building blocks shared by the `safeguard` subcommands.

Argument types that fail with argparse's own error, the `GuardConfig` fields as flags
(generated from the pydantic model so that the two never drift apart), the model and
scorer options with the loading of what they name, the JSONL prompt file, and the
error a command line that cannot be carried out raises.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, overload

import torch
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from inference_safeguard.config import GuardConfig
from inference_safeguard.errors import LoadOptionError, SafeguardError
from inference_safeguard.lm import CausalLM, PromptInput
from inference_safeguard.loading import resolve_device
from inference_safeguard.programmatic import KeywordReward
from inference_safeguard.scorers import ClassifierScorer, KeywordCost, RegexCost, Scorer

DTYPES = ("auto", "float32", "float16", "bfloat16")
"""The `--dtype` choices: "auto" or the name of a floating torch dtype."""


class CommandLineError(Exception):
    """A command line that parses but cannot be carried out; reported without a traceback."""


@contextlib.contextmanager
def loading(flag: str, path: str) -> Iterator[None]:
    """Report a model that cannot be loaded (missing path, wrong kind of checkpoint,
    bad scorer option) as a command-line error that names the flag."""
    try:
        yield
    except SafeguardError as exc:  # already says what is wrong with the path or device
        raise CommandLineError(f"cannot load {flag} {path!r}: {exc}") from exc
    except (OSError, ValueError) as exc:
        # transformers reports a mistyped local path as a malformed hub name; say both.
        where = "" if os.path.exists(path) else "no such local path, and as a hub name: "
        raise CommandLineError(f"cannot load {flag} {path!r}: {where}{exc}") from exc


# ------------------------------------------------------------------ argument types
def parse_device(text: str) -> torch.device:
    """A torch device this machine has."""
    try:
        return torch.device(resolve_device(text))
    except LoadOptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_keyword_cost(text: str) -> KeywordCost:
    words = [word.strip() for word in text.split(",")]
    if not all(words):
        raise argparse.ArgumentTypeError(
            f"empty word in {text!r}; separate words by single commas, e.g. bomb,poison"
        )
    return KeywordCost(words)


def parse_regex_cost(pattern: str) -> RegexCost:
    try:
        return RegexCost(pattern)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def json_object(text: str) -> dict[str, Any]:
    """A JSON object (of loading options)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


def device_map(text: str) -> str | dict[str, Any]:
    """A device map: a JSON object, or the name of a transformers strategy ("auto")."""
    return json_object(text) if text.lstrip().startswith("{") else text


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A number other than inf and nan."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


# -------------------------------------------------------------------------- options
def add_option_with_default(
    group: argparse._ArgumentGroup,
    flag: str,
    value_type: Callable[[str], Any],
    default: Any,
    help_text: str,
    *,
    metavar: str = "N",
) -> None:
    """Add a `flag VALUE` option whose help ends with its default."""
    group.add_argument(
        flag,
        type=value_type,
        default=default,
        metavar=metavar,
        help=f"{help_text} (default: %(default)s)",
    )


# ----------------------------------------------------------- GuardConfig as flags
def add_config_option(group: argparse._ArgumentGroup, name: str, field: FieldInfo) -> None:
    """Add `--field-name` for one `GuardConfig` field; its default None means "not given"."""
    flag = "--" + name.replace("_", "-")
    help_text = (field.description or "").replace("%", "%%")
    if field.default not in (None, ()) and field.default_factory is None:
        help_text += f" (default: {field.default})"
    if field.annotation is bool:  # --flag / --no-flag
        group.add_argument(
            flag,
            dest=name,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=help_text,
        )
        return
    value_type, choices, repeatable = _option_type(name, field.annotation)
    group.add_argument(
        flag,
        dest=name,
        type=value_type,
        choices=choices,
        action="append" if repeatable else "store",
        default=None,
        metavar=None if choices else _metavar(value_type),
        help=help_text + ("; repeatable" if repeatable else ""),
    )


_METAVARS: dict[type, str] = {int: "N", float: "X", str: "TEXT"}


def _metavar(value_type: Callable[[str], Any]) -> str:
    """The metavar of a flag parsed by `value_type` (JSON for a parser of JSON objects)."""
    return _METAVARS[value_type] if isinstance(value_type, type) else "JSON"


def _option_type(
    name: str, annotation: Any
) -> tuple[Callable[[str], Any], tuple[Any, ...] | None, bool]:
    """`(type, choices, repeatable)` of the flag for a field annotated `annotation`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType) and type(None) in args:
        [annotation] = [arg for arg in args if arg is not type(None)]
        origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return type(args[0]), args, False
    if origin is dict:
        return json_object, None, False
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _METAVARS:
        return args[0], None, True
    if annotation in _METAVARS:
        return annotation, None, False
    raise TypeError(
        f"GuardConfig.{name} is annotated {annotation!r}, which has no command-line form; "
        "teach inference_safeguard.cli_options._option_type about it"
    )


def guard_config(args: argparse.Namespace) -> GuardConfig:
    """`GuardConfig` from the config flags given; the others keep GuardConfig's defaults."""
    given = {
        name: getattr(args, name)
        for name in GuardConfig.model_fields
        if getattr(args, name, None) is not None
    }
    try:
        return GuardConfig(**given)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if error["loc"]:
                message = f"--{str(error['loc'][0]).replace('_', '-')}: {message}"
            problems.append(message)
        raise CommandLineError("invalid search settings: " + "; ".join(problems)) from exc


# ------------------------------------------------------------- models and scorers
def add_scorer_options(group: argparse._ArgumentGroup, *, reward_help: str) -> None:
    """Add `--cost-model` (alias `--cost`), `--cost-keywords` (one cost at most:
    `check_single_cost`) and `--reward-model` (alias `--reward`, described by
    `reward_help`)."""
    group.add_argument(
        "--cost-model",
        "--cost",
        dest="cost_model",
        metavar="PATH",
        help="sequence-classification cost model (higher = more unsafe)",
    )
    add_cost_keywords_option(group)
    group.add_argument(
        "--reward-model", "--reward", dest="reward_model", metavar="PATH", help=reward_help
    )


def add_cost_keywords_option(group: argparse._ArgumentGroup) -> None:
    """Add `--cost-keywords WORD[,WORD...]`, a `KeywordCost`."""
    group.add_argument(
        "--cost-keywords",
        type=parse_keyword_cost,
        metavar="WORD[,WORD...]",
        help="cost 1 per occurrence of these words (case-insensitive, whole words)",
    )


def add_loading_options(
    group: argparse._ArgumentGroup, *, device_help: str, dtype_help: str | None = None
) -> None:
    """Add `--device`, `--dtype` (only where `dtype_help` is given) and `--trust-remote-code`,
    the options `from_pretrained_options` reads."""
    group.add_argument("--device", type=parse_device, default=None, help=device_help)
    if dtype_help is not None:
        group.add_argument("--dtype", choices=DTYPES, default=None, help=dtype_help)
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run code shipped with the checkpoints; only for authors you trust",
    )
    group.add_argument(
        "--device-map",
        type=device_map,
        default=None,
        metavar="MAP",
        help='transformers device map of every model: "auto", "balanced", ... or a JSON '
        "object of module -> device (e.g. '{\"\": 0}'); such models are never moved",
    )
    group.add_argument(
        "--model-kwargs",
        type=json_object,
        default=None,
        metavar="JSON",
        help="more from_pretrained options of --model as a JSON object, e.g. "
        '\'{"attn_implementation": "eager", "revision": "main"}\' (a --model path to a '
        ".gguf file sets gguf_file itself)",
    )
    group.add_argument(
        "--tokenizer-kwargs",
        type=json_object,
        default=None,
        metavar="JSON",
        help="more from_pretrained options of the tokenizer of --model as a JSON object "
        "(gguf_file and revision come from --model-kwargs too)",
    )


def from_pretrained_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `device`, `dtype`, `trust_remote_code` and (when given) `device_map` of every
    model a command loads.

    The device defaults to CUDA when available, else CPU; the dtype is None (each
    model's own default) for a command without `--dtype`.
    """
    options = {
        "device": args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        "dtype": getattr(args, "dtype", None),
        "trust_remote_code": args.trust_remote_code,
    }
    if getattr(args, "device_map", None) is not None:
        options["device_map"] = args.device_map
    return options


def base_model_options(args: argparse.Namespace) -> dict[str, Any]:
    """`from_pretrained_options` plus the `--model-kwargs` and `--tokenizer-kwargs` that
    apply to `--model` alone."""
    return {
        **from_pretrained_options(args),
        "model_kwargs": getattr(args, "model_kwargs", None),
        "tokenizer_kwargs": getattr(args, "tokenizer_kwargs", None),
    }


def check_single_cost(args: argparse.Namespace) -> None:
    """Refuse `--cost-keywords` together with `--cost-model`."""
    if args.cost_keywords is not None and args.cost_model is not None:
        raise CommandLineError("give one cost: --cost-keywords or --cost-model")


@overload
def load_cost(args: argparse.Namespace, *, required: Literal[True]) -> Scorer: ...
@overload
def load_cost(args: argparse.Namespace, *, required: bool = False) -> Scorer | None: ...
def load_cost(args: argparse.Namespace, *, required: bool = False) -> Scorer | None:
    """The cost given by `--cost-keywords` or `--cost-model`, or None.

    Raises:
        CommandLineError: `required` (the cost of a `--model`) and no cost given, or a
            cost model that cannot be loaded.
    """
    if args.cost_model is None:
        if required and args.cost_keywords is None:
            raise CommandLineError("--model needs a cost: --cost-keywords or --cost-model")
        return args.cost_keywords
    with loading("--cost-model", args.cost_model):
        return ClassifierScorer.from_pretrained(args.cost_model, **from_pretrained_options(args))


KEYWORDS_REWARD = "keywords-reward:"
"""`--reward keywords-reward:words=W1,W2;weight=W`: a `KeywordReward` from its spec."""


def load_reward(args: argparse.Namespace) -> Scorer | None:
    """The reward given by `--reward-model`: a reward model, a `KeywordReward` written
    `keywords-reward:words=W1,W2;weight=W`, or None.

    Raises:
        CommandLineError: the model does not load, or the keyword spec is malformed.
    """
    if args.reward_model is None:
        return None
    if args.reward_model.startswith(KEYWORDS_REWARD):
        try:
            return KeywordReward.from_spec(args.reward_model.removeprefix(KEYWORDS_REWARD))
        except (TypeError, ValueError) as exc:
            raise CommandLineError(f"--reward {args.reward_model!r}: {exc}") from exc
    with loading("--reward-model", args.reward_model):
        return ClassifierScorer.from_pretrained(args.reward_model, **from_pretrained_options(args))


def load_base_model(args: argparse.Namespace) -> CausalLM:
    """The causal LM given by `--model`."""
    with loading("--model", args.model):
        return CausalLM.from_pretrained(args.model, **base_model_options(args))


# -------------------------------------------------------------------------- prompts
def add_prompts_option(group: argparse._ArgumentGroup, *, default_help: str) -> None:
    """Add `--prompts FILE.jsonl` (read by `file_prompts`); `default_help` names the
    prompts the command takes without it."""
    group.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE.jsonl",
        help='one JSON object per line with a "prompt": a string or a list of '
        f'{{"role", "content"}} messages (default: {default_help})',
    )


def file_prompts(args: argparse.Namespace, *, demo_prompts: str) -> list[PromptInput] | None:
    """The prompts of `--prompts`, or None without it.

    Args:
        demo_prompts: what of the demo world a `--model` without `--prompts` cannot use
            ("splits", "prompts"), for the error message.

    Raises:
        CommandLineError: a bad prompt file, or `--model` without `--prompts`.
        OSError: the file cannot be read.
    """
    prompts = None if args.prompts is None else read_prompt_file(args.prompts)
    if args.model is not None and prompts is None:
        raise CommandLineError(
            f"--model needs --prompts FILE.jsonl: the demo world's {demo_prompts} go with its model"
        )
    return prompts


def read_prompt_file(path: Path) -> list[PromptInput]:
    """The prompts of a JSONL file: one object with a `"prompt"` per line; blank lines skipped.

    Raises:
        CommandLineError: a file that is not UTF-8, a line that is not such an object,
            or a file with no prompts.
        OSError: the file cannot be read.
    """
    prompts: list[PromptInput] = []
    for number, line in enumerate(_utf8_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CommandLineError(
                f'{path}:{number}: not JSON ({exc.msg}); write {{"prompt": "..."}} per line'
            ) from exc
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, (str, list)):
            raise CommandLineError(
                f'{path}:{number}: needs a "prompt" that is a string or a list of '
                '{"role", "content"} messages'
            )
        prompts.append(prompt)
    if not prompts:
        raise CommandLineError(f"{path} holds no prompts; write one JSON object per line")
    return prompts


def _utf8_text(path: Path) -> str:
    """The text of `path`, which must be UTF-8 (the encoding JSON Lines files use)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CommandLineError(
            f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset "
            f"{exc.start}); a prompt file is UTF-8 JSON Lines: save it as UTF-8"
        ) from exc


def read_stdin_text() -> str:
    """Standard input as text, decoded as UTF-8 whatever the locale says."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandLineError(
            f"standard input is not UTF-8 text (byte {data[exc.start]:#04x} at offset "
            f"{exc.start}); pipe the prompt as UTF-8"
        ) from exc


# --------------------------------------------------------------------------- output
def check_output_dir(path: Path, flag: str, files: Sequence[str] = ()) -> None:
    """Refuse, before a long run, an output directory the run could not write at its end.

    The directory need not exist (it is created then); it must not be a file, the
    nearest existing directory above it must be writable, and none of `files` (the
    names the run writes into it) may be a directory.

    Raises:
        CommandLineError: saying what is in the way.
    """
    if path.exists() and not path.is_dir():
        raise CommandLineError(
            f"{flag} {path} is a file; pass a directory (created if it does not exist)"
        )
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CommandLineError(
            f"{flag} {path}: {existing} is a file, so no directory can be made under it"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandLineError(
            f"{flag} {path}: {existing} is not writable; pass a directory you can write to"
        )
    taken = [name for name in files if (path / name).is_dir()]
    if taken:
        raise CommandLineError(
            f"{flag} {path}: {', '.join(taken)} would be overwritten but is a directory; "
            "pass another directory"
        )
