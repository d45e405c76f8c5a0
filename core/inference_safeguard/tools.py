"""Tool calling for local models: tool specs, prompt rendering and tool-call parsing.

Framework-neutral, so that the LangChain and LlamaIndex packages share it. A chat
template that knows tools (it reads the `tools` variable) renders them itself; for
one that does not, the tools are described in a system message that asks for
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` lines, and earlier tool
calls and results in the conversation are written out in the same form.

The parser reads the formats local models use: `<tool_call>` tags (Hermes, Qwen),
`[TOOL_CALLS]` (Mistral), `<|python_tag|>` (Llama 3.1), and a bare or fenced JSON
object or list whose items have a `name` and `arguments` (or `parameters`).
`ToolCallHoldback` holds back streamed text that may turn out to be part of a call, and
`choose_tools` reads an OpenAI-style `tool_choice`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inference_safeguard.errors import InvalidPromptError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_TAGGED = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
_FENCED = re.compile(r"\A\s*```(?:json)?\s*(.*?)\s*```\s*\Z", re.S)
TOOL_CALL_MARKERS = (TOOL_CALL_OPEN, "[TOOL_CALLS]", "<|python_tag|>")
"""Text that starts a tool call in the formats the parser reads; a stream that may be a
tool call should hold text back from the first of these (or a prefix of one) on."""

ToolChoice = str | bool | Mapping[str, Any] | None
"""An OpenAI-style tool choice: `"auto"`, `"none"`, `"any"`/`"required"`/`True`, a tool
name, or `{"type": "function", "function": {"name": ...}}`; see `choose_tools`."""

_OPEN_CHOICES = (None, "auto", False)
_ANY_CHOICES = ("any", "required", True)


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call.

    Attributes:
        name: the name the model calls it by.
        description: what it does, for the model.
        parameters: JSON Schema of its arguments object.
        strict: hold the arguments to the schema under OpenAI's strict rules (no property
            the schema does not list; schema keywords the grammar cannot enforce are an
            error instead of being ignored).
    """

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False

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
            strict=bool(function.get("strict") or tool.get("strict") or False),
        )

    def to_openai(self) -> dict[str, Any]:
        """`{"type": "function", "function": {name, description, parameters[, strict]}}`."""
        function: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
        }
        if self.strict:
            function["strict"] = True
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_chat(self) -> dict[str, Any]:
        """This call as an entry of an assistant message's `tool_calls`, in the chat format
        decoders take: `{"id", "type": "function", "function": {"name", "arguments"}}`,
        the arguments a dict."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": dict(self.arguments)},
        }


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
            calls = [format_tool_call(*read_tool_call(call)) for call in message["tool_calls"]]
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
            copy["tool_calls"] = [
                ToolCall(*read_tool_call(call), id=call.get("id") or f"call_{index}").to_chat()
                for index, call in enumerate(message["tool_calls"])
            ]
        rewritten.append(copy)
    return rewritten


def name_tool_results(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with each tool result that has no `name` given the name of the call it
    answers (matched by `tool_call_id` against earlier assistant `tool_calls`): templates
    and the inline rendering label a result with its tool's name."""
    names: dict[str, str] = {}
    named: list[dict[str, Any]] = []
    for message in messages:
        for call in message.get("tool_calls") or []:
            if call.get("id"):
                names[call["id"]] = call.get("function", call)["name"]
        call_id = message.get("tool_call_id")
        if message.get("role") == "tool" and not message.get("name") and call_id in names:
            named.append({**message, "name": names[call_id]})
        else:
            named.append(dict(message))
    return named


_CALL_SHAPE = "{'id', 'type': 'function', 'function': {'name', 'arguments'}}"


def read_tool_call(call: Any, where: str = "a tool call") -> tuple[str, dict[str, Any]]:
    """Name and arguments of an OpenAI/HF-style (or flat `{name, arguments|args}`) tool
    call of an assistant message; arguments may be a dict or a JSON object string.

    Args:
        call: the call as given.
        where: how the error message names the call (e.g. "message 2, tool call 0").

    Raises:
        InvalidPromptError: the call is not a dict, has no function name, or its arguments
            are not a JSON object.
    """
    if not isinstance(call, Mapping):
        raise InvalidPromptError(f"{where} must be a dict {_CALL_SHAPE}, got {type(call).__name__}")
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        raise InvalidPromptError(
            f"{where}: 'function' must be a dict with 'name' and 'arguments', got "
            f"{type(function).__name__}; write the call as {_CALL_SHAPE}"
        )
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidPromptError(
            f"{where} has no tool name: give its function a non-empty 'name' string, as in "
            f"{_CALL_SHAPE}"
        )
    arguments = function.get("arguments", function.get("args"))
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise InvalidPromptError(
                f"{where} ({name!r}): the arguments are not valid JSON ({error}); pass them "
                "as a dict or as a JSON object string"
            ) from None
    if not isinstance(arguments, Mapping):
        raise InvalidPromptError(
            f"{where} ({name!r}): the arguments must be a JSON object (a dict of argument "
            f"names to values), got {type(arguments).__name__}"
        )
    return name, dict(arguments)


# --------------------------------------------------------------------- parsing
def parse_tool_calls(text: str, tools: Sequence[ToolSpec] | None = None) -> ParsedResponse:
    """Split generated text into content and tool calls.

    A call identical to an earlier one of the same response (same tool, same
    arguments) is kept once: running it twice gives nothing new, and small models,
    once free to add calls, tend to repeat the one they made.

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
        return ParsedResponse(_tidy(content), _distinct(calls), invalid)
    for marker in TOOL_CALL_MARKERS[1:]:
        if marker in text:
            before, _, payload = text.partition(marker)
            collect(payload.strip())
            return ParsedResponse(_tidy(before), _distinct(calls), invalid)
    fenced = _FENCED.match(text)
    candidate = fenced.group(1) if fenced else text.strip()
    if candidate[:1] in "{[":
        values = _json_values(candidate)
        # Bare JSON is a call only with its arguments: a JSON answer may have a "name".
        if values and all(_looks_like_bare_call(item) for item in _flatten(values)):
            for item in _flatten(values):
                _add_call(item, known, calls, invalid)
            return ParsedResponse("", _distinct(calls), invalid)
    return ParsedResponse(text, [], [])


def _distinct(calls: list[ToolCall]) -> list[ToolCall]:
    """`calls` without those identical (tool and arguments) to an earlier one."""
    seen: set[str] = set()
    distinct = []
    for call in calls:
        key = json.dumps([call.name, call.arguments], sort_keys=True, default=repr)
        if key not in seen:
            seen.add(key)
            distinct.append(call)
    return distinct


def _json_values(payload: str) -> list[Any] | None:
    """Every JSON value in `payload` (separated by whitespace, commas or semicolons)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    position = 0
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


# ------------------------------------------------------------------ tool choice
def choose_tools(
    tools: Sequence[ToolSpec], tool_choice: ToolChoice
) -> tuple[list[ToolSpec], str | None]:
    """The tools to offer under an OpenAI-style `tool_choice`, and the instruction that asks
    the model for a call (None when the model may answer in text).

    The decoder forces a required call by grammar (see `inference_safeguard.output_format`);
    the instruction tells the model why, so that it picks its arguments with care (the
    caller puts it in the system message), and a named tool is the only one offered:

    - `None`, `"auto"`, `False`: the tools as given; the model decides.
    - `"none"`: no tools offered.
    - `"any"`, `"required"`, `True`: every tool, and an instruction to call one of them
      (none without tools).
    - a tool name or `{"type": "function", "function": {"name": ...}}`: only that tool,
      and an instruction to call it.

    Raises:
        ValueError: a choice of another form, or one that names a tool not in `tools`.
    """
    if tool_choice in _OPEN_CHOICES:
        return list(tools), None
    if tool_choice == "none":
        return [], None
    if tool_choice in _ANY_CHOICES:
        instruction = "Answer by calling one of the tools you are given." if tools else None
        return list(tools), instruction
    name = _chosen_tool_name(tool_choice)
    chosen = [spec for spec in tools if spec.name == name]
    if not chosen:
        raise ValueError(
            f"tool_choice {tool_choice!r} names no offered tool: {name!r} is not one of the "
            f"bound tools {[spec.name for spec in tools]}"
        )
    return chosen, f"Answer by calling the tool {name}."


def with_system_instruction(prompt: Any, instruction: str) -> Any:
    """A chat prompt (message list) with `instruction` appended to its system message (one
    added first when there is none); any other prompt (plain text) as it is."""
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
        return prompt
    messages = [dict(m) if isinstance(m, Mapping) else m for m in prompt]
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system":
        content = first.get("content") or ""
        if isinstance(content, str):
            joined = f"{content}\n\n{instruction}" if content else instruction
            return [{**first, "content": joined}, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def call_is_required(tool_choice: ToolChoice) -> bool:
    """Whether `tool_choice` requires a tool call (`"any"`, `"required"`, `True`, a name)."""
    return tool_choice not in _OPEN_CHOICES and tool_choice != "none"


def _chosen_tool_name(tool_choice: ToolChoice) -> str:
    """The tool a `tool_choice` names (`"name"` or `{"function": {"name": ...}}`)."""
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function", tool_choice)
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise ValueError(
                f"tool_choice {dict(tool_choice)!r} names no tool; use "
                "{'type': 'function', 'function': {'name': <tool name>}}"
            )
        return name
    if not isinstance(tool_choice, str):
        raise ValueError(
            "tool_choice must be 'auto', 'none', 'any', 'required', a bool, a tool name or "
            f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}"
        )
    return tool_choice


# -------------------------------------------------------------------- streaming
class ToolCallHoldback:
    """Splits a streamed response into content that may be shown now and text held back.

    With tools offered, a response may hold tool calls, which parsing takes out of its
    content. `feed` releases content only once it cannot turn out to be part of a call:
    nothing of a response that starts like JSON (a bare or fenced call), nothing from a
    call marker on, no trailing prefix of a marker, and no trailing whitespace (parsed
    content is stripped). So the text released is a prefix of the final parsed content,
    and `finish` gives the rest of it.

    Args:
        tools: the tools offered; only calls of these count (as for `parse_tool_calls`).

    Attributes:
        text: the response so far.
        released: the content released so far.
        parsed: the response so far, parsed.
    """

    def __init__(self, tools: Sequence[ToolSpec] | None = None) -> None:
        self.tools = None if tools is None else list(tools)
        self.text = ""
        self.released = ""
        self.parsed = ParsedResponse(content="", tool_calls=[])

    def feed(self, delta: str) -> str:
        """Add a delta of the response; return the content released by it."""
        self.text += delta
        self.parsed = parse_tool_calls(self.text, self.tools)
        settled = _settled_content(self.text, self.parsed.content)
        if not settled.startswith(self.released):
            return ""
        new, self.released = settled[len(self.released) :], settled
        return new

    def finish(self, content: str) -> str:
        """The rest of the final `content` after what was released (empty if it diverged,
        as when the response was refused after some text was released)."""
        return content[len(self.released) :] if content.startswith(self.released) else ""


def _settled_content(text: str, content: str) -> str:
    """The part of a growing response's parsed `content` that is text for certain."""
    head = text.lstrip()
    # A bare JSON call, a list of them, or a fenced one ("```", maybe still arriving).
    if head.startswith(("{", "[")) or (head and "```".startswith(head[:3])):
        return ""
    partial = 0
    for marker in TOOL_CALL_MARKERS:
        for size in range(min(len(marker) - 1, len(content)), partial, -1):
            if content.endswith(marker[:size]):
                partial = size
                break
    # Whitespace before a call is dropped from the parsed content: release it only once
    # text follows it.
    return content[: len(content) - partial].rstrip()
