"""LangChain messages to the core's chat dicts, and parsed responses back to LangChain.

The core takes OpenAI/Hugging Face-style dicts: `{"role", "content"}`, assistant
messages with `tool_calls=[{"id", "type": "function", "function": {"name",
"arguments"}}]`, and `{"role": "tool", "content", "tool_call_id", "name"}` results.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages import ToolCall as LangChainToolCall
from langchain_core.messages.tool import (
    InvalidToolCall as LangChainInvalidToolCall,
)
from langchain_core.messages.tool import (
    ToolCallChunk,
    invalid_tool_call,
    tool_call,
    tool_call_chunk,
)

from inference_safeguard.tools import ParsedResponse, ToolCall, name_tool_results

_CHAT_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "tool": "tool",
}
# Content blocks that carry no text for the model: tool calls travel in
# `AIMessage.tool_calls`, and reasoning is not fed back.
_SKIPPED_BLOCKS = frozenset(
    {"tool_use", "tool_call", "tool_call_chunk", "function_call", "reasoning", "thinking"}
)


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """Convert LangChain messages to the core's chat dicts.

    Consecutive system, user, or plain assistant messages are merged (joined by a
    blank line): many chat templates reject two turns of one role in a row. A tool
    result gets the name of the call it answers.

    Raises:
        ValueError: a message type or role the core cannot render.
        NotImplementedError: non-text content (images, audio, files).
    """
    converted: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        item = _to_chat_message(index, message)
        previous = converted[-1] if converted else None
        if (
            previous is not None
            and previous["role"] == item["role"]
            and item["role"] in ("system", "user", "assistant")
            and not previous.get("tool_calls")
            and not item.get("tool_calls")
        ):
            joined = "\n\n".join(part for part in (previous["content"], item["content"]) if part)
            converted[-1] = {**previous, "content": joined}
        else:
            converted.append(item)
    return name_tool_results(converted)


def _to_chat_message(index: int, message: BaseMessage) -> dict[str, Any]:
    content = _text_of(index, message)
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": content}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": content}
    if isinstance(message, AIMessage):
        item: dict[str, Any] = {"role": "assistant", "content": content}
        if message.tool_calls:
            item["tool_calls"] = [
                ToolCall(
                    call["name"], dict(call["args"]), call.get("id") or f"call_{index}_{n}"
                ).to_chat()
                for n, call in enumerate(message.tool_calls)
            ]
        return item
    if isinstance(message, ToolMessage):
        item = {"role": "tool", "content": content, "tool_call_id": message.tool_call_id}
        return {**item, "name": message.name} if message.name else item
    if isinstance(message, FunctionMessage):
        return {"role": "tool", "content": content, "name": message.name}
    if isinstance(message, ChatMessage):
        role = _CHAT_ROLES.get(message.role.lower())
        if role is None or role == "tool":
            raise ValueError(
                f"message {index} is a ChatMessage with role {message.role!r}; use one of "
                "'system', 'user' or 'assistant', or a ToolMessage for tool results"
            )
        return {"role": role, "content": content}
    raise ValueError(
        f"message {index} is a {type(message).__name__}, which ChatSafeguard cannot render; "
        "use SystemMessage, HumanMessage, AIMessage or ToolMessage"
    )


def _text_of(index: int, message: BaseMessage) -> str:
    """The text of a message; non-text blocks other than tool calls are refused."""
    if isinstance(message.content, str):
        return message.content
    for block in message.content:
        if isinstance(block, str):
            continue
        kind = block.get("type")
        if kind == "text" or kind in _SKIPPED_BLOCKS:
            continue
        raise NotImplementedError(
            f"message {index} has a {kind!r} content block, but the base model reads text "
            "only; pass text content (images, audio and files are not supported)"
        )
    return message.text


def tool_calls_of(parsed: ParsedResponse) -> list[LangChainToolCall]:
    """The parsed calls as LangChain `ToolCall`s."""
    return [
        tool_call(name=call.name, args=call.arguments, id=call.id) for call in parsed.tool_calls
    ]


def invalid_tool_calls_of(parsed: ParsedResponse) -> list[LangChainInvalidToolCall]:
    """Call-shaped text that did not parse, as LangChain `InvalidToolCall`s."""
    return [
        invalid_tool_call(name=call.name, args=call.raw, id=None, error=call.error)
        for call in parsed.invalid_tool_calls
    ]


def tool_call_chunks_of(parsed: ParsedResponse) -> list[ToolCallChunk]:
    """The parsed calls as stream chunks, which LangChain merges back into tool calls.

    LangChain rebuilds `tool_calls` and `invalid_tool_calls` of a streamed message from
    its chunks, reading each chunk's `args` leniently as JSON, so an invalid call is
    sent with its raw text JSON-quoted: it then reads as a string, not an object, and
    stays invalid.
    """
    chunks = [
        tool_call_chunk(name=call.name, args=json.dumps(call.arguments), id=call.id, index=index)
        for index, call in enumerate(parsed.tool_calls)
    ]
    chunks += [
        tool_call_chunk(
            name=call.name, args=json.dumps(call.raw), id=None, index=len(chunks) + index
        )
        for index, call in enumerate(parsed.invalid_tool_calls)
    ]
    return chunks
