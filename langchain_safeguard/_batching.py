"""One search for a whole batch, although LangChain calls a chat model once per input.

`BaseChatModel.batch` runs `invoke` for each input in its own thread (and `generate`
loops over its message lists), so the per-input calls never see each other. The
model registers a batch's calls in a `BatchPlan` before handing it to LangChain; the
first call to claim its input decodes every registered input in one
`generate_batch`, and the others pick up their results. A call that finds no plan,
or no unclaimed input equal to its own, decodes alone, so a plan can only save work,
never change an answer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar

from inference_safeguard.results import GuardResult

_ACTIVE: ContextVar[BatchPlan | None] = ContextVar("safeguard_batch_plan", default=None)


class BatchPlan:
    """The calls of one batch and, once the first of them asks, their results.

    Args:
        owner: the model whose calls these are; calls of other models never match.
        keys: one key per input, equal for equal calls (prompt and settings).
        run: decodes every input in one search; results in `keys` order.
    """

    def __init__(
        self, owner: object, keys: Sequence[Hashable], run: Callable[[], list[GuardResult]]
    ) -> None:
        self._owner = owner
        self._keys = list(keys)
        self._claimed = [False] * len(self._keys)
        self._run = run
        self._lock = threading.Lock()
        self._future: Future[list[GuardResult]] | None = None

    def claim(self, owner: object, key: Hashable) -> int | None:
        """Take the first unclaimed input equal to `key`; its index, or None."""
        if owner is not self._owner:
            return None
        with self._lock:
            for index, (planned, claimed) in enumerate(zip(self._keys, self._claimed, strict=True)):
                if not claimed and planned == key:
                    self._claimed[index] = True
                    return index
        return None

    def result(self, index: int) -> GuardResult | None:
        """Result `index`, running the batch if no call has yet; None if the batch failed
        (the caller then decodes its input alone, so that errors reach their own input)."""
        future, mine = self._start()
        if mine:
            self._complete(future)
        try:
            return future.result()[index]
        except Exception:
            return None

    async def aresult(self, index: int) -> GuardResult | None:
        """`result`, awaited without blocking the event loop."""
        future, mine = self._start()
        if mine:
            await asyncio.to_thread(self._complete, future)
        try:
            return (await asyncio.wrap_future(future))[index]
        except Exception:
            return None

    def _start(self) -> tuple[Future[list[GuardResult]], bool]:
        with self._lock:
            if self._future is None:
                self._future = Future()
                return self._future, True
            return self._future, False

    def _complete(self, future: Future[list[GuardResult]]) -> None:
        try:
            future.set_result(self._run())
        except BaseException as error:  # every waiting call must wake up, whatever happened
            future.set_exception(error)


def active_plan() -> BatchPlan | None:
    """The plan of the batch being run in this context, if any."""
    return _ACTIVE.get()


@contextmanager
def planned(plan: BatchPlan | None) -> Iterator[None]:
    """Make `plan` the active plan in this context (and in threads and tasks started
    from it) for the duration of the block; None keeps the plan of an enclosing batch."""
    if plan is None:
        yield
        return
    token = _ACTIVE.set(plan)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
