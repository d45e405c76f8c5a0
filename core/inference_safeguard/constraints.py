"""Named safety constraints: each a cost scorer with its own budget.

A guard holds one or more constraints. `cost=` (with `GuardConfig.budget`) is the
one-constraint case, named `DEFAULT_CONSTRAINT`; `costs={"violence": (scorer, budget),
...}` gives several. The search's cost and safety state then hold one column per
constraint, in the order given: `(rows, constraints)`, and a response is within budget
only when every column is.

The budgets of a call live in its `GuardConfig`: with one constraint in `budget`, with
several in `budgets` (every name, in constraint order, once the guard has resolved the
call's config; see `Constraints.resolve`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from inference_safeguard.config import GuardConfig
from inference_safeguard.errors import ConstraintError, MissingCostModelError
from inference_safeguard.programmatic import ConstraintScorer
from inference_safeguard.results import ConstraintOutcome
from inference_safeguard.scorers import Scorer

DEFAULT_CONSTRAINT = "cost"
"""Name of the one constraint given by `cost=`."""

CostsInput = Mapping[str, tuple[Scorer, float]]
"""`costs=`: constraint name -> (cost scorer, budget)."""


@dataclass(frozen=True)
class Constraint:
    """One named cost scorer with its default budget (None: `GuardConfig.budget`)."""

    name: str
    scorer: Scorer
    budget: float | None = None


class Constraints:
    """The ordered constraints of a decoder.

    Args:
        items: one or more constraints with distinct, non-empty names.

    Raises:
        ConstraintError: no constraint, a repeated or empty name, or a non-finite budget.
    """

    def __init__(self, items: Sequence[Constraint]) -> None:
        if not items:
            raise ConstraintError("give at least one constraint")
        names = [c.name for c in items]
        if len(set(names)) != len(names):
            raise ConstraintError(f"constraint names must be distinct, got {names}")
        for constraint in items:
            if not isinstance(constraint.name, str) or not constraint.name.strip():
                raise ConstraintError(
                    f"constraint names must be non-empty strings, got {constraint.name!r}"
                )
            if not isinstance(constraint.scorer, Scorer):
                raise TypeError(
                    f"the scorer of constraint {constraint.name!r} must be an "
                    "inference_safeguard.scorers.Scorer (e.g. KeywordCost, ClassifierScorer, or "
                    f"CallableScorer(fn)), got {type(constraint.scorer).__name__}"
                )
            budget = constraint.budget
            if budget is not None and (
                isinstance(budget, bool)
                or not isinstance(budget, (int, float))
                or not math.isfinite(budget)
            ):
                raise ConstraintError(
                    f"the budget of constraint {constraint.name!r} must be a finite number, "
                    f"got {budget!r}"
                )
        self.items = tuple(items)

    @classmethod
    def of(cls, owner: str, cost: Scorer | None, costs: CostsInput | None) -> Constraints:
        """The constraints of `owner` (a decoder's name) from its `cost=` or `costs=`.

        Raises:
            MissingCostModelError: neither was given.
            ConstraintError: both were given, or `costs` is malformed.
        """
        if cost is not None and costs is not None:
            raise ConstraintError(
                f"{owner} takes cost= (one constraint, budget in GuardConfig.budget) or "
                "costs={name: (scorer, budget)}, not both"
            )
        if costs is None:
            if cost is None:
                raise MissingCostModelError.of(owner)
            if not isinstance(cost, Scorer):
                raise TypeError(
                    "cost must be an inference_safeguard.scorers.Scorer (e.g. KeywordCost, "
                    "ClassifierScorer, "
                    f"or CallableScorer(fn) around a function), got {type(cost).__name__}"
                )
            return cls([Constraint(DEFAULT_CONSTRAINT, cost)])
        if not isinstance(costs, Mapping) or not costs:
            raise ConstraintError(
                "costs must be a non-empty mapping {name: (scorer, budget)}, e.g. "
                "costs={'violence': (KeywordCost(['kill']), 0.0)}"
            )
        items = []
        for name, entry in costs.items():
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise ConstraintError(
                    f"costs[{name!r}] must be a (scorer, budget) pair, got {entry!r}"
                )
            items.append(Constraint(name, entry[0], entry[1]))
        return cls(items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def names(self) -> tuple[str, ...]:
        """The constraints' names, in order."""
        return tuple(c.name for c in self.items)

    @property
    def single(self) -> Scorer | None:
        """The scorer when there is one constraint, else None."""
        return self.items[0].scorer if len(self.items) == 1 else None

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        finished: bool | Sequence[bool] = False,
    ) -> torch.Tensor:
        """`(batch, constraints)` float64 CPU costs of each pair under each constraint.

        Args:
            prompts, responses: the pairs, `batch` of each.
            finished: whether each response is finished (one flag for all, or one per
                pair). A finished response gets its scorers' finished cost
                (`programmatic.score_complete`: a length under the minimum, a required
                word missing), the others their prefix cost. A scorer that does not tell
                the two apart scores all pairs in one call; one that does, in at most two
                (the finished pairs and the rest).
        """
        flags = [finished] * len(responses) if isinstance(finished, bool) else list(finished)
        if len(flags) != len(responses):
            raise ValueError(f"finished has {len(flags)} flags for {len(responses)} responses")
        columns = [_column(c.scorer, prompts, responses, flags) for c in self.items]
        return torch.stack(columns, dim=-1)

    # -------------------------------------------------------------- budgets
    def configure(self, config: GuardConfig) -> GuardConfig:
        """A decoder's default `config` with the constraints' own budgets (from `costs=`)
        wherever `config.budgets` does not name them, resolved (see `resolve`)."""
        given = dict(config.budgets or {})
        own = {c.name: c.budget for c in self.items if c.budget is not None}
        if not own:
            return self.resolve(config)
        return self.resolve(config.with_overrides(budgets={**own, **given}))

    def resolve(self, config: GuardConfig) -> GuardConfig:
        """`config` with its budgets in the form the search reads (see the module).

        One constraint: a `budgets` entry for it moves into `budget`. Several: `budgets`
        holds every constraint's budget, in constraint order; one it does not name takes
        the constraint's own budget (`GuardConfig.budget` for one without).

        Raises:
            ConstraintError: `budgets` names a constraint the decoder does not have.
        """
        given = config.budgets or {}
        unknown = sorted(set(given) - set(self.names))
        if unknown:
            raise ConstraintError(
                f"budgets names {unknown}, which are not constraints of this guard; its "
                f"constraints are {list(self.names)}"
            )
        if len(self.items) == 1:
            if config.budgets is None:
                return config
            name = self.items[0].name
            return config.with_overrides(budget=given.get(name, config.budget), budgets=None)
        resolved = {
            c.name: float(given.get(c.name, config.budget if c.budget is None else c.budget))
            for c in self.items
        }
        if config.budgets is not None and list(config.budgets.items()) == list(resolved.items()):
            return config
        return config.with_overrides(budgets=resolved)

    def call_overrides(self, defaults: GuardConfig, overrides: Mapping[str, Any]) -> dict:
        """`overrides` of one call with a partial `budgets` merged into the defaults'.

        Raises:
            ConstraintError: a call to a guard with several constraints sets `budget`,
                which would be ambiguous.
        """
        merged = dict(overrides)
        if len(self.items) > 1 and "budget" in merged:
            raise ConstraintError(
                f"this guard has several constraints {list(self.names)}: set their budgets "
                "with budgets={name: value}, not budget="
            )
        if merged.get("budgets") is not None and defaults.budgets is not None:
            given = merged["budgets"]
            if not isinstance(given, Mapping):
                return merged  # GuardConfig's validation says what is wrong
            merged["budgets"] = {**defaults.budgets, **given}
        return merged

    def outcomes(
        self, costs: Sequence[float], config: GuardConfig
    ) -> tuple[ConstraintOutcome, ...]:
        """Each constraint's verdict on a response with these `costs` (one per constraint)."""
        return tuple(
            ConstraintOutcome(c.name, cost, budget, cost <= budget)
            for c, cost, budget in zip(self.items, costs, budget_vector(config), strict=True)
        )


def _column(
    scorer: Scorer, prompts: Sequence[str], responses: Sequence[str], finished: list[bool]
) -> torch.Tensor:
    """`(batch,)` float64 CPU costs of one scorer: finished cost where `finished`, prefix
    cost elsewhere."""
    if not isinstance(scorer, ConstraintScorer) or not any(finished):
        return scorer(prompts, responses).to(torch.float64).cpu()
    if all(finished):
        return scorer.score_complete(prompts, responses).to(torch.float64).cpu()
    done = [i for i, flag in enumerate(finished) if flag]
    going = [i for i, flag in enumerate(finished) if not flag]
    column = torch.empty(len(responses), dtype=torch.float64)
    column[done] = (
        scorer.score_complete([prompts[i] for i in done], [responses[i] for i in done])
        .to(torch.float64)
        .cpu()
    )
    column[going] = (
        scorer([prompts[i] for i in going], [responses[i] for i in going]).to(torch.float64).cpu()
    )
    return column


def budget_vector(config: GuardConfig) -> list[float]:
    """The budget of each constraint of a resolved config, in constraint order."""
    if config.budgets is None:
        return [config.budget]
    return list(config.budgets.values())


def worst(outcomes: Sequence[ConstraintOutcome]) -> ConstraintOutcome:
    """The outcome with the least margin `budget - cost` (the first on ties)."""
    return min(outcomes, key=lambda o: o.budget - o.cost)
