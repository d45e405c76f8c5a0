"""Safety records on query and chat engine responses, through LlamaIndex instrumentation.

A query engine turns LLM responses into a `Response` whose text is all that survives
of them, so the safety record of each `SafeguardLLM` call would be lost on the way.
`SafetyRecordHandler` is a span handler on LlamaIndex's root dispatcher that carries
the records up the span tree: each `SafeguardLLM` call registers a `RecordSlot` with
the span it runs in; when a span exits, its slots pass to its parent; and when a span
returns a `Response`, `PydanticResponse` or `AgentChatResponse`, the records of the
calls made under it are written to its `metadata`:

- `metadata["safety"]`: the record of the last call, the one whose text is the
  answer (a refine or condense step runs before it);
- `metadata["safety_records"]`: the records of every call under the span, in order.

A `StreamingResponse` or `AsyncStreamingResponse` gets them once its `response_gen`
has been read to the end: synthesizers call the LLM only as the stream is read, so
the calls made while reading it are collected too (through a context variable).
Streaming chat engines return `StreamingAgentChatResponse`, which has no metadata:
read the record from the last chunk of `llm.stream_chat` there.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import AsyncGenerator, Generator
from contextvars import ContextVar
from typing import Any

from llama_index.core.base.response.schema import (
    AsyncStreamingResponse,
    PydanticResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.chat_engine.types import AgentChatResponse
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.span import BaseSpan, active_span_id
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from pydantic import PrivateAttr

SafetyRecord = dict[str, Any]

_SLOTS_ATTRIBUTE = "_safeguard_record_slots"
"""Where a streaming response keeps the slots its wrapped generator reports."""

_consumed_stream_slots: ContextVar[list[RecordSlot] | None] = ContextVar(
    "safeguard_consumed_stream_slots", default=None
)
"""The slots of the engine response stream being read in this context, if any."""

_install_lock = threading.Lock()


class RecordSlot:
    """The safety record of one `SafeguardLLM` call, filled when the call finishes
    (for a stream: when it has been consumed)."""

    def __init__(self) -> None:
        self.record: SafetyRecord | None = None

    def fill(self, record: SafetyRecord) -> None:
        """Set the record of the finished call."""
        self.record = record


class SafetyRecordHandler(BaseSpanHandler[BaseSpan]):
    """Span handler that writes `SafeguardLLM` safety records into engine responses.

    Install it once with `install_safety_record_handler()` (`SafeguardLLM` does so
    unless built with `record_safety_in_responses=False`). It keeps only the open
    spans and the slots of their calls, never completed spans, so its memory does not
    grow with the number of queries.
    """

    _slots: dict[str, list[RecordSlot]] = PrivateAttr(default_factory=dict)
    _slots_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def class_name(cls) -> str:
        return "SafetyRecordHandler"

    def track(self, span_id: str | None, slot: RecordSlot) -> None:
        """Track `slot`, of a call running in span `span_id` (unknown spans: ignored)."""
        if span_id is not None and span_id in self.open_spans:
            with self._slots_lock:
                self._slots.setdefault(span_id, []).append(slot)

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> BaseSpan:
        return BaseSpan(id_=id_, parent_id=parent_span_id)

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> BaseSpan | None:
        span = self.open_spans.get(id_)
        with self._slots_lock:
            slots = self._slots.pop(id_, [])
            if slots and span is not None and span.parent_id in self.open_spans:
                self._slots.setdefault(span.parent_id, []).extend(slots)
        _attach(result, slots)
        return span

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> BaseSpan | None:
        # A span that raised produced no response: its calls' records go with it.
        with self._slots_lock:
            self._slots.pop(id_, None)
        return self.open_spans.get(id_)


def install_safety_record_handler() -> SafetyRecordHandler:
    """Add a `SafetyRecordHandler` to LlamaIndex's root dispatcher, once per process.

    Returns:
        The installed handler (the existing one if already installed).
    """
    root = get_dispatcher()
    with _install_lock:
        for handler in root.span_handlers:
            if isinstance(handler, SafetyRecordHandler):
                return handler
        handler = SafetyRecordHandler()
        root.add_span_handler(handler)
        return handler


def track_call() -> RecordSlot:
    """A slot for the `SafeguardLLM` call starting now.

    It is reported to the stream being consumed, if any (synthesizers call the LLM
    only once their response stream is read), and tracked in the span tree if the
    handler is installed.
    """
    slot = RecordSlot()
    consuming = _consumed_stream_slots.get()
    if consuming is not None:
        consuming.append(slot)
    for handler in get_dispatcher().span_handlers:
        if isinstance(handler, SafetyRecordHandler):
            handler.track(active_span_id.get(), slot)
            break
    return slot


def _attach(result: Any, slots: list[RecordSlot]) -> None:
    """Write the slots' records into `result` if it is an engine response."""
    if isinstance(result, StreamingResponse):
        _attach_after_stream(result, slots)
    elif isinstance(result, AsyncStreamingResponse):
        _attach_after_async_stream(result, slots)
    elif slots and isinstance(result, (Response, PydanticResponse, AgentChatResponse)):
        _write(result, slots)


def _write(result: Any, slots: list[RecordSlot]) -> None:
    records = [slot.record for slot in slots if slot.record is not None]
    if not records:
        return
    metadata = result.metadata if result.metadata is not None else {}
    metadata["safety"] = records[-1]
    metadata["safety_records"] = records
    result.metadata = metadata


def _stream_slots(result: Any, slots: list[RecordSlot]) -> tuple[list[RecordSlot], bool]:
    """The slots a streaming response reports, updated with `slots`, and whether its
    generator still has to be wrapped.

    The same response leaves several nested spans (synthesize, query, ...), each outer
    one knowing the calls of the inner ones and maybe earlier ones; calls made while
    the stream is read come last.
    """
    known: list[RecordSlot] | None = result.__dict__.get(_SLOTS_ATTRIBUTE)
    if known is None:
        result.__dict__[_SLOTS_ATTRIBUTE] = list(slots)
        return result.__dict__[_SLOTS_ATTRIBUTE], True
    later = [slot for slot in known if not any(slot is s for s in slots)]
    known[:] = [*slots, *later]
    return known, False


def _attach_after_stream(result: StreamingResponse, slots: list[RecordSlot]) -> None:
    known, unwrapped = _stream_slots(result, slots)
    if not unwrapped or result.response_gen is None:
        return
    tokens = iter(result.response_gen)

    def recorded() -> Generator[str, None, None]:
        while True:
            reset = _consumed_stream_slots.set(known)
            try:
                token = next(tokens)
            except StopIteration:
                break
            finally:
                _consumed_stream_slots.reset(reset)
            yield token
        _write(result, known)

    result.response_gen = recorded()


def _attach_after_async_stream(result: AsyncStreamingResponse, slots: list[RecordSlot]) -> None:
    known, unwrapped = _stream_slots(result, slots)
    if not unwrapped or result.response_gen is None:
        return
    tokens = aiter(result.response_gen)

    async def recorded() -> AsyncGenerator[str, None]:
        while True:
            reset = _consumed_stream_slots.set(known)
            try:
                token = await anext(tokens)
            except StopAsyncIteration:
                break
            finally:
                _consumed_stream_slots.reset(reset)
            yield token
        _write(result, known)

    result.response_gen = recorded()
