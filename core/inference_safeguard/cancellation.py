"""Stopping a search from outside: the flag it checks, and worker calls that set it.

A search runs in the thread that drives it: the caller's, or a worker thread's for the
async forms. Whoever wants it to stop sets its cancel flag (a `threading.Event`); the
search checks the flag before each decoded token and between blocks, so it stops
within one model forward by raising `GenerationCancelledError`. The exception ends the
search's generators, which drops its KV cache and tensors.

`run_in_worker` runs such work in a worker thread for async code: cancelling the task
that awaits it (`task.cancel()`, `asyncio.wait_for` timing out) sets the flag and waits
for the worker to stop, so the worker never outlives its caller by more than a token.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from inference_safeguard.errors import GenerationCancelledError

T = TypeVar("T")

_CANCELLED_MESSAGE = (
    "the generation was cancelled: its stream was closed or its caller stopped waiting"
)


def raise_if_cancelled(cancel: threading.Event | None) -> None:
    """Raise `GenerationCancelledError` if `cancel` is set (None: the work cannot be
    cancelled)."""
    if cancel is not None and cancel.is_set():
        raise GenerationCancelledError(_CANCELLED_MESSAGE)


def cancelled_error() -> GenerationCancelledError:
    """A fresh `GenerationCancelledError`, to raise in place of one that came out of a
    search: the original's traceback holds the search's frames, and so its tensors."""
    return GenerationCancelledError(_CANCELLED_MESSAGE)


class _Cancelled:
    """What a worker returns instead of raising `GenerationCancelledError`."""


_CANCELLED = _Cancelled()


def _unframed(work: Callable[[], T]) -> T | _Cancelled:
    """`work()`, with a cancellation returned as `_CANCELLED` rather than raised, so that
    no traceback keeps the stopped search's frames (and its KV cache) alive."""
    try:
        return work()
    except GenerationCancelledError:
        pass
    return _CANCELLED


async def run_in_worker(work: Callable[[], T], cancel: Callable[[], None]) -> T:
    """Await `work()` run in a worker thread (with this context's variables), so the
    event loop keeps running.

    If the awaiting task is cancelled, `cancel()` is called (it must make `work` stop
    soon with `GenerationCancelledError`, e.g. by setting the flag its search checks),
    the worker is waited for, and the `CancelledError` goes on: once the caller sees
    it, the search has ended and its memory is free, and the worker thread is back in
    the pool for other calls.

    Args:
        work: what to run; it may raise `GenerationCancelledError` once cancelled.
        cancel: asks `work` to stop; called from the event loop's thread.

    Raises:
        GenerationCancelledError: `work` was cancelled by someone else (another thread
            or task closed its stream).
    """
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    worker = loop.run_in_executor(None, context.run, _unframed, work)
    try:
        outcome = await asyncio.shield(worker)
    except asyncio.CancelledError:
        cancel()
        # A second cancellation must not leave the worker's error unretrieved.
        worker.add_done_callback(_retrieve)
        await asyncio.wait([worker])
        raise
    if isinstance(outcome, _Cancelled):
        raise cancelled_error()
    return outcome


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
