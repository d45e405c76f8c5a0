"""Structured output for `SafeguardLLM`: the output class's JSON Schema as a grammar.

`structured_predict` and its async and streaming forms decode under a `json_schema`
`response_format` built from the output class, so the search can only sample JSON that
fits it, and the model is shown the schema so that it fills the fields with care. What
can still keep a response from being an object is outside the grammar, and raises a
`StructuredOutputError` rather than returning something else in its place:

- the search refused the response (over the safety budget, `on_unsafe="refuse"`): the
  refusal text is not an object of the class (`StructuredOutputRefusedError`);
- the response reached `max_new_tokens` before its JSON closed;
- a check of the class that JSON Schema cannot state (a validator) failed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole, TextBlock
from pydantic import BaseModel, ValidationError

from inference_safeguard.errors import SafeguardError

Model = TypeVar("Model", bound=BaseModel)


class StructuredOutputError(SafeguardError, ValueError):
    """A structured prediction's response is not an object of its output class.

    A `ValueError`, as LlamaIndex's own structured-output failures are.

    Attributes:
        response: the chat response that did not give an object (its `raw["safety"]`
            holds the safety record).
    """

    def __init__(self, message: str, response: ChatResponse) -> None:
        super().__init__(message)
        self.response = response


class StructuredOutputRefusedError(StructuredOutputError):
    """The search found no response within the safety budget and refused
    (`on_unsafe="refuse"`), so there is no object to return."""


def json_schema_format(output_cls: type[BaseModel]) -> dict[str, Any]:
    """The strict `json_schema` response format of `output_cls`: strict, so that the
    grammar allows no key the class does not declare."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": output_cls.__name__,
            "schema": output_cls.model_json_schema(),
            "strict": True,
        },
    }


def with_schema_instruction(
    messages: Sequence[ChatMessage], output_cls: type[BaseModel]
) -> list[ChatMessage]:
    """`messages` with the system message asking for JSON that fits the class's schema
    (one added first when there is none): the grammar fixes the keys, and the schema's
    descriptions tell the model what to put under them."""
    schema = json.dumps(output_cls.model_json_schema(), ensure_ascii=False)
    instruction = f"Answer with a JSON object that fits this JSON Schema:\n{schema}"
    messages = list(messages)
    if messages and messages[0].role == MessageRole.SYSTEM:
        first = messages[0]
        content = first.content or ""
        joined = f"{content}\n\n{instruction}" if content else instruction
        system = first.model_copy(update={"blocks": [TextBlock(text=joined)]})
        return [system, *messages[1:]]
    return [ChatMessage(role=MessageRole.SYSTEM, content=instruction), *messages]


def parse_object(response: ChatResponse, output_cls: type[Model]) -> Model:
    """The object of a finished structured response.

    Raises:
        StructuredOutputRefusedError: the response is a refusal.
        StructuredOutputError: the JSON did not close within `max_new_tokens`, or the
            class rejects it.
    """
    safety = response.additional_kwargs.get("safety") or {}
    name = output_cls.__name__
    if safety.get("refused"):
        raise StructuredOutputRefusedError(
            f"the search refused to answer (no {name} within the safety budget: cost "
            f"{safety.get('cost')} > budget {safety.get('budget')}), so there is no {name} "
            "to return; raise num_candidates or resample_rounds to search further, set "
            "on_unsafe='return' to accept the over-budget object, or on_unsafe='raise' "
            "for an UnsafeGenerationError that carries the result",
            response,
        )
    text = response.message.content or ""
    try:
        return output_cls.model_validate_json(text)
    except ValidationError as error:
        if response.additional_kwargs.get("finish_reason") == "length":
            message = (
                f"the response reached max_new_tokens before its {name} JSON closed: "
                f"{text[:200]!r}; raise max_new_tokens, or bound the schema's strings and "
                "lists (max_length) so an object fits"
            )
        else:
            message = (
                f"the response does not validate as {name}: {error}; the grammar enforces "
                "the JSON Schema only, so check the class's validators"
            )
        raise StructuredOutputError(message, response) from error
