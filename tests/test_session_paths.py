"""A safety session on every way of calling a decoder: batches charged in order, a spent
session refusing without generating, the state each result reports, and many threads."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from conftest import OTHER_PROMPT, PROMPT
from session_helpers import REFUSAL, answer_counting_guard, counted_forwards

from inference_safeguard import (
    GuardEngine,
    GuardResult,
    InferenceGuard,
    SafetySession,
    SessionBudgetSpentError,
)
from inference_safeguard.results import ConstraintOutcome


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer, small_config) -> InferenceGuard:
    return answer_counting_guard(tiny_model, tiny_tokenizer, small_config)


def test_a_batch_on_one_session_is_charged_prompt_by_prompt_in_order(guard, tiny_model):
    session = SafetySession({"cost": 2.0}, session_id="run-1")
    prompts = [PROMPT, OTHER_PROMPT, PROMPT, OTHER_PROMPT]
    results = guard.generate_batch(prompts, seed=0, session=session)
    assert [r.refused for r in results] == [False, False, True, True]
    assert [r.budget for r in results] == [2.0, 1.0, 0.0, 0.0]  # each from what was left
    # The first two are the answers the same calls made in turn would get.
    assert results[0].token_ids == guard.generate(PROMPT, seed=0).token_ids
    assert results[1].token_ids == guard.generate(OTHER_PROMPT, seed=0).token_ids
    assert [r.session.remaining["cost"] for r in results if r.session] == [1.0, 0.0, 0.0, 0.0]
    assert session.turns == 2 and session.charged() == {"cost": 2.0}


def test_an_async_batch_on_one_session_is_charged_in_order(guard):
    session = SafetySession({"cost": 1.0})
    results = asyncio.run(guard.agenerate_batch([PROMPT, OTHER_PROMPT], seed=0, session=session))
    assert [r.refused for r in results] == [False, True]
    assert session.charged() == {"cost": 1.0}


def _spent(guard: InferenceGuard, on_spent: Any = "refuse") -> SafetySession:
    session = SafetySession({"cost": 1.0}, on_spent=on_spent, session_id="spent")
    guard.generate(PROMPT, seed=0, session=session)
    assert session.is_spent
    return session


async def _collect(stream) -> list[str]:
    return [delta async for delta in stream]


def _every_path(guard: InferenceGuard, engine: GuardEngine) -> dict[str, Callable[..., Any]]:
    """Each way to make a call on `session`, returning its results as a list."""

    def streamed(runner: Any, session: SafetySession) -> list[GuardResult]:
        with runner.stream(PROMPT, seed=1, session=session) as stream:
            list(stream)
        assert stream.result is not None
        return [stream.result]

    def astreamed(runner: Any, session: SafetySession) -> list[GuardResult]:
        stream = runner.astream(PROMPT, seed=1, session=session)
        asyncio.run(_collect(stream))
        assert stream.result is not None
        return [stream.result]

    paths: dict[str, Callable[..., Any]] = {}
    for name, runner in (("decoder", guard), ("engine", engine)):
        paths.update(
            {
                f"{name}.generate": lambda s, r=runner: [r.generate(PROMPT, seed=1, session=s)],
                f"{name}.agenerate": lambda s, r=runner: [
                    asyncio.run(r.agenerate(PROMPT, seed=1, session=s))
                ],
                f"{name}.generate_batch": lambda s, r=runner: r.generate_batch(
                    [PROMPT, OTHER_PROMPT], seed=1, session=s
                ),
                f"{name}.agenerate_batch": lambda s, r=runner: asyncio.run(
                    r.agenerate_batch([PROMPT, OTHER_PROMPT], seed=1, session=s)
                ),
                f"{name}.stream": lambda s, r=runner: streamed(r, s),
                f"{name}.astream": lambda s, r=runner: astreamed(r, s),
            }
        )
    return paths


def test_a_spent_session_refuses_without_generating_on_every_path(guard, tiny_model):
    with GuardEngine(guard) as engine:
        for name, call in _every_path(guard, engine).items():
            session = _spent(guard)
            with counted_forwards(tiny_model) as forwards:
                results = call(session)
            assert forwards[0] == 0, name
            assert all(r.refused and r.text == REFUSAL for r in results), name
            assert all(r.session is not None and r.session.spent for r in results), name
            assert session.turns == 1 and session.charged() == {"cost": 1.0}, name


def test_a_spent_session_raises_without_generating_on_every_path(guard, tiny_model):
    with GuardEngine(guard) as engine:
        for name, call in _every_path(guard, engine).items():
            session = _spent(guard, on_spent="raise")
            with counted_forwards(tiny_model) as forwards, pytest.raises(SessionBudgetSpentError):
                call(session)
            assert forwards[0] == 0, name


def test_each_result_reports_what_its_session_has_left(guard):
    session = SafetySession({"cost": 3.0}, session_id="chat-7")
    first = guard.generate(PROMPT, seed=0, session=session)
    assert first.session is not None
    assert first.session.record() == {
        "id": "chat-7",
        "remaining": {"cost": 2.0},
        "spent": False,
        "turns": 1,
    }
    assert first.safety_record()["session"] == first.session.record()
    assert "session" not in guard.generate(PROMPT, seed=0).safety_record()
    assert guard.generate(PROMPT, seed=0).session is None


# ------------------------------------------------------------------ many threads
class _Recorder:
    """A stand-in call that charges a random cost within the budget it is handed and
    records how many calls of each session run at once."""

    def __init__(self, guard: InferenceGuard) -> None:
        self.guard = guard
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.most_at_once: dict[str, int] = {}

    def call(self, session: SafetySession, rng: random.Random) -> GuardResult:
        def generate(budgeted: dict[str, Any]) -> GuardResult:
            name = session.session_id or ""
            with self.lock:
                self.running[name] = self.running.get(name, 0) + 1
                self.most_at_once[name] = max(self.most_at_once.get(name, 0), self.running[name])
            budget = budgeted["budgets"]["cost"]
            cost = min(rng.choice([0.25, 0.5, 1.0]), budget)
            result = self.guard.withheld(self.guard.config, {"cost": budget}, [])
            result = replace(
                result,
                refused=False,
                safe=True,
                cost=cost,
                constraints=(ConstraintOutcome("cost", cost, budget, True),),
            )
            with self.lock:
                self.running[name] -= 1
            return result

        return session.run(self.guard, {}, generate)


def test_many_threads_on_two_sessions_add_up_exactly_and_stay_isolated(guard):
    budgets = {"a": 60.0, "b": 25.0}
    sessions = {name: SafetySession({"cost": b}, session_id=name) for name, b in budgets.items()}
    recorder = _Recorder(guard)
    returned: dict[str, list[GuardResult]] = {name: [] for name in sessions}
    lock = threading.Lock()

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            name = rng.choice(sorted(sessions))
            result = recorder.call(sessions[name], rng)
            with lock:
                returned[name].append(result)

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)

    for name, session in sessions.items():
        results = returned[name]
        answered = [r for r in results if not r.refused]
        assert sum(len(r) for r in returned.values()) == 16 * 40
        assert session.charged()["cost"] == pytest.approx(sum(r.cost for r in answered))
        assert session.charged()["cost"] <= budgets[name]  # never over budget
        assert session.remaining()["cost"] == pytest.approx(
            budgets[name] - sum(r.cost for r in answered)
        )
        assert session.turns == len(answered)
        assert recorder.most_at_once[name] == 1  # one call of a session at a time
        # Each state a result reports is its own session's, never the other's.
        assert all(r.session is not None and r.session.session_id == name for r in results)
    # Both budgets are used up, each by its own calls only.
    assert all(s.is_spent for s in sessions.values())
