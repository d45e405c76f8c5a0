"""`--constraint NAME BUDGET SCORER`: named constraints on the command line.

Repeatable; each gives one constraint of `InferenceGuard(costs=...)`. SCORER is one of
`keywords:WORD[,WORD...]`, `regex:PATTERN`, `model:PATH` (a sequence-classification cost
model), `guard-model:PATH` (a Llama-Guard style LLM), `world` (the demo world's cost
model, without `--model`), or a scorer written as its one-line spec
(`inference_safeguard.scorer_spec`):

- `length:max_words=N;min_words=N;weight=W` (`LengthCost.from_spec`),
- `required:words=W1,W2;weight=W` (`RequiredKeywordsCost.from_spec`),
- `shape-regex:PATTERN` and `json-schema:FILE` (`ShapeCost.regex`, `ShapeCost.json_schema`;
  the whole rest of the argument is the pattern, `;` included),
- `provenance:corpus=F1,F2;min_span=N;weight=W` (`ProvenanceCost.from_spec`),
- `constitution:judge=PATH;constitution=FILE;device=D;batch_size=N;calibration=C`
  (`ConstitutionCost.from_spec`).

The programmatic ones (length, required, shapes) are built when the arguments are
checked, so a bad spec fails before any model loads. The single-cost flags
(`--cost-keywords`, ...) and `--budget` are the one-constraint case and do not mix with it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

from inference_safeguard.cli_options import (
    CommandLineError,
    from_pretrained_options,
    loading,
    parse_keyword_cost,
    parse_regex_cost,
)
from inference_safeguard.constitution import ConstitutionCost
from inference_safeguard.errors import SafeguardError
from inference_safeguard.programmatic import LengthCost, RequiredKeywordsCost, ShapeCost
from inference_safeguard.provenance import ProvenanceCost
from inference_safeguard.scorers import ClassifierScorer, GuardModelCost, Scorer

SCORER_USAGE = (
    "keywords:W1,W2, regex:PATTERN, model:PATH, guard-model:PATH, world, "
    "length:max_words=N;min_words=N, required:words=W1,W2, shape-regex:PATTERN, "
    "json-schema:FILE, provenance:corpus=FILE;min_span=N or constitution:judge=PATH"
)


def _json_schema_cost(path: str) -> ShapeCost:
    """`ShapeCost.json_schema` of the schema in the file at `path`."""
    return ShapeCost.from_spec(f"json_schema={path}")


SPEC_BUILDERS: dict[str, Callable[[str], Scorer]] = {
    "length": LengthCost.from_spec,
    "required": RequiredKeywordsCost.from_spec,
    "shape-regex": ShapeCost.regex,
    "json-schema": _json_schema_cost,
}
"""Scorers built from the rest of the argument, cheaply: checked with the arguments."""

LOADED_KINDS = ("model", "guard-model", "provenance", "constitution")
"""Scorers that read files or load models: built when the constraints load."""

SCORER_KINDS = ("keywords", "regex", "world", *SPEC_BUILDERS, *LOADED_KINDS)


@dataclass(frozen=True)
class ConstraintSpec:
    """One `--constraint` as given: its name, budget, scorer kind and argument."""

    name: str
    budget: float
    kind: str
    value: str


def add_constraint_option(group: argparse._ArgumentGroup) -> None:
    """Add the repeatable `--constraint NAME BUDGET SCORER`."""
    group.add_argument(
        "--constraint",
        nargs=3,
        action="append",
        metavar=("NAME", "BUDGET", "SCORER"),
        help="a named constraint with its own budget; SCORER is keywords:W1,W2, "
        "regex:PATTERN, model:PATH, guard-model:PATH, world (the demo world's cost), "
        "length:max_words=N;min_words=N, required:words=W1,W2, shape-regex:PATTERN, "
        "json-schema:FILE, provenance:corpus=FILE[,FILE];min_span=N or "
        "constitution:judge=PATH[;constitution=FILE][;calibration=none]; repeatable; "
        "per-call budgets by "
        "name with --budgets '{\"NAME\": X}'",
    )


def constraint_specs(args: argparse.Namespace) -> list[ConstraintSpec]:
    """The `--constraint`s given, checked before anything loads (empty when none).

    Raises:
        CommandLineError: a malformed constraint, a repeated name, or single-cost flags
            or `--budget` given with it.
    """
    given = getattr(args, "constraint", None) or []
    specs = []
    for name, budget_text, scorer in given:
        try:
            budget = float(budget_text)
        except ValueError:
            budget = math.nan
        if not math.isfinite(budget):
            raise CommandLineError(
                f"--constraint {name}: the budget must be a finite number, got {budget_text!r}"
            )
        kind, _, value = scorer.partition(":")
        if kind not in SCORER_KINDS or (kind != "world") != bool(value):
            raise CommandLineError(
                f"--constraint {name}: SCORER must be one of {SCORER_USAGE}; got {scorer!r}"
            )
        spec = ConstraintSpec(name, budget, kind, value)
        if kind in SPEC_BUILDERS:
            _build(spec)  # a bad spec fails now, before anything loads
        specs.append(spec)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise CommandLineError(f"--constraint names must be distinct, got {names}")
    single = [
        flag
        for flag, dest in (
            ("--cost-keywords", "cost_keywords"),
            ("--cost-regex", "cost_regex"),
            ("--cost-model", "cost_model"),
            ("--guard-model", "guard_model"),
            ("--budget", "budget"),
        )
        if getattr(args, dest, None) is not None
    ]
    if specs and single:
        raise CommandLineError(
            f"{', '.join(single)} set the one cost and its budget; with --constraint give "
            "every cost as a --constraint (and budgets with --budgets)"
        )
    return specs


def load_constraints(
    specs: list[ConstraintSpec], args: argparse.Namespace, world_cost: Scorer | None = None
) -> dict[str, tuple[Scorer, float]]:
    """`costs=` of `InferenceGuard` from checked specs, loading the models they name.

    Raises:
        CommandLineError: `world` without the demo world, or a scorer that fails to build
            or load.
    """
    costs = {}
    for spec in specs:
        costs[spec.name] = (_scorer(spec, args, world_cost), spec.budget)
    return costs


def _scorer(spec: ConstraintSpec, args: argparse.Namespace, world_cost: Scorer | None) -> Scorer:
    flag = f"--constraint {spec.name}"
    if spec.kind == "world":
        if world_cost is None:
            raise CommandLineError(f"{flag}: 'world' is the demo world's cost; not with --model")
        return world_cost
    builders: dict[str, Callable[[str], Scorer]] = {
        "keywords": parse_keyword_cost,
        "regex": parse_regex_cost,
    }
    if spec.kind in builders:
        try:
            return builders[spec.kind](spec.value)
        except argparse.ArgumentTypeError as exc:
            raise CommandLineError(f"{flag}: {exc}") from exc
    if spec.kind in SPEC_BUILDERS or spec.kind in ("provenance", "constitution"):
        return _build(spec)
    load = from_pretrained_options(args)
    with loading(flag, spec.value):
        if spec.kind == "model":
            return ClassifierScorer.from_pretrained(spec.value, **load)
        return GuardModelCost.from_pretrained(spec.value, **load)


def _build(spec: ConstraintSpec) -> Scorer:
    """The scorer of a spec-written constraint (`SPEC_BUILDERS`, provenance, constitution).

    Raises:
        CommandLineError: the spec is malformed, names a missing file, or the judge fails
            to load; the message says how to write it.
    """
    flag = f"--constraint {spec.name} {spec.kind}:"
    if spec.kind == "provenance":
        build: Callable[[str], Scorer] = ProvenanceCost.from_spec
    elif spec.kind == "constitution":
        build = ConstitutionCost.from_spec
    else:
        build = SPEC_BUILDERS[spec.kind]
    try:
        return build(spec.value)
    except (SafeguardError, OSError, TypeError, ValueError) as exc:
        raise CommandLineError(f"{flag} {exc}") from exc
