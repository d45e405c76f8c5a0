"""Tool calling for `ChatSafeguard`: tool specs from LangChain tools, and early checks of
a `tool_choice`.

Rendering tools into the prompt, choosing the tools a `tool_choice` offers, forcing a
required call by grammar, parsing calls out of the response and holding back streamed
text that may be part of a call live in `inference_safeguard` (shared with the LlamaIndex
package); this module adapts them to LangChain's conventions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import (
    convert_to_openai_function,
    convert_to_openai_tool,
)

from inference_safeguard.tools import (
    ToolChoice,
    ToolSpec,
    as_tool_specs,
    call_is_required,
    choose_tools,
)

ToolLike = Mapping[str, Any] | type | Callable[..., Any] | BaseTool
"""Anything `bind_tools` takes: an OpenAI-style dict, a pydantic model, a TypedDict, a
function or a LangChain tool."""


def to_openai_tools(
    tools: Sequence[ToolLike], *, strict: bool | None = None
) -> list[dict[str, Any]]:
    """OpenAI-style tool dicts (`{"type": "function", "function": {...}}`) for `tools`.

    Args:
        tools: the tools.
        strict: True marks every tool strict (`function.strict`; LangChain also lists
            every property as required and allows no others, as OpenAI's strict mode
            does), False marks none; None keeps what each tool says.

    Raises:
        TypeError: `tools` is not a list of tools.
        ValueError: a tool that LangChain cannot convert, or a dict whose own `strict`
            contradicts `strict`.
    """
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError(
            "tools must be a list of tools (dicts, pydantic models, functions or LangChain "
            f"tools), got {type(tools).__name__}"
        )
    return [_to_openai_tool(tool, strict) for tool in tools]


def _to_openai_tool(tool: ToolLike, strict: bool | None) -> dict[str, Any]:
    if strict is not None and isinstance(tool, Mapping) and tool.get("type") == "function":
        # LangChain returns a tool already in OpenAI's format as it is, whatever `strict`
        # says; its function goes through the same conversion as any other tool's.
        return {**tool, "function": convert_to_openai_function(tool["function"], strict=strict)}
    return convert_to_openai_tool(tool, strict=strict)


def to_tool_specs(tools: Sequence[ToolLike] | None) -> list[ToolSpec]:
    """Core `ToolSpec`s for `tools`; names must be unique."""
    return as_tool_specs(to_openai_tools(tools or []))


def offered_tools(tools: list[ToolSpec], tool_choice: ToolChoice) -> list[ToolSpec]:
    """The tools a call offers under `tool_choice` (see
    `inference_safeguard.tools.choose_tools`), which are also the only ones whose calls
    are parsed. The decoder makes the same choice; checking here makes a bad choice fail
    in `bind_tools`, before anything is decoded.

    Raises:
        ValueError: a tool choice that requires a call without tools, one of an unknown
            form, or one that names a tool not in `tools`.
    """
    if call_is_required(tool_choice) and not tools:
        raise ValueError(f"tool_choice={tool_choice!r} needs tools; bind some with bind_tools")
    return choose_tools(tools, tool_choice)[0]
