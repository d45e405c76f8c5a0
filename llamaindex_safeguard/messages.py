"""Conversions between LlamaIndex's chat types and the plain dicts that `inference_safeguard` reads.

- `to_guard_messages`: `ChatMessage`s to `{"role", "content"}` dicts, with assistant tool
  calls in the OpenAI/HF format and tool results as `role="tool"` messages.
- `to_tool_specs`: LlamaIndex tools (or OpenAI-style dicts) to
  `inference_safeguard.tools.ToolSpec`s.
- `assistant_message` / `to_tool_selections`: a parsed response to an assistant
  `ChatMessage` with `ToolCallBlock`s, and those blocks to `ToolSelection`s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.tools.types import BaseTool

from inference_safeguard.errors import InvalidPromptError
from inference_safeguard.tools import (
    ParsedResponse,
    ToolCall,
    ToolSpec,
    as_tool_specs,
    name_tool_results,
)

_ROLES: dict[MessageRole, str] = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}

_SKIPPED_BLOCKS = (ThinkingBlock, CachePoint)
"""Blocks that carry nothing for the model's next turn: past reasoning, cache hints."""

ToolLike = BaseTool | ToolSpec | Mapping[str, Any]
"""A tool as `SafeguardLLM` accepts it: a LlamaIndex tool, a `ToolSpec`, or an
OpenAI-style dict."""


def to_guard_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Convert LlamaIndex chat messages to the message dicts of `inference_safeguard`.

    Text blocks are joined with newlines (as `ChatMessage.content` does); thinking
    blocks and cache points are dropped. An assistant message's tool calls (its
    `ToolCallBlock`s, or OpenAI-style `additional_kwargs["tool_calls"]`) become
    `tool_calls` entries; a tool message keeps its `tool_call_id` and gets the called
    tool's `name` from the call it answers.

    Raises:
        InvalidPromptError: not a list of `ChatMessage`s, an empty list, a non-text
            block (images, audio, documents), or tool-call arguments that are not a
            JSON object.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidPromptError(
            f"messages must be a list of llama_index ChatMessage, got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidPromptError("the message list is empty; add at least one user message")
    converted = []
    for index, message in enumerate(messages):
        if not isinstance(message, ChatMessage):
            raise InvalidPromptError(
                f"message {index} must be a llama_index ChatMessage, got {type(message).__name__}"
            )
        role = _ROLES.get(message.role)
        if role is None:  # pragma: no cover - every MessageRole is mapped
            raise InvalidPromptError(f"message {index} has unsupported role {message.role!r}")
        entry: dict[str, Any] = {"role": role, "content": _text(index, message)}
        calls = _tool_calls(index, message)
        if calls and role != "assistant":
            raise InvalidPromptError(
                f"message {index} ({role}) carries tool calls; only assistant messages may"
            )
        if calls:
            entry["tool_calls"] = calls
        if role == "tool":
            call_id = message.additional_kwargs.get("tool_call_id")
            name = message.additional_kwargs.get("name")
            if call_id:
                entry["tool_call_id"] = str(call_id)
            if name:
                entry["name"] = str(name)
        converted.append(entry)
    return name_tool_results(converted)


def _text(index: int, message: ChatMessage) -> str:
    texts = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif not isinstance(block, (ToolCallBlock, *_SKIPPED_BLOCKS)):
            raise InvalidPromptError(
                f"message {index} has a {type(block).__name__}; SafeguardLLM reads text only, "
                "so pass text blocks (describe images or documents in words)"
            )
    return "\n".join(texts)


def _tool_calls(index: int, message: ChatMessage) -> list[dict[str, Any]]:
    """The message's tool calls as `{"id", "type": "function", "function": {...}}` dicts."""
    calls: list[dict[str, Any]] = []
    for block in message.blocks:
        if isinstance(block, ToolCallBlock):
            calls.append(_call(index, block.tool_call_id, block.tool_name, block.tool_kwargs))
    if calls:
        return calls
    raw_calls = message.additional_kwargs.get("tool_calls") or []
    if not isinstance(raw_calls, Sequence) or isinstance(raw_calls, (str, bytes)):
        raise InvalidPromptError(
            f"message {index}: additional_kwargs['tool_calls'] must be a list of tool calls, "
            f"got {type(raw_calls).__name__}"
        )
    for raw in raw_calls:
        calls.append(_call_from_object(index, raw))
    return calls


def _call_from_object(index: int, raw: Any) -> dict[str, Any]:
    """One call from `additional_kwargs["tool_calls"]`: an OpenAI-style dict or SDK
    object, or a `ToolSelection`."""
    if isinstance(raw, ToolSelection):
        return _call(index, raw.tool_id, raw.tool_name, raw.tool_kwargs)
    if hasattr(raw, "model_dump"):
        raw = raw.model_dump()
    if not isinstance(raw, Mapping):
        raise InvalidPromptError(
            f"message {index}: a tool call must be an OpenAI-style dict, got {type(raw).__name__}"
        )
    function = raw.get("function", raw)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InvalidPromptError(f"message {index}: tool call {raw!r} has no function name")
    return _call(index, raw.get("id"), function["name"], function.get("arguments", {}))


def _call(index: int, call_id: str | None, name: str, arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise InvalidPromptError(
                f"message {index}: the arguments of tool call {name!r} are not valid JSON "
                f"({error}); pass them as a dict"
            ) from error
    if not isinstance(arguments, Mapping):
        raise InvalidPromptError(
            f"message {index}: the arguments of tool call {name!r} must be a JSON object, "
            f"got {type(arguments).__name__}"
        )
    return ToolCall(name, dict(arguments), call_id or f"call_{index}_{name}").to_chat()


def to_tool_specs(tools: Sequence[ToolLike] | None) -> list[ToolSpec]:
    """Convert tools to `ToolSpec`s: LlamaIndex tools through their metadata's OpenAI
    form (no 1024-character limit on descriptions: local models have none).

    Raises:
        TypeError: an item is not a tool, `ToolSpec` or dict.
        ValueError: two tools share a name.
    """
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError(
            "tools must be a list of LlamaIndex tools, ToolSpecs or OpenAI-style tool dicts, "
            f"got {type(tools).__name__}"
        )
    converted: list[ToolSpec | Mapping[str, Any]] = []
    for tool in tools:
        if isinstance(tool, BaseTool):
            converted.append(ToolSpec.from_openai(tool.metadata.to_openai_tool(True)))
        elif isinstance(tool, (ToolSpec, Mapping)):
            converted.append(tool)
        else:
            raise TypeError(
                "each tool must be a LlamaIndex BaseTool, an inference_safeguard.tools.ToolSpec or "
                "an "
                f"OpenAI-style dict, got {type(tool).__name__}"
            )
    return as_tool_specs(converted)


def assistant_message(parsed: ParsedResponse, reasoning: str | None = None) -> ChatMessage:
    """The assistant `ChatMessage` of a parsed response: its reasoning (if any) in a
    `ThinkingBlock`, its text (if any, or if there are no calls) in a `TextBlock`, then
    one `ToolCallBlock` per call. `message.content` is the text alone."""
    blocks: list[Any] = []
    if reasoning is not None:
        blocks.append(ThinkingBlock(content=reasoning))
    if parsed.content or not parsed.tool_calls:
        blocks.append(TextBlock(text=parsed.content))
    blocks.extend(
        ToolCallBlock(tool_call_id=call.id, tool_name=call.name, tool_kwargs=dict(call.arguments))
        for call in parsed.tool_calls
    )
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)


def to_tool_selections(message: ChatMessage) -> list[ToolSelection]:
    """The tool calls of an assistant message as LlamaIndex `ToolSelection`s."""
    return [
        ToolSelection(
            tool_id=call["id"],
            tool_name=call["function"]["name"],
            tool_kwargs=call["function"]["arguments"],
        )
        for call in _tool_calls(0, message)
    ]
