"""The `safeguard` console script: argument parsing, one function per subcommand.

`safeguard generate` loads a local (or hub) causal LM, wraps it in `InferenceGuard`
with the cost and reward models named on the command line, and prints the response
with its safety record. Every `GuardConfig` field is a flag, generated from the
pydantic model so that the two never drift apart.

Exit codes: 0 success, 2 bad command line, bad settings or a path that cannot be
loaded (a one-line `safeguard: error: ...` on stderr, no traceback), 3 the response
stayed over budget and `--on-unsafe raise` was given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Union, get_args, get_origin

import torch
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from core.config import GuardConfig
from core.errors import SafeguardError, UnsafeGenerationError
from core.guard import InferenceGuard
from core.lm import PromptInput
from core.results import GuardResult
from core.scorers import (
    ClassifierScorer,
    GuardModelCost,
    KeywordCost,
    RegexCost,
    Scorer,
)

EXIT_USAGE = 2
"""Bad command line, invalid settings, or a model path that cannot be loaded."""
EXIT_UNSAFE = 3
"""The response stayed over budget and `--on-unsafe raise` was given."""

_DTYPES = ("auto", "float32", "float16", "bfloat16")


class CommandLineError(Exception):
    """A command line that parses but cannot be carried out; reported without a traceback."""


# ----------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Run the `safeguard` command line and return its exit status.

    Args:
        argv: the arguments after the program name; default `sys.argv[1:]`.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help and on usage errors
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return args.run(args)
    except UnsafeGenerationError as exc:
        _report(exc)
        return EXIT_UNSAFE
    except (SafeguardError, CommandLineError, OSError) as exc:
        _report(exc)
        return EXIT_USAGE


def _report(error: Exception) -> None:
    print(f"safeguard: error: {error}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The `safeguard` parser; each subcommand sets `run`, the function that carries it out."""
    parser = argparse.ArgumentParser(
        prog="safeguard",
        description="Almost-surely-safe generation from local Hugging Face models "
        "(InferenceGuard, arXiv 2502.01208).",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(subcommands)
    return parser


# ------------------------------------------------------------------------- generate
def _add_generate(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "generate",
        help="generate one response within a safety budget",
        description="Generate one response with InferenceGuard and print it with its "
        "safety record. Give at least one cost: several are added up.",
    )
    parser.set_defaults(run=run_generate)

    model = parser.add_argument_group("base model")
    model.add_argument(
        "--model", required=True, metavar="NAME_OR_PATH", help="causal LM: hub name or local path"
    )
    model.add_argument(
        "--device",
        type=_device,
        default=None,
        help="device of every model (default: cuda when available, else cpu)",
    )
    model.add_argument(
        "--dtype",
        choices=_DTYPES,
        default=None,
        help="dtype of every model (default: bfloat16 on CUDA and float32 on CPU for the "
        "base model; the checkpoint's own for cost and reward models)",
    )
    model.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run code shipped with the checkpoints; only for authors you trust",
    )

    prompt = parser.add_argument_group("prompt")
    prompt.add_argument(
        "--prompt", required=True, metavar="TEXT", help="the prompt; '-' reads it from stdin"
    )
    prompt.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as one user message through the chat template "
        "(default: plain text, used as is)",
    )

    scorers = parser.add_argument_group("cost and reward (at least one cost)")
    scorers.add_argument(
        "--cost-keywords",
        type=_keyword_cost,
        metavar="WORD[,WORD...]",
        help="cost 1 per occurrence of these words (case-insensitive, whole words)",
    )
    scorers.add_argument(
        "--cost-regex",
        type=_regex_cost,
        action="append",
        metavar="PATTERN",
        help="cost 1 per match of this regular expression (case-insensitive); repeatable",
    )
    scorers.add_argument(
        "--cost-model",
        metavar="PATH",
        help="sequence-classification cost model (higher = more unsafe), e.g. Beaver-style",
    )
    scorers.add_argument(
        "--cost-template",
        metavar="TEMPLATE",
        help="input format of --cost-model with {response} and optionally {prompt} "
        "(default: its chat template, else '{prompt}\\n\\n{response}')",
    )
    scorers.add_argument(
        "--guard-model",
        metavar="PATH",
        help="guard LLM (Llama-Guard style); the cost is its P(unsafe)",
    )
    scorers.add_argument(
        "--reward-model",
        metavar="PATH",
        help="sequence-classification reward model (default: rank candidates by likelihood)",
    )

    search = parser.add_argument_group("search settings (default: GuardConfig's)")
    for name, field in GuardConfig.model_fields.items():
        _add_config_option(search, name, field)

    output = parser.add_argument_group("output")
    output.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, safety record, finish_reason, stats) instead",
    )


def run_generate(args: argparse.Namespace) -> int:
    """`safeguard generate`: load, generate, print. Settings are checked before any load."""
    prompt = _read_prompt(args.prompt, chat=args.chat)
    config = _guard_config(args)
    if args.cost_template is not None and args.cost_model is None:
        raise CommandLineError(
            "--cost-template formats the input of --cost-model; add --cost-model"
        )
    if not (args.cost_keywords or args.cost_regex or args.cost_model or args.guard_model):
        raise CommandLineError(
            "generate needs a cost: pass --cost-keywords, --cost-regex, --cost-model or "
            "--guard-model (several are added up)"
        )

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load = {"device": device, "dtype": args.dtype, "trust_remote_code": args.trust_remote_code}
    costs: list[Scorer | None] = [args.cost_keywords, *(args.cost_regex or [])]
    if args.cost_model is not None:
        template = {} if args.cost_template is None else {"template": args.cost_template}
        with _loading("--cost-model", args.cost_model):
            costs.append(ClassifierScorer.from_pretrained(args.cost_model, **load, **template))
    if args.guard_model is not None:
        with _loading("--guard-model", args.guard_model):
            costs.append(GuardModelCost.from_pretrained(args.guard_model, **load))
    reward = None
    if args.reward_model is not None:
        with _loading("--reward-model", args.reward_model):
            reward = ClassifierScorer.from_pretrained(args.reward_model, **load)
    with _loading("--model", args.model):
        guard = InferenceGuard.from_pretrained(
            args.model, cost=_sum_of(costs), reward=reward, config=config, **load
        )

    result = guard.generate(prompt)
    print(_as_json(result) if args.json else _as_text(result))
    return 0


def _read_prompt(value: str, *, chat: bool) -> PromptInput:
    # A shell pipe ends the text with a newline that is not part of the prompt.
    text = sys.stdin.read().rstrip("\n") if value == "-" else value
    return [{"role": "user", "content": text}] if chat else text


@contextlib.contextmanager
def _loading(flag: str, path: str) -> Iterator[None]:
    """Report a model that cannot be loaded (missing path, wrong kind of checkpoint,
    bad scorer option) as a command-line error that names the flag."""
    try:
        yield
    except (OSError, ValueError) as exc:
        # transformers reports a mistyped local path as a malformed hub name; say both.
        where = "" if os.path.exists(path) else "no such local path, and as a hub name: "
        raise CommandLineError(f"cannot load {flag} {path!r}: {where}{exc}") from exc


class _SumOfCosts(Scorer):
    """Cost = the sum of several costs, each scored on the whole batch."""

    def __init__(self, costs: Sequence[Scorer]) -> None:
        self.costs = tuple(costs)

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` summed costs."""
        return torch.stack([cost(prompts, responses) for cost in self.costs]).sum(dim=0)


def _sum_of(costs: Sequence[Scorer | None]) -> Scorer:
    given = [cost for cost in costs if cost is not None]
    return given[0] if len(given) == 1 else _SumOfCosts(given)


# ------------------------------------------------------------------ argument types
def _device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; try cpu, cuda, cuda:1 or mps") from exc


def _keyword_cost(text: str) -> KeywordCost:
    words = [word.strip() for word in text.split(",")]
    if not all(words):
        raise argparse.ArgumentTypeError(
            f"empty word in {text!r}; separate words by single commas, e.g. bomb,poison"
        )
    return KeywordCost(words)


def _regex_cost(pattern: str) -> RegexCost:
    try:
        return RegexCost(pattern)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# ----------------------------------------------------------- GuardConfig as flags
def _add_config_option(group: argparse._ArgumentGroup, name: str, field: FieldInfo) -> None:
    """Add `--field-name` for one `GuardConfig` field; its default None means "not given"."""
    flag = "--" + name.replace("_", "-")
    value_type, choices, repeatable = _option_type(name, field.annotation)
    help_text = (field.description or "").replace("%", "%%")
    if field.default not in (None, ()):
        help_text += f" (default: {field.default})"
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
        "teach core.cli._option_type about it"
    )


def _guard_config(args: argparse.Namespace) -> GuardConfig:
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


# ------------------------------------------------------------------------- output
def _record(result: GuardResult) -> dict[str, Any]:
    """Safety record, finish reason and stats of `result`, in that order."""
    return {
        **result.safety_record(),
        "finish_reason": result.finish_reason,
        **dataclasses.asdict(result.stats),
    }


def _as_text(result: GuardResult) -> str:
    """The response, a blank line, then the record as aligned `name  value` lines."""
    record = _record(result)
    width = max(map(len, record))
    lines = [f"{name:<{width}}  {_format_value(value)}" for name, value in record.items()]
    return "\n".join([result.text, "", *lines])


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _as_json(result: GuardResult) -> str:
    """One JSON object: the text, the safety record and finish reason, and `stats`."""
    return json.dumps(
        {
            "text": result.text,
            **result.safety_record(),
            "finish_reason": result.finish_reason,
            "stats": dataclasses.asdict(result.stats),
        }
    )


if __name__ == "__main__":
    sys.exit(main())
