"""What a response must look like, as a grammar: structured output and tool calls.

A call's `response_format` (OpenAI's shapes, plus a regex and a Lark grammar) and its
tools under a `tool_choice` become one grammar in llguidance's format, which
`inference_safeguard.grammar` turns into a token mask at every sampling step:

- `{"type": "text"}` (or None): no grammar;
- `{"type": "json_object"}`: any JSON object;
- `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`
  (OpenAI's shape; `{"type": "json_schema", "schema": {...}}` too): JSON that validates
  against the schema;
- `{"type": "regex", "pattern": ...}`: text the regex (Rust `regex` syntax) matches whole;
- `{"type": "grammar", "lark": ...}`: text of a Lark grammar (llguidance's dialect).

Tool calls are written in the model's own format (`ToolCallFormat`, read from its chat
template), which `inference_safeguard.tools.parse_tool_calls` reads back. With a
`tool_choice` that requires a call (`"required"`, `"any"`, `True`, a tool name), the
response is one call (or several, with `parallel_tool_calls`) and nothing else; with
`"auto"`, the model may write text, and a call it starts is held to the grammar from its
opening marker on. Every call's arguments validate against the tool's JSON Schema.

JSON is written in one canonical layout (`", "` and `": "` separators, no other
whitespace), so a model cannot spend its tokens on whitespace. String contents are free
within the schema, so a response can still reach `max_new_tokens` before the JSON closes:
the search prefers responses that complete the grammar, and one that does not is
reported with `finish_reason="length"`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher

from inference_safeguard.errors import OutputFormatError
from inference_safeguard.tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolChoice,
    ToolSpec,
    call_is_required,
)

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance's JSON options: one canonical layout, as `json.dumps` writes it."""

FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model writes a tool call.

    Attributes:
        open: text before a call (also what starts one in free text).
        close: text after a call.
        arguments_key: the key of the arguments object ("arguments" or "parameters").
        as_list: the calls form one JSON list after `open` (Mistral's `[TOOL_CALLS]`).
    """

    open: str
    close: str
    arguments_key: str = "arguments"
    as_list: bool = False

    @classmethod
    def of(cls, chat_template: str | Mapping[str, str] | None) -> ToolCallFormat:
        """The format a chat template asks for: `[TOOL_CALLS][...]` (Mistral), bare JSON
        with "parameters" (Llama 3.1+, whose template renders tools but names no marker),
        else `<tool_call>{...}</tool_call>` (Hermes, Qwen, and the format the guard
        describes to a template that cannot render tools)."""
        if isinstance(chat_template, Mapping):
            source = "\0".join(chat_template.values())
        else:
            source = chat_template or ""
        if "[TOOL_CALLS]" in source:
            return cls(open="[TOOL_CALLS]", close="", as_list=True)
        if TOOL_CALL_OPEN in source or "tools" not in source:
            return cls(open=TOOL_CALL_OPEN, close=TOOL_CALL_CLOSE)
        key = "parameters" if '"parameters"' in source else "arguments"
        return cls(open="", close="", arguments_key=key)


@dataclass(frozen=True)
class OutputConstraint:
    """A grammar every response of a call must follow.

    Attributes:
        grammar: the grammar, in llguidance's format (see `LLMatcher`).
        description: what it asks for, for error messages.
    """

    grammar: str
    description: str


def output_constraint(
    response_format: Mapping[str, Any] | None,
    tools: Sequence[ToolSpec],
    tool_choice: ToolChoice,
    *,
    parallel_tool_calls: bool = True,
    call_format: ToolCallFormat | None = None,
    reasoning: tuple[str, str] | None = None,
    reasoning_opened: bool = False,
) -> OutputConstraint | None:
    """The grammar of a call, or None when its output is free.

    Args:
        response_format: the call's response format (see the module docstring).
        tools: the tools offered (after `tool_choice` picked them).
        tool_choice: OpenAI-style; a call is forced unless it is None/"auto"/False.
        parallel_tool_calls: False allows at most one call per response.
        call_format: the model's tool-call format (default: `<tool_call>` tags).
        reasoning: the model's reasoning markers `(open, close)`, if it has any: the
            response may start with a reasoning section (free text), and the grammar holds
            from after it.
        reasoning_opened: the prompt already opened the reasoning section, so the
            response starts inside it and must close it before its answer.

    Raises:
        OutputFormatError: a malformed response format, or a schema or pattern that
            cannot be compiled.
    """
    answer = _format_body(response_format)
    call_format = call_format or ToolCallFormat(TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
    if tools:
        forced = call_is_required(tool_choice)
        if answer is not None and not forced and answer[0] == "lark":
            raise OutputFormatError(
                "a Lark response_format cannot be combined with tools the model may call; "
                "use a json_schema or regex format, or force a call with tool_choice"
            )
        calls = _tool_call_rules(tools, call_format, parallel_tool_calls)
        if forced:
            rules, description = f"start: calls\n{calls}", "a tool call"
        elif answer is not None:
            rules = f"start: calls | answer\nanswer: {answer[1]}\n{calls}"
            description = f"a tool call or {_describe(response_format)}"
        else:
            rules = _free_text_with_calls(call_format, calls)
            description = "text or a tool call"
    elif answer is None:
        return None
    elif answer[0] == "lark":
        rules, description = answer[1], _describe(response_format)
    else:
        rules, description = f"start: answer\nanswer: {answer[1]}", _describe(response_format)
    if reasoning is not None:
        rules = _after_reasoning(rules, reasoning, opened=reasoning_opened)
    grammar = LLMatcher.grammar_from_lark("%llguidance {}\n" + rules)
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise OutputFormatError(
            f"cannot build a grammar for {description}: {error.splitlines()[0]}; remove or "
            "rewrite that part of the schema or pattern (a JSON Schema keyword the grammar "
            "cannot enforce is ignored without strict=True)"
        )
    return OutputConstraint(grammar=grammar, description=description)


def check_response_format(value: Any) -> dict[str, Any] | None:
    """`value` as a response-format dict, checked for shape (not compiled).

    Raises:
        ValueError: not one of the shapes of the module docstring.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping) or value.get("type") not in FORMAT_TYPES:
        raise ValueError(
            f"response_format must be a dict whose 'type' is one of {', '.join(FORMAT_TYPES)}, "
            f"e.g. {{'type': 'json_schema', 'json_schema': {{'name': 'answer', 'schema': "
            f"{{...}}}}}}; got {value!r}"
        )
    kind = value["type"]
    if kind == "json_schema":
        _schema_of(value)
    elif kind == "regex" and not isinstance(value.get("pattern"), str):
        raise ValueError("a regex response_format needs a 'pattern' string")
    elif kind == "grammar" and not isinstance(value.get("lark"), str):
        raise ValueError("a grammar response_format needs a 'lark' string (a Lark grammar)")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"response_format must be plain JSON data: {error}") from None
    return dict(value)


def strict_schema(schema: Any) -> Any:
    """`schema` under OpenAI's strict mode: every object that lists properties allows no
    others (`additionalProperties: false` where it is not set)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    strict = {key: strict_schema(value) for key, value in schema.items()}
    if "properties" in strict and "additionalProperties" not in strict:
        strict["additionalProperties"] = False
    return strict


# ------------------------------------------------------------------ internals
def _format_body(response_format: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """`(kind, rule body)` of a response format: a `%json` schema, a regex terminal, or a
    whole Lark grammar ("lark"); None for free text."""
    checked = _checked(response_format)
    if checked is None or checked["type"] == "text":
        return None
    kind = checked["type"]
    if kind == "json_object":
        return "json", _json_rule({"type": "object"})
    if kind == "json_schema":
        schema, strict = _schema_of(checked)
        return "json", _json_rule(strict_schema(schema) if strict else schema, lenient=not strict)
    if kind == "regex":
        return "regex", _regex_terminal(checked["pattern"])
    return "lark", checked["lark"]


def _checked(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None:
    try:
        return check_response_format(response_format)
    except ValueError as error:
        raise OutputFormatError(str(error)) from None


def _schema_of(response_format: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The JSON Schema and strictness of a json_schema response format."""
    spec = response_format.get("json_schema", response_format)
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        raise ValueError(
            "a json_schema response_format needs a schema: {'type': 'json_schema', "
            "'json_schema': {'name': ..., 'schema': {...}}}"
        )
    return dict(schema), bool(spec.get("strict", False))


def _describe(response_format: Mapping[str, Any] | None) -> str:
    kind = (response_format or {}).get("type", "text")
    return {
        "json_object": "a JSON object",
        "json_schema": "JSON that fits the schema",
        "regex": "text that matches the pattern",
        "grammar": "text of the grammar",
    }.get(kind, "text")


def _json_rule(schema: Mapping[str, Any], *, lenient: bool = False) -> str:
    """A `%json` rule body for `schema`, in the canonical layout."""
    options = {**JSON_LAYOUT, "lenient": lenient}
    body = {**schema, "x-guidance": {**options, **schema.get("x-guidance", {})}}
    return "%json " + json.dumps(body, ensure_ascii=False)


def _regex_terminal(pattern: str) -> str:
    # Inside /.../ a slash ends the terminal, so it is escaped.
    return "/" + pattern.replace("\\/", "/").replace("/", "\\/") + "/"


def _tool_call_rules(tools: Sequence[ToolSpec], call_format: ToolCallFormat, parallel: bool) -> str:
    """Rules `calls` (one or more calls, the forced form) and `call_body` (one call's JSON)."""
    options = []
    definitions: dict[str, Any] = {}
    for index, tool in enumerate(tools):
        arguments, found = _hoist_definitions(_arguments_schema(tool), f"tool{index}_")
        definitions.update(found)
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, call_format.arguments_key: arguments},
                "required": ["name", call_format.arguments_key],
                "additionalProperties": False,
            }
        )
    one: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    if definitions:
        one = {**one, "$defs": definitions}
    # Unknown schema keywords are ignored unless a tool is strict.
    lenient = not any(tool.strict for tool in tools)
    if call_format.as_list:
        defs = {"$defs": one.pop("$defs")} if "$defs" in one else {}
        items = {
            "type": "array",
            "items": one,
            "minItems": 1,
            **({} if parallel else {"maxItems": 1}),
            **defs,
        }
        body = _json_rule(items, lenient=lenient)
        return f"calls: {_text(call_format.open)} call_body\ncall_body: {body}\n"
    call = " ".join(
        part
        for part in (
            _text(call_format.open),
            '"\\n"?' if call_format.open else "",
            "call_body",
            '"\\n"?' if call_format.close else "",
            _text(call_format.close),
        )
        if part
    )
    repeat = ' ("\\n" call)*' if parallel else ""
    body = _json_rule(one, lenient=lenient)
    return f"calls: call{repeat}\ncall: {call}\ncall_body: {body}\n"


def _free_text_with_calls(call_format: ToolCallFormat, calls: str) -> str:
    """Text in which calls may appear; each call is held to the grammar from its opening
    marker on (a lazy lexeme ends the text at the first marker)."""
    if not call_format.open:  # bare JSON: a response that starts with "{" is a call
        return f"start: TEXT | calls\nTEXT: /[^{{](.|\\n)*/\n{calls}"
    return (
        "start: (text_then_open rest_of_call)* TEXT\n"
        "TEXT: /(.|\\n)*/\n"
        f"text_then_open[lazy]: TEXT {_text(call_format.open)}\n"
        f"{_rest_of_call(call_format, calls)}"
    )


def _rest_of_call(call_format: ToolCallFormat, calls: str) -> str:
    """Rule `rest_of_call`: a call after its opening marker."""
    if call_format.as_list:
        return f"rest_of_call: call_body\n{calls}"
    close = f' "\\n"? {_text(call_format.close)}' if call_format.close else ""
    return f'rest_of_call: "\\n"? call_body{close}\n{calls}'


def _after_reasoning(rules: str, markers: tuple[str, str], *, opened: bool) -> str:
    """`rules` after a reasoning section (`markers` around free text) and the whitespace
    that follows it: one the prompt opened (`opened`) must close first; otherwise the
    response may open one, or start with its answer."""
    start, close = markers
    renamed = rules.replace("start:", "answer_start:", 1)
    head = "reasoning AFTER_REASONING?"
    if not opened:
        head = f"({_text(start)} {head})?"
    return (
        f"start: {head} answer_start\n"
        "REASONING_TEXT: /(.|\\n)*/\n"
        "AFTER_REASONING: /[ \\t\\r\\n]+/\n"
        f"reasoning[lazy]: REASONING_TEXT {_text(close)}\n{renamed}"
    )


def _arguments_schema(tool: ToolSpec) -> dict[str, Any]:
    """A tool's arguments schema: an object, whatever the spec left out, that takes no
    argument it does not list (a function cannot take them)."""
    schema = dict(tool.parameters) if tool.parameters else {}
    if "type" not in schema and not any(k in schema for k in ("anyOf", "oneOf", "allOf", "$ref")):
        schema["type"] = "object"
    return strict_schema(schema)


def _hoist_definitions(
    schema: dict[str, Any], prefix: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`schema` without its `$defs`/`definitions`, and those definitions renamed with
    `prefix`, its local references rewritten to match: a schema nested in a larger one
    (a tool's arguments in a call) resolves `#/$defs/...` against the larger one's root."""
    found: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        for name, definition in (schema.get(key) or {}).items():
            found[f"{prefix}{name}"] = definition
    if not found:
        return schema, {}

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        if not isinstance(node, Mapping):
            return node
        out = {}
        for key, value in node.items():
            if key in ("$defs", "definitions") and node is schema:
                continue
            if key == "$ref" and isinstance(value, str):
                for root in ("#/$defs/", "#/definitions/"):
                    if value.startswith(root):
                        value = f"#/$defs/{prefix}{value[len(root) :]}"
            out[key] = rewrite(value)
        return out

    return rewrite(schema), {name: rewrite(d) for name, d in found.items()}


def _text(literal: str) -> str:
    """A Lark string literal."""
    return json.dumps(literal, ensure_ascii=False)
