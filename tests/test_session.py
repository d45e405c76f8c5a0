"""`SafetySession`: one budget per constraint across calls, refusing once it is spent."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from conftest import OTHER_PROMPT, PROMPT
from session_helpers import REFUSAL, answer_counting_guard, counted_forwards, says_anything

from inference_safeguard import (
    ConstraintError,
    GuardEngine,
    InferenceGuard,
    SafetySession,
    SessionBudgetSpentError,
    SessionStateError,
)
from inference_safeguard.scorers import KeywordCost


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer, small_config) -> InferenceGuard:
    return answer_counting_guard(tiny_model, tiny_tokenizer, small_config)


def test_each_answer_within_its_own_budget_is_stopped_by_the_session_budget(guard, tiny_model):
    alone = [guard.generate(PROMPT, seed=s) for s in range(4)]
    assert all(r.safe and not r.refused and r.cost == 1.0 for r in alone)

    session = SafetySession({"cost": 2.0})
    first, second = (guard.generate(PROMPT, seed=s, session=session) for s in range(2))
    assert (first.cost, second.cost) == (1.0, 1.0) and not first.refused
    assert second.budget == 1.0  # the second call was held to what the first left
    assert session.remaining() == {"cost": 0.0} and session.spent() == ["cost"]
    with counted_forwards(tiny_model) as forwards:
        third = guard.generate(PROMPT, seed=2, session=session)
    assert forwards[0] == 0  # refused without generating
    assert third.refused and third.text == guard.config.refusal_text
    assert third.finish_reason == "safety" and third.stats.blocks == 0
    assert third.constraints[0].budget == 0.0 and not third.constraints[0].safe
    assert session.turns == 2 and session.charged() == {"cost": 2.0}


def test_a_spent_session_raises_when_asked_to(guard):
    session = SafetySession({"cost": 1.0}, on_spent="raise")
    guard.generate(PROMPT, seed=0, session=session)
    with pytest.raises(SessionBudgetSpentError, match="spent for \\['cost'\\]") as caught:
        guard.generate(PROMPT, seed=1, session=session)
    assert caught.value.remaining == {"cost": 0.0}


def test_a_call_is_held_to_the_smaller_of_its_own_and_the_session_budget(guard):
    session = SafetySession({"cost": 10.0})
    result = guard.generate(PROMPT, seed=0, session=session, budget=0.5)
    # Within 0.5 only the empty answer fits: the search refuses, and nothing is charged.
    assert result.budget == 0.5
    assert result.refused or result.cost == 0.0
    assert session.remaining() == {"cost": 10.0}


def test_sessions_are_isolated(guard):
    spent, fresh = SafetySession({"cost": 1.0}), SafetySession({"cost": 1.0})
    guard.generate(PROMPT, seed=0, session=spent)
    assert spent.is_spent and not fresh.is_spent
    answer = guard.generate(PROMPT, seed=0, session=fresh)
    assert not answer.refused and fresh.remaining() == {"cost": 0.0}


def test_concurrent_calls_on_one_session_never_overspend(guard):
    session = SafetySession({"cost": 3.0})
    results = []
    lock = threading.Lock()

    def call(seed: int) -> None:
        result = guard.generate(OTHER_PROMPT, seed=seed, session=session)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=call, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    assert len(results) == 6
    answered = [r for r in results if not r.refused]
    assert len(answered) == 3 and sum(r.cost for r in answered) == 3.0
    assert session.remaining() == {"cost": 0.0} and session.turns == 3


def test_concurrent_charges_add_up_exactly():
    session = SafetySession({"a": 1000.0, "b": 1.0})

    def charge() -> None:
        for _ in range(500):
            session.charge({"a": 0.25, "b": 0.0})

    threads = [threading.Thread(target=charge) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert session.charged() == {"a": 1000.0, "b": 0.0}
    assert session.remaining() == {"a": 0.0, "b": 1.0}
    assert session.spent() == ["a"]


def test_a_session_survives_a_json_round_trip_and_continues(guard):
    session = SafetySession({"cost": 3.0}, session_id="conversation-7")
    guard.generate(PROMPT, seed=0, session=session)
    state = json.loads(json.dumps(session.to_dict()))
    restored = SafetySession.from_dict(state)
    assert restored.to_dict() == session.to_dict()
    assert restored.session_id == "conversation-7" and restored.turns == 1
    guard.generate(PROMPT, seed=1, session=restored)
    assert restored.remaining() == {"cost": 1.0} and session.remaining() == {"cost": 2.0}


@pytest.mark.parametrize(
    "change",
    [
        {"version": 99},
        {"remaining": {"other": 1.0}},
        {"charged": {"cost": float("inf")}},
        {"turns": -1},
        {"budgets": "lots"},
        {"on_spent": "explode"},
    ],
)
def test_a_malformed_session_state_is_rejected(change):
    state = {**SafetySession({"cost": 1.0}).to_dict(), **change}
    with pytest.raises(SessionStateError):
        SafetySession.from_dict(state)


def test_tool_results_can_be_charged_to_the_session(guard, tiny_model):
    session = SafetySession({"cost": 1.5})
    guard.generate(PROMPT, seed=0, session=session)
    assert session.charge_text(guard, "the tool found an address") == {"cost": -0.5}
    with counted_forwards(tiny_model) as forwards:
        assert guard.generate(PROMPT, seed=1, session=session).refused
    assert forwards[0] == 0


def test_a_session_tracks_the_constraints_it_names_among_several(
    tiny_model, tiny_tokenizer, small_config, frequent_words
):
    costs = {
        "any": (says_anything(), 5.0),
        "words": (KeywordCost(frequent_words), 0.0),
    }
    guard = InferenceGuard(
        tiny_model,
        tiny_tokenizer,
        costs=costs,
        config=small_config.with_overrides(max_new_tokens=8),
    )
    session = SafetySession({"any": 1.0})
    first = guard.generate(PROMPT, seed=0, session=session)
    assert [c.budget for c in first.constraints] == [1.0, 0.0]
    assert session.remaining() == {"any": 1.0 - first.constraints[0].cost}
    with pytest.raises(ConstraintError, match="not constraints of this guard"):
        guard.generate(PROMPT, session=SafetySession({"pii": 1.0}))


def test_bad_sessions_are_rejected_with_a_hint():
    with pytest.raises(ConstraintError, match=r"SafetySession\(\{'cost': 1.0\}\)"):
        SafetySession({})
    with pytest.raises(ConstraintError, match="finite"):
        SafetySession({"cost": float("nan")})
    with pytest.raises(ValueError, match="on_spent"):
        SafetySession({"cost": 1.0}, on_spent="ignore")  # type: ignore[arg-type]


def test_the_engine_and_async_calls_charge_the_session(guard):
    session = SafetySession({"cost": 2.0})
    with GuardEngine(guard) as engine:
        served = engine.generate(PROMPT, seed=0, session=session)
        awaited = asyncio.run(guard.agenerate(PROMPT, seed=1, session=session))
        withheld = asyncio.run(engine.agenerate(PROMPT, seed=2, session=session))
    assert served.token_ids == guard.generate(PROMPT, seed=0).token_ids
    assert not served.refused and not awaited.refused and withheld.refused
    assert session.charged() == {"cost": 2.0} and session.turns == 2


def test_a_stream_on_a_session_is_charged_before_its_text_is_shown(guard):
    session = SafetySession({"cost": 1.0})
    with guard.stream(PROMPT, seed=0, session=session) as stream:
        deltas = list(stream)
    assert stream.result is not None and deltas == [stream.result.text]
    assert session.charged() == {"cost": 1.0}
    refused = asyncio.run(_collect(guard.astream(PROMPT, seed=1, session=session)))
    assert refused == [REFUSAL]


async def _collect(stream) -> list[str]:
    return [delta async for delta in stream]
