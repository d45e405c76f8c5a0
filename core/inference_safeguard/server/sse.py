"""Streamed responses as server-sent events, in OpenAI's chunk format.

Each event is `data: <JSON chunk>` and a blank line; the stream ends with
`data: [DONE]`. A chat stream opens with the assistant's role, sends the committed text
as it comes (text that may turn out to be a tool call is held back until it is known),
then the tool calls, then a last chunk with the finish reason and the safety record
(and, when `stream_options.include_usage` was asked for, a chunk with the usage). The
backend commits only text it can no longer change and the cost model has accepted, so
nothing sent is ever taken back; a search that ends in a refusal after some text just
ends, with finish reason `content_filter` (and the refusal text when nothing was sent).

An error after the stream has started is sent as one `data: {"error": ...}` event before
`[DONE]`. A client that disconnects cancels the task that reads the backend's stream,
which stops its search.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel

from inference_safeguard.errors import UnsafeGenerationError
from inference_safeguard.results import GuardResult
from inference_safeguard.server.backend import ResultStream
from inference_safeguard.server.errors import APIError
from inference_safeguard.server.mapping import (
    Call,
    finish_reason,
    parsed,
    safety_record,
    tool_calls,
    usage,
    withheld,
)
from inference_safeguard.server.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    Completion,
    TextChoice,
    completion_id,
)
from inference_safeguard.tools import ToolCallHoldback

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"

Observe = Callable[[str, GuardResult], None]
"""Called with the OpenAI finish reason and the result once a stream has finished."""


def event(chunk: BaseModel | dict[str, Any]) -> bytes:
    data = chunk.model_dump(mode="json") if isinstance(chunk, BaseModel) else chunk
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


async def _deltas(stream: ResultStream) -> AsyncIterator[str]:
    """The stream's deltas; it is closed however the reading ends."""
    try:
        async for delta in stream:
            yield delta
    finally:
        await stream.aclose()


async def chat_events(
    stream: ResultStream, call: Call, model: str, observe: Observe
) -> AsyncIterator[bytes]:
    """The events of a streamed chat completion."""
    meta = {"id": completion_id("chatcmpl"), "created": int(time.time()), "model": model}

    def chunk(delta: dict[str, Any], **choice: Any) -> bytes:
        return event(ChatCompletionChunk(**meta, choices=[ChatChunkChoice(delta=delta, **choice)]))

    async def body() -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        holdback = ToolCallHoldback(call.offered) if call.offered else None
        try:
            async for delta in _deltas(stream):
                text = holdback.feed(delta) if holdback is not None else delta
                if text:
                    yield chunk({"content": text})
            result = stream.result
        except UnsafeGenerationError as error:
            result = withheld(error)
        if result is None:  # cancelled: nobody is reading
            return
        response = parsed(result, call)
        rest = holdback.finish(response.content) if holdback is not None else ""
        if rest:
            yield chunk({"content": rest})
        if result.reasoning:
            yield chunk({"reasoning_content": result.reasoning})
        calls = tool_calls(response)
        if calls:
            yield chunk(
                {
                    "tool_calls": [
                        {"index": index, **c.model_dump(mode="json")}
                        for index, c in enumerate(calls)
                    ]
                }
            )
        reason = finish_reason(result, response)
        observe(reason, result)
        yield chunk({}, finish_reason=reason, safety=safety_record(result))
        if call.include_usage:
            yield event(ChatCompletionChunk(**meta, choices=[], usage=usage(result)))

    async for data in _guarded(body(), call):
        yield data


async def completion_events(
    stream: ResultStream, call: Call, model: str, observe: Observe
) -> AsyncIterator[bytes]:
    """The events of a streamed text completion."""
    meta = {"id": completion_id("cmpl"), "created": int(time.time()), "model": model}

    def chunk(text: str, **choice: Any) -> bytes:
        choice.setdefault("finish_reason", None)
        choice.setdefault("safety", None)
        return event(Completion(**meta, choices=[TextChoice(text=text, **choice)]))

    async def body() -> AsyncIterator[bytes]:
        try:
            async for delta in _deltas(stream):
                yield chunk(delta)
            result = stream.result
        except UnsafeGenerationError as error:
            result = withheld(error)
        if result is None:
            return
        response = parsed(result, call)
        reason = finish_reason(result, response)
        observe(reason, result)
        yield chunk("", finish_reason=reason, safety=safety_record(result))
        if call.include_usage:
            yield event(Completion(**meta, choices=[], usage=usage(result)))

    async for data in _guarded(body(), call):
        yield data


async def _guarded(events: AsyncIterator[bytes], call: Call) -> AsyncIterator[bytes]:
    """`events`, then `[DONE]`; an error on the way becomes an error event."""
    try:
        async for data in events:
            yield data
    except Exception as error:
        api_error = call.error(error)
        if api_error is None:
            logger.exception("a streamed response failed", exc_info=error)
            api_error = APIError(500, "the server failed to finish this response; see its log")
        yield event(api_error.body())
    yield DONE
