"""Scorers built from scorers: a weighted sum and a weighted maximum.

Programmatic constraints (`inference_safeguard.programmatic`), the provenance veto,
keyword and regex costs and model costs (`GuardModelCost`, `ClassifierScorer`) are all
`Scorer`s, so one cost can hold several of them: `ScorerSum([(guard, 10.0),
(LengthCost(max_length=80), 0.1)])`. Each part scores the whole batch in one call. A
composite is a `ConstraintScorer`: its `score_complete` asks each part for its finished
score where the part tells prefixes from finished responses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from inference_safeguard.programmatic import ConstraintScorer, score_complete
from inference_safeguard.scorers import Scorer

__all__ = ["ScorerMax", "ScorerSum"]

_Term = Scorer | tuple[Scorer, float]


def _weighted_terms(
    terms: Sequence[_Term], owner: str, *, signed: bool
) -> tuple[tuple[Scorer, float], ...]:
    if isinstance(terms, (str, Scorer)) or not isinstance(terms, Sequence) or not terms:
        raise TypeError(
            f"{owner} needs a non-empty list of scorers or (scorer, weight) pairs, e.g. "
            f"{owner}([(KeywordCost(['x']), 1.0), (LengthCost(max_length=50), 0.1)])."
        )
    weighted = []
    for index, term in enumerate(terms):
        scorer, weight = term if isinstance(term, tuple) else (term, 1.0)
        if not isinstance(scorer, Scorer):
            raise TypeError(
                f"{owner}: term {index} is a {type(scorer).__name__}, not a Scorer; wrap a "
                "function in CallableScorer."
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"{owner}: the weight of term {index} must be a number.")
        if not math.isfinite(weight) or (not signed and weight < 0):
            floor = "" if signed else " and >= 0"
            raise ValueError(
                f"{owner}: the weight of term {index} must be finite{floor}, got {weight!r}."
            )
        weighted.append((scorer, float(weight)))
    return tuple(weighted)


class ScorerSum(ConstraintScorer):
    """Score = sum over terms of `weight * scorer(prompts, responses)`.

    Weights may be negative (a reward minus a cost); a sum used as a cost should keep
    them >= 0, so that it stays a lower bound of the finished cost on every prefix.

    Args:
        terms: scorers (weight 1) or `(scorer, weight)` pairs.
    """

    def __init__(self, terms: Sequence[_Term]) -> None:
        self.terms = _weighted_terms(terms, "ScorerSum", signed=True)

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` weighted sums."""
        return sum(
            (w * scorer(prompts, responses) for scorer, w in self.terms),
            torch.zeros(len(prompts), dtype=torch.float64),
        )

    def _score_complete(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` weighted sums of the parts' finished scores."""
        return sum(
            (w * score_complete(scorer, prompts, responses) for scorer, w in self.terms),
            torch.zeros(len(prompts), dtype=torch.float64),
        )


class ScorerMax(ConstraintScorer):
    """Score = max over terms of `weight * scorer(prompts, responses)`: the worst
    violation decides (costs on different scales brought together by their weights).

    Args:
        terms: scorers (weight 1) or `(scorer, weight)` pairs, weights >= 0.
    """

    def __init__(self, terms: Sequence[_Term]) -> None:
        self.terms = _weighted_terms(terms, "ScorerMax", signed=False)

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` weighted maxima."""
        scores = [w * scorer(prompts, responses) for scorer, w in self.terms]
        return torch.stack(scores).amax(dim=0)

    def _score_complete(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` weighted maxima of the parts' finished scores."""
        scores = [w * score_complete(scorer, prompts, responses) for scorer, w in self.terms]
        return torch.stack(scores).amax(dim=0)
