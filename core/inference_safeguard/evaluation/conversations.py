"""Multi-turn evaluation: scripted conversations with the session budget off and on.

A policy whose risk is cumulative (a conversation that names product after product,
each answer within its own budget) is broken by conversations, not by answers. Each
scripted conversation is answered turn by turn (each turn sees the answers before it)
twice by the same guard: per answer only, and with a `SafetySession` per conversation.
Per mode and per constraint the report gives the share of conversations whose answers
together stay within the session budget, the mean cost a conversation spends, and the
answers given and refused; with an oracle, the share of unsafe answers.

The demo world's conversations (`demo_conversations`): one per topic, its test-split
prompts in order as the user's turns, cut to `max_turns`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from inference_safeguard.decoder import Decoder
from inference_safeguard.results import GuardResult
from inference_safeguard.session import SafetySession

Oracle = Callable[[str, str], bool]


@dataclass(frozen=True)
class Conversation:
    """A scripted conversation: a name and the user's turns, in order."""

    name: str
    turns: tuple[str, ...]


@dataclass(frozen=True)
class ModeSummary:
    """One mode's figures over every conversation.

    Attributes:
        mode: "per answer" or "session".
        conversations: conversations run.
        answers, refused: turns answered, turns refused (by the search or the session).
        within_session: per constraint with a session budget, the share of conversations
            whose answers' costs sum to at most that budget.
        mean_spent: per constraint, the mean summed cost of a conversation's answers.
        oracle_unsafe: the share of answers the oracle finds unsafe (None without one).
    """

    mode: str
    conversations: int
    answers: int
    refused: int
    within_session: dict[str, float]
    mean_spent: dict[str, float]
    oracle_unsafe: float | None


@dataclass(frozen=True)
class ConversationReport:
    """Both modes' summaries and every result, by conversation and turn."""

    session_budgets: dict[str, float]
    summaries: list[ModeSummary]
    results: dict[str, list[list[GuardResult]]]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data (summaries and per-turn safety records)."""
        return {
            "session_budgets": self.session_budgets,
            "summaries": [vars(summary) for summary in self.summaries],
            "turns": {
                mode: [[r.safety_record() | {"text": r.text} for r in turns] for turns in runs]
                for mode, runs in self.results.items()
            },
        }


def demo_conversations(
    prompt_texts: Sequence[str], topics: Sequence[str], max_turns: int = 6
) -> list[Conversation]:
    """One conversation per topic: its prompts (`prompt_texts[i]` of `topics[i]`) in order."""
    by_topic: dict[str, list[str]] = {}
    for text, topic in zip(prompt_texts, topics, strict=True):
        by_topic.setdefault(topic, []).append(text)
    return [
        Conversation(topic, tuple(turns[:max_turns]))
        for topic, turns in by_topic.items()
        if len(turns) > 1
    ]


def evaluate_conversations(
    guard: Decoder,
    conversations: Sequence[Conversation],
    session_budgets: Mapping[str, float],
    *,
    oracle: Oracle | None = None,
    progress: bool = True,
    **overrides: Any,
) -> ConversationReport:
    """Answer every conversation per answer and under a session; summarise both.

    Args:
        guard: the decoder (its constraints and their per-answer budgets).
        conversations: the scripted conversations.
        session_budgets: each conversation's total budget per constraint name.
        oracle: `is_unsafe(prompt, response)` on each answer's last user turn.
        progress: show a tqdm progress bar.
        **overrides: `GuardConfig` fields of every call (e.g. `seed`).

    Raises:
        ConstraintError: `session_budgets` names a constraint the guard lacks, or is empty.
    """
    SafetySession(session_budgets)  # checks the budgets before any decoding
    results: dict[str, list[list[GuardResult]]] = {"per answer": [], "session": []}
    turns = sum(len(c.turns) for c in conversations)
    with tqdm(total=2 * turns, unit="turn", disable=not progress) as bar:
        for mode in results:
            bar.set_description(mode)
            for conversation in conversations:
                session = SafetySession(session_budgets) if mode == "session" else None
                results[mode].append(_converse(guard, conversation, session, overrides))
                bar.update(len(conversation.turns))
    summaries = [
        _summary(mode, runs, conversations, session_budgets, oracle)
        for mode, runs in results.items()
    ]
    return ConversationReport(dict(session_budgets), summaries, results)


def _converse(
    guard: Decoder,
    conversation: Conversation,
    session: SafetySession | None,
    overrides: Mapping[str, Any],
) -> list[GuardResult]:
    history: list[dict[str, str]] = []
    answers = []
    for turn in conversation.turns:
        history.append({"role": "user", "content": turn})
        result = guard.generate(list(history), session=session, **overrides)
        history.append({"role": "assistant", "content": result.text})
        answers.append(result)
    return answers


def _summary(
    mode: str,
    runs: list[list[GuardResult]],
    conversations: Sequence[Conversation],
    session_budgets: Mapping[str, float],
    oracle: Oracle | None,
) -> ModeSummary:
    spent: dict[str, list[float]] = {}
    for answers in runs:
        totals: dict[str, float] = {}
        for result in answers:
            if result.refused:
                continue  # never said
            for outcome in result.constraints:
                totals[outcome.name] = totals.get(outcome.name, 0.0) + max(outcome.cost, 0.0)
        for name in {o.name for r in answers for o in r.constraints}:
            spent.setdefault(name, []).append(totals.get(name, 0.0))
    flat = [r for answers in runs for r in answers]
    unsafe = None
    if oracle is not None:
        pairs = [
            (turn, result)
            for conversation, answers in zip(conversations, runs, strict=True)
            for turn, result in zip(conversation.turns, answers, strict=True)
        ]
        unsafe = sum(bool(oracle(turn, r.text)) for turn, r in pairs) / max(len(pairs), 1)
    return ModeSummary(
        mode=mode,
        conversations=len(runs),
        answers=sum(not r.refused for r in flat),
        refused=sum(r.refused for r in flat),
        within_session={
            name: sum(total <= budget for total in spent.get(name, [])) / max(len(runs), 1)
            for name, budget in session_budgets.items()
        },
        mean_spent={name: sum(v) / max(len(v), 1) for name, v in spent.items()},
        oracle_unsafe=unsafe,
    )


def format_conversation_table(report: ConversationReport) -> str:
    """The summaries as aligned plain text, one row per mode."""
    names = list(report.session_budgets)
    spent_names = sorted({n for s in report.summaries for n in s.mean_spent})
    header = ["mode", "conversations", "answered", "refused"]
    header += [f"within session {n} ({report.session_budgets[n]:g})" for n in names]
    header += [f"mean spent {n}" for n in spent_names]
    header += ["oracle unsafe"]
    rows = [header]
    for s in report.summaries:
        row = [s.mode, str(s.conversations), str(s.answers), str(s.refused)]
        row += [f"{s.within_session[n]:.0%}" for n in names]
        row += [f"{s.mean_spent.get(n, 0.0):.3g}" for n in spent_names]
        row += ["-" if s.oracle_unsafe is None else f"{s.oracle_unsafe:.0%}"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def write_conversation_json(report: ConversationReport, path: Path) -> None:
    """Write `report.to_dict()` as JSON."""
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
