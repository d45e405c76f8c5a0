"""Watching a guard's searches from a test: each search's model forwards, whether it
has ended, and whether its decode state (the KV cache) is still alive.

A search's forwards are counted in the thread that drives it, while it runs, so the
counts of concurrent searches stay apart. A tracker can also pause every search before
a given forward until the search is cancelled, so that a test leaves a stream at a
known point and can then count what the search did after it was told to stop.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import pytest

from inference_safeguard import InferenceGuard

PAUSE_TIMEOUT = 3.0
"""Seconds a paused search waits for its cancellation before going on regardless."""


@dataclass
class SearchRecord:
    """What one search did.

    Attributes:
        forwards: base-model forwards so far (the prefill included).
        ended: set once the search's generator has finished or been closed.
        cancel: the cancel flag the search was given, if any.
        pause_at: the search waits before forward `pause_at + 1` until `cancel` is set.
        paused: set when the search reaches its pause.
        state: a weak reference to the search's decode state (set by the prefill).
    """

    cancel: threading.Event | None
    pause_at: int | None
    forwards: int = 0
    ended: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)
    state: weakref.ref[Any] | None = None

    @property
    def state_alive(self) -> bool:
        """Whether the search's decode state (its KV cache) is still referenced."""
        return self.state is not None and self.state() is not None


class SearchTracker:
    """Records every search `guard` runs (see the module docstring).

    Args:
        guard: the guard whose block search and base model to watch.
        monkeypatch: undoes the wrapping after the test.

    Attributes:
        searches: one record per search, in the order they started.
        pause_at: pause searches started from now on after this many forwards (None:
            never pause).
    """

    def __init__(self, guard: InferenceGuard, monkeypatch: pytest.MonkeyPatch) -> None:
        self.searches: list[SearchRecord] = []
        self.pause_at: int | None = None
        self._current = threading.local()
        run, forward, prefill = guard.search.run, guard.lm.model.forward, guard.lm.prefill

        def tracked_run(*args: Any, **kwargs: Any) -> Generator[Any, None, Any]:
            record = SearchRecord(cancel=kwargs.get("cancel"), pause_at=self.pause_at)
            self.searches.append(record)
            return self._steps(record, run(*args, **kwargs))

        def counted_forward(*args: Any, **kwargs: Any) -> Any:
            record = getattr(self._current, "record", None)
            if record is not None:
                if record.forwards == record.pause_at:
                    record.paused.set()
                    (record.cancel or threading.Event()).wait(PAUSE_TIMEOUT)
                record.forwards += 1
            return forward(*args, **kwargs)

        def watched_prefill(*args: Any, **kwargs: Any) -> Any:
            state = prefill(*args, **kwargs)
            record = getattr(self._current, "record", None)
            if record is not None:
                record.state = weakref.ref(state)
            return state

        monkeypatch.setattr(guard.search, "run", tracked_run)
        monkeypatch.setattr(guard.lm.model, "forward", counted_forward)
        monkeypatch.setattr(guard.lm, "prefill", watched_prefill)

    def _steps(self, record: SearchRecord, steps: Generator[Any, None, Any]) -> Generator:
        """`steps`, with `record` current in the driving thread while a step runs."""
        try:
            while True:
                self._current.record = record
                try:
                    value = next(steps)
                except StopIteration as finished:
                    return finished.value
                finally:
                    self._current.record = None
                yield value
        finally:
            steps.close()
            record.ended.set()

    @property
    def forwards(self) -> list[int]:
        """Each search's forwards so far."""
        return [record.forwards for record in self.searches]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """`wait_until` for async tests: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True
