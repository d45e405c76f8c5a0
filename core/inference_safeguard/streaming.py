"""Streams of committed text that hand back their `GuardResult` when they end.

`decoder.stream(...)` returns a `GuardStream`: iterate it for the text deltas, then read
`stream.result`. `decoder.astream(...)` returns an `AsyncGuardStream`, which computes
each delta of the same stream in a worker thread so that the event loop keeps going.
Each stream owns its result, so concurrent streams on one decoder never mix them up.

A stream's search advances only while a delta is being asked for: a stream nobody
reads costs no compute and holds no thread. Leaving one (closing it, leaving its
`with` block, cancelling the task awaiting a delta, or dropping it) stops its search
within one decoded token and frees the search's memory (see `cancellation`).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Generator, Iterator
from types import TracebackType

from inference_safeguard.cancellation import cancelled_error, run_in_worker
from inference_safeguard.errors import GenerationCancelledError
from inference_safeguard.results import GuardResult


class GuardStream(Iterator[str]):
    """Text deltas of one response; `result` is set once the last delta is out.

    `close()`, or leaving a `with guard.stream(...) as stream:` block, stops the stream
    for good, from any thread. A stream dropped before its end is closed by the garbage
    collector. After `close()`, iteration just ends (and `result` stays None); a
    `next()` running in another thread at that moment raises `GenerationCancelledError`
    within one decoded token.

    Args:
        deltas: a generator that yields the deltas and returns the result, and stops
            with `GenerationCancelledError` soon after `cancel` is set.
        cancel: the flag the generator's search checks; `close()` sets it.
    """

    def __init__(
        self,
        deltas: Generator[str, None, GuardResult],
        cancel: threading.Event | None = None,
    ) -> None:
        self._deltas = deltas
        self._cancel = cancel if cancel is not None else threading.Event()
        self._running = threading.Lock()
        self.result: GuardResult | None = None

    def __iter__(self) -> GuardStream:
        return self

    def __next__(self) -> str:
        with self._running:
            if self._cancel.is_set():
                self._deltas.close()
                raise StopIteration
            try:
                return next(self._deltas)
            except StopIteration as finished:
                self.result = finished.value
                raise StopIteration from None
            except GenerationCancelledError:
                pass
            finally:
                if self._cancel.is_set():  # closed meanwhile: free the search now
                    self._deltas.close()
        raise cancelled_error()

    def close(self) -> None:
        """Stop the stream: its search ends within one decoded token and its memory is
        freed. Safe to call from any thread, more than once; never blocks."""
        self._cancel.set()
        # A `next()` running in another thread stops at the flag and closes the
        # generator itself on its way out.
        if self._running.acquire(blocking=False):
            try:
                self._deltas.close()
            finally:
                self._running.release()

    def __enter__(self) -> GuardStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncGuardStream(AsyncIterator[str]):
    """A `GuardStream` read from async code: each delta is computed in a worker thread
    while the event loop keeps running.

    Cancelling the task that awaits a delta (or `asyncio.wait_for` timing out) stops
    the search within one decoded token, and the cancellation completes once it has
    stopped. `aclose()`, or leaving an `async with guard.astream(...) as stream:`
    block, closes the stream; one dropped before its end is closed by the garbage
    collector. Between deltas no thread is held, so an abandoned stream never delays
    other calls.
    """

    def __init__(self, stream: GuardStream) -> None:
        self._stream = stream

    @property
    def result(self) -> GuardResult | None:
        """The response's result, once the stream has ended."""
        return self._stream.result

    def __aiter__(self) -> AsyncGuardStream:
        return self

    async def __anext__(self) -> str:
        delta = await run_in_worker(self._next_delta, self._stream.close)
        if delta is None:
            raise StopAsyncIteration
        return delta

    def _next_delta(self) -> str | None:
        return next(self._stream, None)

    async def aclose(self) -> None:
        """Stop the stream (see `GuardStream.close`)."""
        self._stream.close()

    async def __aenter__(self) -> AsyncGuardStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
