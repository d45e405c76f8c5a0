"""Tool calling for `ChatSafeguard`: tool specs from LangChain tools, `tool_choice`, and
holding back streamed text that may be the start of a tool call.

Rendering tools into the prompt and parsing calls out of the response live in
`core.tools`, shared with the LlamaIndex package; this module adapts them to
LangChain's conventions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from core.tools import TOOL_CALL_OPEN, ToolSpec, as_tool_specs

ToolLike = Mapping[str, Any] | type | Callable[..., Any] | BaseTool
"""Anything `bind_tools` takes: an OpenAI-style dict, a pydantic model, a TypedDict, a
function or a LangChain tool."""

ToolChoice = str | bool | Mapping[str, Any] | None

# How the formats `core.tools.parse_tool_calls` reads begin. A bare JSON object or list
# (possibly fenced) is a call too, so text that starts with one is held back whole.
_CALL_MARKERS = (TOOL_CALL_OPEN, "[TOOL_CALLS]", "<|python_tag|>")
_JSON_STARTS = ("{", "[", "`")
_FORCE_ANY = ("any", "required")


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


def chosen_tool_name(tool_choice: ToolChoice) -> str | None:
    """The tool a `tool_choice` names (`"name"` or `{"function": {"name": ...}}`), if any."""
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function", tool_choice)
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise ValueError(
                f"tool_choice {dict(tool_choice)!r} names no tool; use "
                "{'type': 'function', 'function': {'name': <tool name>}}"
            )
        return name
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", *_FORCE_ANY):
        return tool_choice
    return None


def apply_tool_choice(
    messages: list[dict[str, Any]], tools: list[ToolSpec], tool_choice: ToolChoice
) -> tuple[list[dict[str, Any]], list[ToolSpec]]:
    """Messages and tools for a call under `tool_choice`.

    A local model cannot be forced to call a tool without constrained decoding, so a
    required call is asked for in the system message, and a named tool is the only one
    offered (and parsed):

    - `None`, `"auto"`, `False`: the tools as given; the model decides.
    - `"none"`: no tools offered (earlier calls in the conversation still render).
    - `"any"`, `"required"`, `True`: the model is told to call one of the tools.
    - a tool name or `{"type": "function", "function": {"name": ...}}`: only that tool
      is offered and the model is told to call it.

    Raises:
        ValueError: a tool choice without tools, or one that names an unknown tool.
    """
    if tool_choice in (None, "auto", False):
        return messages, tools
    if tool_choice == "none":
        return messages, []
    if not tools:
        raise ValueError(f"tool_choice={tool_choice!r} needs tools; bind some with bind_tools")
    if tool_choice is True or tool_choice in _FORCE_ANY:
        instruction = "Answer by calling one of the tools you are given."
    else:
        name = chosen_tool_name(tool_choice)
        if name is None:
            raise ValueError(
                f"tool_choice must be 'auto', 'none', 'any', 'required', a bool, a tool name "
                f"or {{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}"
            )
        tools = [spec for spec in tools if spec.name == name]
        if not tools:
            raise ValueError(f"tool_choice names {name!r}, which is not one of the bound tools")
        instruction = f"Answer by calling the tool {name}."
    return with_system_instruction(messages, instruction), tools


def with_system_instruction(
    messages: list[dict[str, Any]], instruction: str
) -> list[dict[str, Any]]:
    """`messages` with `instruction` appended to the system message (added when missing)."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        content = f"{first['content']}\n\n{instruction}" if first["content"] else instruction
        return [{**first, "content": content}, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


class ToolCallHoldback:
    """Splits a streamed response into text that may be shown now and text held back.

    With tools bound, a response may contain tool calls, which the final parse removes
    from the content. Text is released only while it cannot be part of one: nothing
    once a call marker appears, nothing of a response that starts like JSON, no
    trailing prefix of a marker, and no trailing whitespace (the parsed content is
    stripped). So the released text is a prefix of the final content, and `finish`
    returns the rest.
    """

    def __init__(self) -> None:
        self._text = ""
        self._released = 0
        self._holding = False

    def feed(self, delta: str) -> str:
        """Add a delta; return the text that can be released now."""
        self._text += delta
        if self._holding:
            return ""
        body = self._text.lstrip()
        if body.startswith(_JSON_STARTS):
            self._holding = True
            return ""
        end = len(body)
        for marker in _CALL_MARKERS:
            found = body.find(marker)
            if found >= 0:
                self._holding = True
                end = min(end, found)
            else:
                for size in range(min(len(marker) - 1, len(body)), 0, -1):
                    if body.endswith(marker[:size]):
                        end = min(end, len(body) - size)
                        break
        end = len(body[:end].rstrip())
        if end <= self._released:
            return ""
        released, self._released = body[self._released : end], end
        return released

    def finish(self, content: str) -> str:
        """The rest of the final `content` after what was released (empty if it diverged)."""
        released = self._text.lstrip()[: self._released]
        return content[len(released) :] if content.startswith(released) else ""
