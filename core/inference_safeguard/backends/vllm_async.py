"""Drive a vLLM `AsyncLLM` (alias `vllm.AsyncLLMEngine`) from synchronous code.

An `AsyncLLM` serves the requests of every coroutine that calls its `generate` from one
event loop, and batches them continuously in its engine core. The search samples a block
from a synchronous thread (the caller's, or a `GuardEngine`'s scheduler thread), so
`AsyncEngineDriver` submits each row's request to that event loop as its own `generate`
call and waits for all of them: the rows batch with whatever else the engine serves
(other guards sharing it, plain vLLM clients) and leave the batch as each finishes.

The event loop is the one the engine already runs in (pass it), else a daemon thread
of this module, one per engine, shared by every guard on that engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

from inference_safeguard.cancellation import cancelled_error

_POLL_SECONDS = 0.05
"""How often a waiting block checks its cancel event."""

_LOOPS: weakref.WeakKeyDictionary[Any, asyncio.AbstractEventLoop] = weakref.WeakKeyDictionary()
_LOOPS_LOCK = threading.Lock()


def _engine_loop(engine: Any) -> asyncio.AbstractEventLoop:
    """The background event loop of `engine`, started on first use (a daemon thread that
    ends when the engine is freed)."""
    with _LOOPS_LOCK:
        loop = _LOOPS.get(engine)
        if loop is None or loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="vllm-async-engine", daemon=True
            )
            thread.start()
            _LOOPS[engine] = loop
            weakref.finalize(engine, loop.call_soon_threadsafe, loop.stop)  # the thread ends
        return loop


class AsyncEngineDriver:
    """Run batches of `generate` requests on an `AsyncLLM` and wait for them.

    Args:
        engine: a `vllm.v1.engine.async_llm.AsyncLLM`.
        loop: the running event loop that `engine` serves in (e.g. a vLLM API server's);
            None: a background loop shared by every driver of `engine`.
    """

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.engine = engine
        self.loop = _engine_loop(engine) if loop is None else loop

    def generate(
        self,
        prompts: Sequence[Any],
        params: Sequence[Any],
        cancel: threading.Event | None = None,
    ) -> list[Any]:
        """The final `RequestOutput` of each (prompt, params) request, in order.

        Raises:
            RuntimeError: called from the engine's event loop thread (it would wait on
                itself); call it from another thread (e.g. `asyncio.to_thread`).
            GenerationCancelledError: `cancel` was set; the requests are aborted in the
                engine.
        """
        if not prompts:
            return []
        if _running_loop() is self.loop:
            raise RuntimeError(
                "a guard on an AsyncLLM samples blocks synchronously and cannot run in the "
                "engine's event loop; call it from another thread (asyncio.to_thread) or "
                "through a GuardEngine"
            )
        future = asyncio.run_coroutine_threadsafe(self._gather(prompts, params), self.loop)
        while True:
            try:
                return future.result(timeout=_POLL_SECONDS if cancel is not None else None)
            except concurrent.futures.TimeoutError:
                if cancel is not None and cancel.is_set():
                    future.cancel()  # cancels each generate call, which aborts its request
                    raise cancelled_error() from None

    async def _gather(self, prompts: Sequence[Any], params: Sequence[Any]) -> list[Any]:
        batch = uuid.uuid4().hex
        return list(
            await asyncio.gather(
                *(
                    self._final(prompt, param, f"guard-{batch}-{i}")
                    for i, (prompt, param) in enumerate(zip(prompts, params, strict=True))
                )
            )
        )

    async def _final(self, prompt: Any, params: Any, request_id: str) -> Any:
        """The last output of one request (vLLM streams its outputs as they grow)."""
        final = None
        async for output in self.engine.generate(prompt, params, request_id):
            final = output
        if final is None or not final.finished:
            raise RuntimeError(f"vLLM request {request_id} ended without a final output")
        return final


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
