"""Streams of committed text that hand back their `GuardResult` when they end.

`decoder.stream(...)` returns a `GuardStream`: iterate it for the text deltas, then read
`stream.result`. `decoder.astream(...)` returns an `AsyncGuardStream`, which runs the
same stream in a worker thread so that the event loop keeps going. Each stream owns
its result, so concurrent streams on one decoder never mix them up.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any

from inference_safeguard.results import GuardResult


class GuardStream(Iterator[str]):
    """Text deltas of one response; `result` is set once the last delta is out.

    Args:
        deltas: a generator that yields the deltas and returns the result.
    """

    def __init__(self, deltas: Generator[str, None, GuardResult]) -> None:
        self._deltas = deltas
        self.result: GuardResult | None = None

    def __iter__(self) -> GuardStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._deltas)
        except StopIteration as finished:
            self.result = finished.value
            raise StopIteration from None

    def close(self) -> None:
        """Stop early: the search ends after its current step."""
        self._deltas.close()


class AsyncGuardStream(AsyncIterator[str]):
    """A `GuardStream` driven from a worker thread; deltas arrive as they are committed.

    Leaving the loop early (or `aclose()`) stops the search after its current step.
    """

    def __init__(self, stream: GuardStream) -> None:
        self._stream = stream
        self._deltas = self._pump()

    @property
    def result(self) -> GuardResult | None:
        """The response's result, once the stream has ended."""
        return self._stream.result

    def __aiter__(self) -> AsyncGuardStream:
        return self

    async def __anext__(self) -> str:
        return await self._deltas.__anext__()

    async def aclose(self) -> None:
        await self._deltas.aclose()

    async def _pump(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def produce() -> None:
            try:
                for delta in self._stream:
                    if cancelled.is_set():
                        self._stream.close()
                        return
                    loop.call_soon_threadsafe(queue.put_nowait, ("delta", delta))
            except BaseException as error:  # handed to the consumer, never lost
                loop.call_soon_threadsafe(queue.put_nowait, ("error", error))
            else:
                loop.call_soon_threadsafe(queue.put_nowait, ("done", None))

        worker = loop.run_in_executor(None, produce)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "delta":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            cancelled.set()
            await worker
