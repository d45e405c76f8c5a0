"""Tool calling for local models: tool specs, prompt rendering and tool-call parsing.

Framework-neutral, so that the LangChain and LlamaIndex packages share it. A chat
template that knows tools (it reads the `tools` variable) renders them itself; for
one that does not, the tools are described in a system message that asks for
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` lines, and earlier tool
calls and results in the conversation are written out in the same form.

The parser reads the formats local models use: `<tool_call>` tags (Hermes, Qwen),
`[TOOL_CALLS]` (Mistral), `<|python_tag|>` (Llama 3.1), and a bare or fenced JSON
object or list whose items have a `name` and `arguments` (or `parameters`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_TAGGED = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
_FENCED = re.compile(r"\A\s*```(?:json)?\s*(.*?)\s*```\s*\Z", re.S)
TOOL_CALL_MARKERS = (TOOL_CALL_OPEN, "[TOOL_CALLS]", "<|python_tag|>")
"""Text that starts a tool call in the formats the parser reads; a stream that may be a
tool call should hold text back from the first of these (or a prefix of one) on."""


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call.

    Attributes:
        name: the name the model calls it by.
        description: what it does, for the model.
        parameters: JSON Schema of its arguments object.
    """

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("a tool needs a non-empty name")
        if not isinstance(self.parameters, Mapping):
            raise ValueError(
                f"tool {self.name!r}: parameters must be a JSON Schema object (a dict), "
                f"got {type(self.parameters).__name__}"
            )

    @classmethod
    def from_openai(cls, tool: Mapping[str, Any]) -> ToolSpec:
        """From `{"type": "function", "function": {...}}` or `{name, description, parameters}`."""
        if not isinstance(tool, Mapping):
            raise TypeError(
                f"a tool must be a ToolSpec or an OpenAI-style dict, got {type(tool).__name__}"
            )
        function = tool.get("function", tool)
        if "name" not in function:
            raise ValueError(f"tool {dict(tool)!r} has no name; give it a 'name' key")
        return cls(
            name=function["name"],
            description=function.get("description") or "",
            parameters=dict(function.get("parameters") or {"type": "object", "properties": {}}),
        )

    def to_openai(self) -> dict[str, Any]:
        """`{"type": "function", "function": {name, description, parameters}}`."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class InvalidToolCall:
    """Text that looked like a tool call but could not be read as one."""

    raw: str
    error: str
    name: str | None = None


@dataclass(frozen=True)
class ParsedResponse:
    """A response split into its text and its tool calls.

    Attributes:
        content: the text with the tool calls taken out.
        tool_calls: the calls, in order.
        invalid_tool_calls: call-shaped text that did not parse (left out of `content`).
    """

    content: str
    tool_calls: list[ToolCall]
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def as_tool_specs(tools: Sequence[ToolSpec | Mapping[str, Any]] | None) -> list[ToolSpec]:
    """Normalise tools given as `ToolSpec`s or OpenAI-style dicts; names must be unique."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError("tools must be a list of ToolSpec or OpenAI-style tool dicts")
    specs = [t if isinstance(t, ToolSpec) else ToolSpec.from_openai(t) for t in tools]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique, got {names}")
    return specs


# ------------------------------------------------------------------- rendering
def template_renders_tools(chat_template: str | Mapping[str, str] | None) -> bool:
    """Whether a chat template reads the `tools` variable (so it renders tools itself)."""
    if not chat_template:
        return False
    sources = chat_template.values() if isinstance(chat_template, Mapping) else [chat_template]
    return any(re.search(r"\btools\b", source) for source in sources)


def describe_tools(tools: Sequence[ToolSpec]) -> str:
    """The system-prompt text that offers `tools` to a model whose template cannot."""
    listing = "\n".join(
        json.dumps(
            {"name": t.name, "description": t.description, "parameters": t.parameters},
            ensure_ascii=False,
        )
        for t in tools
    )
    return (
        "You can call these tools (JSON Schema of each one's arguments given):\n"
        f"{listing}\n"
        "To call a tool, answer with one line per call and nothing else:\n"
        f'{TOOL_CALL_OPEN}{{"name": "<tool name>", "arguments": {{...}}}}{TOOL_CALL_CLOSE}\n'
        "Otherwise, answer the user directly."
    )


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """A tool call written out as text, in the format the parser reads back."""
    payload = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}{payload}{TOOL_CALL_CLOSE}"


def inline_tool_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec]
) -> list[dict[str, Any]]:
    """Rewrite a conversation for a template without tool support.

    The tool description joins (or becomes) the system message; assistant tool calls
    become `<tool_call>` text; tool results become user messages in
    `<tool_response>` tags.
    """
    rewritten: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                format_tool_call(*_call_name_and_arguments(call)) for call in message["tool_calls"]
            ]
            rewritten.append({"role": "assistant", "content": "\n".join([content, *calls]).strip()})
        elif role == "tool":
            name = message.get("name") or message.get("tool_call_id") or "tool"
            rewritten.append(
                {
                    "role": "user",
                    "content": f"<tool_response name={name!r}>{content}</tool_response>",
                }
            )
        else:
            rewritten.append({"role": role, "content": content})
    if tools:
        description = describe_tools(tools)
        if rewritten and rewritten[0]["role"] == "system":
            rewritten[0] = {
                "role": "system",
                "content": f"{rewritten[0]['content']}\n\n{description}".strip(),
            }
        else:
            rewritten.insert(0, {"role": "system", "content": description})
    return rewritten


def native_tool_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template with tool support: tool-call arguments as dicts, content text."""
    rewritten = []
    for message in messages:
        copy = {**message, "content": message.get("content") or ""}
        if message.get("tool_calls"):
            copy["tool_calls"] = []
            for index, call in enumerate(message["tool_calls"]):
                name, arguments = _call_name_and_arguments(call)
                copy["tool_calls"].append(
                    {
                        "id": call.get("id") or f"call_{index}",
                        "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    }
                )
        rewritten.append(copy)
    return rewritten


def _call_name_and_arguments(call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Name and arguments of an OpenAI/HF-style (or flat) tool call."""
    function = call.get("function", call)
    arguments = function.get("arguments", function.get("args", {}))
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    return function["name"], dict(arguments)


# --------------------------------------------------------------------- parsing
def parse_tool_calls(text: str, tools: Sequence[ToolSpec] | None = None) -> ParsedResponse:
    """Split generated text into content and tool calls.

    Args:
        text: the model's response.
        tools: when given, only calls of these tools count; other call-shaped text is
            reported as invalid.
    """
    known = None if tools is None else {t.name for t in tools}
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []

    def collect(payload: str) -> None:
        """Read the JSON call objects in `payload` into `calls` (or `invalid`)."""
        values = _json_values(payload)
        if values is None:
            invalid.append(InvalidToolCall(raw=payload, error="not valid JSON"))
            return
        for item in _flatten(values):
            _add_call(item, known, calls, invalid)

    if TOOL_CALL_OPEN in text:
        for match in _TAGGED.finditer(text):
            collect(match.group(1).strip())
        content = _TAGGED.sub("", text)
        return ParsedResponse(_tidy(content), calls, invalid)
    for marker in TOOL_CALL_MARKERS[1:]:
        if marker in text:
            before, _, payload = text.partition(marker)
            collect(payload.strip())
            return ParsedResponse(_tidy(before), calls, invalid)
    fenced = _FENCED.match(text)
    candidate = fenced.group(1) if fenced else text.strip()
    if candidate[:1] in "{[":
        values = _json_values(candidate)
        # Bare JSON is a call only with its arguments: a JSON answer may have a "name".
        if values and all(_looks_like_bare_call(item) for item in _flatten(values)):
            for item in _flatten(values):
                _add_call(item, known, calls, invalid)
            return ParsedResponse("", calls, invalid)
    return ParsedResponse(text, [], [])


def _json_values(payload: str) -> list[Any] | None:
    """Every JSON value in `payload` (separated by whitespace, commas or semicolons)."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while True:
        while position < len(payload) and payload[position] in " \t\r\n,;":
            position += 1
        if position == len(payload):
            return values if values else None
        try:
            value, position = decoder.raw_decode(payload, position)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _flatten(values: list[Any]) -> list[Any]:
    return [item for value in values for item in (value if isinstance(value, list) else [value])]


def _looks_like_call(item: Any) -> bool:
    if not isinstance(item, Mapping):
        return False
    function = item.get("function", item)
    return isinstance(function, Mapping) and isinstance(function.get("name"), str)


def _looks_like_bare_call(item: Any) -> bool:
    if not _looks_like_call(item):
        return False
    function = item.get("function", item)
    return "arguments" in function or "parameters" in function


def _add_call(
    item: Any, known: set[str] | None, calls: list[ToolCall], invalid: list[InvalidToolCall]
) -> None:
    raw = json.dumps(item, ensure_ascii=False) if not isinstance(item, str) else item
    if not _looks_like_call(item):
        invalid.append(InvalidToolCall(raw=raw, error="a tool call needs a 'name'"))
        return
    function = item.get("function", item)
    name = function["name"]
    if known is not None and name not in known:
        invalid.append(InvalidToolCall(raw=raw, name=name, error=f"no tool named {name!r}"))
        return
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            invalid.append(InvalidToolCall(raw=raw, name=name, error="arguments are not JSON"))
            return
    if not isinstance(arguments, Mapping):
        invalid.append(InvalidToolCall(raw=raw, name=name, error="arguments must be a JSON object"))
        return
    call_id = item.get("id") if isinstance(item.get("id"), str) else None
    calls.append(
        ToolCall(name=name, arguments=dict(arguments), **({"id": call_id} if call_id else {}))
    )


def _tidy(content: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", content).strip()
