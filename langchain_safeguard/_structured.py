"""Structured output for `ChatSafeguard`: the response format of a schema, the instruction
that tells the model what the grammar will hold it to, and the parser of the answer.

The grammar (see `inference_safeguard.output_format`) makes every complete response fit
the schema, but two responses are no answer at all and must not be parsed as one: a
refusal (the response went over the safety budget and was replaced by the refusal
text) and a response cut by `max_tokens` before its JSON closed. The parser raises
`OutputParserException` for both, saying which, so that `include_raw=True` reports them
as parsing errors with the raw message (and its safety record) beside them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass

from inference_safeguard.output_format import strict_schema

JSON_ONLY = "Answer with a single JSON object and nothing else."
"""What a json_object response format asks of the model: the grammar allows any object,
so only the prompt can say which keys it should have."""


def json_schema_format(schema: dict[str, Any] | type, strict: bool | None) -> dict[str, Any]:
    """The `response_format` of `schema` (pydantic model, TypedDict, JSON Schema or OpenAI
    tool dict): `{"type": "json_schema", "json_schema": {"name", "schema"[, "strict"]}}`.

    Every object of the schema that lists its properties allows no others, as a tool's
    arguments do: the answer is parsed into the schema, so extra keys would be dropped,
    and a model free to add them can spend its tokens on keys until `max_tokens` cuts
    the JSON short. `strict=True` also makes every property required (LangChain's
    conversion, as OpenAI's strict mode) and a schema keyword the grammar cannot enforce
    an error instead of being ignored.
    """
    json_schema = strict_schema(convert_to_json_schema(schema, strict=strict))
    spec: dict[str, Any] = {"name": json_schema.get("title") or "answer", "schema": json_schema}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


def format_instruction(response_format: Mapping[str, Any] | None) -> str | None:
    """The system-message instruction of a response format, or None.

    The grammar decides the shape of the answer token by token, but the model writes
    better values when it knows the shape (and the field descriptions, which a grammar
    cannot carry) from the start, as an API model's provider tells it.
    """
    kind = (response_format or {}).get("type")
    if kind == "json_object":
        return JSON_ONLY
    if kind == "json_schema":
        assert response_format is not None  # a type was read from it
        spec = response_format.get("json_schema", response_format)
        schema = json.dumps(spec["schema"], ensure_ascii=False)
        return f"Answer with a single JSON object that fits this JSON Schema:\n{schema}"
    return None


def structured_parser(
    schema: dict[str, Any] | type | None, *, tool_name: str | None = None
) -> Callable[[AIMessage], Any]:
    """A parser of a structured answer: the arguments of the first call of `tool_name`, or
    (without one) the JSON object the response is; an instance of `schema` when it is a
    pydantic model, else a dict.

    The parser raises `OutputParserException` for a refused response, for one cut by
    `max_tokens` before its JSON was complete, and for one that holds no such call, is
    no JSON object, or does not validate against a pydantic `schema`.
    """
    what = f"call of {tool_name}" if tool_name is not None else "JSON object"
    # A pydantic model (v2, or v1's from pydantic.v1), or None.
    model: Any = schema if isinstance(schema, type) and is_basemodel_subclass(schema) else None

    def parse(message: AIMessage) -> Any:
        _check_answered(message, what)
        if tool_name is not None:
            data = _call_arguments(message, tool_name)
        else:
            data = _json_object(message)
        if model is None:
            return data
        validate = getattr(model, "model_validate", None) or model.parse_obj
        try:
            return validate(data)
        except Exception as error:  # pydantic's ValidationError, v1 or v2
            raise OutputParserException(
                f"the response does not fit {model.__name__}: {error}", llm_output=message.text
            ) from error

    return parse


def _check_answered(message: AIMessage, what: str) -> None:
    """Raise `OutputParserException` if `message` is a refusal, or was cut by `max_tokens`
    before it was complete."""
    metadata = message.response_metadata
    safety = metadata.get("safety") or {}
    if safety.get("refused"):
        raise OutputParserException(
            f"the response was refused: it stayed over the safety budget (cost "
            f"{safety.get('cost')} > budget {safety.get('budget')}), so its text is the "
            f"refusal, not a {what}; pass include_raw=True to get the refusal message",
            llm_output=message.text,
        )
    if metadata.get("finish_reason") == "length" and not _complete(message, what):
        tokens = message.usage_metadata["output_tokens"] if message.usage_metadata else "?"
        raise OutputParserException(
            f"the response reached max_tokens ({tokens} tokens) before its {what} was "
            "complete (finish_reason='length'); raise max_tokens",
            llm_output=message.text,
        )


def _complete(message: AIMessage, what: str) -> bool:
    """Whether a response that ran to the token limit still holds a complete answer."""
    if what.startswith("call"):
        return bool(message.tool_calls)
    try:
        _json_object(message)
    except OutputParserException:
        return False
    return True


def _call_arguments(message: AIMessage, tool_name: str) -> dict[str, Any]:
    for call in message.tool_calls:
        if call["name"] == tool_name:
            return call["args"]
    problems = "; ".join(str(c.get("error")) for c in message.invalid_tool_calls)
    raise OutputParserException(
        f"the response holds no call of {tool_name}" + (f" ({problems})" if problems else ""),
        llm_output=message.text,
    )


def _json_object(message: AIMessage) -> Any:
    """The JSON value the response is (a fence around it is allowed), strictly: unlike
    LangChain's partial-JSON parsers, a cut-off object is an error, not a smaller object."""
    text = message.text.strip()
    if text.startswith("```"):
        text = text.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise OutputParserException(
            f"the response is not JSON: {error}", llm_output=message.text
        ) from error
