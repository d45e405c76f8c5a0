"""Tool calling for `ChatSafeguard`: tool specs from LangChain tools, and `tool_choice` as
an instruction in the prompt.

Rendering tools into the prompt, parsing calls out of the response, choosing the tools a
`tool_choice` offers and holding back streamed text that may be part of a call live in
`inference_safeguard.tools`, shared with the LlamaIndex package; this module adapts them to
LangChain's conventions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from inference_safeguard.tools import ToolChoice, ToolSpec, as_tool_specs, choose_tools

ToolLike = Mapping[str, Any] | type | Callable[..., Any] | BaseTool
"""Anything `bind_tools` takes: an OpenAI-style dict, a pydantic model, a TypedDict, a
function or a LangChain tool."""


def to_openai_tools(tools: Sequence[ToolLike]) -> list[dict[str, Any]]:
    """OpenAI-style tool dicts (`{"type": "function", "function": {...}}`) for `tools`."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError(
            "tools must be a list of tools (dicts, pydantic models, functions or LangChain "
            f"tools), got {type(tools).__name__}"
        )
    return [convert_to_openai_tool(tool) for tool in tools]


def to_tool_specs(tools: Sequence[ToolLike] | None) -> list[ToolSpec]:
    """Core `ToolSpec`s for `tools`; names must be unique."""
    return as_tool_specs(to_openai_tools(tools or []))


def apply_tool_choice(
    messages: list[dict[str, Any]], tools: list[ToolSpec], tool_choice: ToolChoice
) -> tuple[list[dict[str, Any]], list[ToolSpec]]:
    """Messages and tools for a call under `tool_choice` (see
    `inference_safeguard.tools.choose_tools`): a choice that asks for a call says so in the
    system message.

    Raises:
        ValueError: a tool choice without tools, or one that names an unknown tool.
    """
    if tool_choice not in (None, "auto", False, "none") and not tools:
        raise ValueError(f"tool_choice={tool_choice!r} needs tools; bind some with bind_tools")
    tools, instruction = choose_tools(tools, tool_choice)
    if instruction is not None:
        messages = with_system_instruction(messages, instruction)
    return messages, tools


def with_system_instruction(
    messages: list[dict[str, Any]], instruction: str
) -> list[dict[str, Any]]:
    """`messages` with `instruction` appended to the system message (added when missing)."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        content = f"{first['content']}\n\n{instruction}" if first["content"] else instruction
        return [{**first, "content": content}, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]
