"""Command-line building blocks shared by the `safeguard` subcommands.

Argument types that fail with argparse's own error, the `GuardConfig` fields as flags
(generated from the pydantic model so that the two never drift apart), and the
error a command line that cannot be carried out raises.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import types
from collections.abc import Callable, Iterator
from typing import Any, Literal, Union, get_args, get_origin

import torch
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from core.config import GuardConfig
from core.scorers import KeywordCost, RegexCost


class CommandLineError(Exception):
    """A command line that parses but cannot be carried out; reported without a traceback."""


@contextlib.contextmanager
def loading(flag: str, path: str) -> Iterator[None]:
    """Report a model that cannot be loaded (missing path, wrong kind of checkpoint,
    bad scorer option) as a command-line error that names the flag."""
    try:
        yield
    except (OSError, ValueError) as exc:
        # transformers reports a mistyped local path as a malformed hub name; say both.
        where = "" if os.path.exists(path) else "no such local path, and as a hub name: "
        raise CommandLineError(f"cannot load {flag} {path!r}: {where}{exc}") from exc


# ------------------------------------------------------------------ argument types
def parse_device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; try cpu, cuda, cuda:1 or mps") from exc


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


# ----------------------------------------------------------- GuardConfig as flags
def add_config_option(group: argparse._ArgumentGroup, name: str, field: FieldInfo) -> None:
    """Add `--field-name` for one `GuardConfig` field; its default None means "not given"."""
    flag = "--" + name.replace("_", "-")
    help_text = (field.description or "").replace("%", "%%")
    if field.default not in (None, ()):
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
        metavar=None if choices else _METAVARS[value_type],
        help=help_text + ("; repeatable" if repeatable else ""),
    )


_METAVARS: dict[type, str] = {int: "N", float: "X", str: "TEXT"}


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
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _METAVARS:
        return args[0], None, True
    if annotation in _METAVARS:
        return annotation, None, False
    raise TypeError(
        f"GuardConfig.{name} is annotated {annotation!r}, which has no command-line form; "
        "teach core.cli_options._option_type about it"
    )


def guard_config(args: argparse.Namespace) -> GuardConfig:
    """`GuardConfig` from the config flags given; the others keep GuardConfig's defaults."""
    given = {
        name: getattr(args, name)
        for name in GuardConfig.model_fields
        if getattr(args, name) is not None
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
