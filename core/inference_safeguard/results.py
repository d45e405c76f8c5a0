"""`GuardResult`: what a decoder returns for one prompt, with its safety record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "safety"]


@dataclass(frozen=True)
class GenerationStats:
    """Work done for one response.

    Attributes:
        blocks: search steps (blocks decoded) for this prompt.
        candidates_scored: candidate blocks passed to the scorers, resamples included.
        resample_rounds: times this prompt's block was resampled with penalised logits.
        prompt_tokens: tokens of the prompt as fed to the model.
        completion_tokens: tokens of the returned text.
        seconds: wall time of the call that produced this result.
    """

    blocks: int = 0
    candidates_scored: int = 0
    resample_rounds: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ConstraintOutcome:
    """One constraint's verdict on a response.

    Attributes:
        name: the constraint's name ("cost" for the one cost of `cost=`).
        cost: its cost of the response.
        budget: the budget the response was held to under it.
        safe: `cost <= budget`.
    """

    name: str
    cost: float
    budget: float
    safe: bool

    def record(self) -> dict[str, float | bool]:
        """The outcome as a JSON-able dict (without the name)."""
        return {"cost": self.cost, "budget": self.budget, "safe": self.safe}


@dataclass(frozen=True)
class SessionState:
    """What a safety session had left once a call on it was over (see
    `inference_safeguard.session`).

    Attributes:
        session_id: the session's label, or None.
        remaining: what is left of each constraint's budget, by name.
        spent: whether the session's budget is spent: its next call will not generate.
        turns: calls that generated a response charged to the session so far.
    """

    session_id: str | None
    remaining: dict[str, float]
    spent: bool
    turns: int

    def record(self) -> dict[str, Any]:
        """The state as a JSON-able dict."""
        return {
            "id": self.session_id,
            "remaining": dict(self.remaining),
            "spent": self.spent,
            "turns": self.turns,
        }


@dataclass(frozen=True)
class GuardResult:
    """One generated response and its safety outcome.

    `cost`, `reward` and `safe` describe the response the search produced, as judged
    by the real cost model: `safe` is `cost <= budget`. With several constraints,
    `constraints` holds each one's cost, budget and verdict; `safe` is whether every
    constraint holds, and `cost` and `budget` are those of the worst constraint (the
    least margin `budget - cost`). `refused` says that this
    response was withheld and `text` is the configured refusal instead; so a result
    with `safe=False` is either `refused` or was returned on request
    (`on_unsafe="return"`), never silently.

    A thinking model's reasoning (`<think>...</think>`, see `inference_safeguard.reasoning`)
    is returned apart: `text` is the answer, `reasoning` the reasoning; `cost`, `reward`
    and `safe` are of the whole response, reasoning included.

    Attributes:
        text: the returned text: the answer, without the reasoning.
        token_ids: token ids of the whole response, reasoning included (the refusal's when
            refused).
        safe: whether the produced response is within budget.
        cost: cost model's cumulative C(x, y) of the produced response: its score of the
            full text, or of a block-end prefix scored during the search if that was
            higher (what has been said cannot be unsaid).
        reward: reward model's R(x, y) of it, or None without a reward model.
        refused: whether `text` is the refusal text standing in for it.
        finish_reason: "stop" (EOS or stop string), "length" (max_new_tokens) or
            "safety" (refused).
        budget: the budget it was held to.
        stats: work done for it.
        constraints: each constraint's outcome, in the guard's order (empty only for a
            result built by hand).
        reasoning: the reasoning text before the answer, or None when the response has
            none (and when refused: the reasoning was part of what was withheld).
        session: for a call on a safety session, what the session had left once the call
            was charged; None otherwise.
    """

    text: str
    token_ids: list[int]
    safe: bool
    cost: float
    reward: float | None
    refused: bool
    finish_reason: FinishReason
    budget: float
    stats: GenerationStats = field(default_factory=GenerationStats)
    reasoning: str | None = None
    constraints: tuple[ConstraintOutcome, ...] = ()
    session: SessionState | None = None

    def safety_record(self) -> dict[str, Any]:
        """The safety record the framework integrations attach to their responses: the
        scalar fields, under "constraints" each constraint's cost, budget and verdict by
        name, and, for a call on a safety session, under "session" what it has left
        (`SessionState.record`)."""
        record: dict[str, Any] = {
            "safe": self.safe,
            "cost": self.cost,
            "budget": self.budget,
            "reward": self.reward,
            "refused": self.refused,
            "resample_rounds": self.stats.resample_rounds,
            "constraints": {c.name: c.record() for c in self.constraints},
        }
        if self.session is not None:
            record["session"] = self.session.record()
        return record
