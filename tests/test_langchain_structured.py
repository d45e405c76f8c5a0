"""ChatSafeguard tool calling and structured output through the grammar-constrained search
of the tiny random-weight Llama: the grammar alone makes its tool calls and JSON fit
their schemas, so every call and object is checked against its JSON Schema.

The schemas are small (enums, bounded integers, booleans, short strings) and
`max_tokens` generous, so that responses complete: the tiny tokenizer spells JSON out in
many tokens.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import jsonschema
import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_helpers import count_searches
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from inference_safeguard import GuardConfig, InferenceGuard, UnsafeGenerationError
from inference_safeguard.errors import OutputFormatError
from inference_safeguard.scorers import CallableScorer, KeywordCost
from inference_safeguard.testing import build_tiny_llama
from langchain_safeguard import ChatSafeguard, SafeguardLLM
from langchain_safeguard._batching import planned

CONFIG = GuardConfig(num_candidates=4, beam_width=2, block_size=8, max_new_tokens=160)
PROMPTS = ["What is the weather in Paris?", "Rate the film.", "What time is it in Rome?"]


@tool
def get_weather(city: Literal["Paris", "Rome"], unit: Literal["c", "f"]) -> str:
    """The weather in a city."""
    return f"Sunny in {city}"


@tool
def get_time(zone: Literal["CET", "UTC"], exact: bool) -> str:
    """The time in a time zone."""
    return f"Noon {zone}"


TOOLS: list[BaseTool] = [get_weather, get_time]


class Rating(BaseModel):
    """A rating of a film."""

    stars: int = Field(ge=1, le=5, description="How good, 1 to 5.")
    liked: bool = Field(description="Whether the viewer liked it.")
    mood: Literal["happy", "sad"]
    note: str = Field(max_length=6, description="A word about it.")


class RatingDict(TypedDict):
    """A rating of a film."""

    stars: Annotated[int, ..., "How good, 1 to 5."]
    liked: Annotated[bool, ..., "Whether the viewer liked it."]
    mood: Literal["happy", "sad"]


RATING_SCHEMA: dict[str, Any] = {
    "title": "Rating",
    "description": "A rating of a film.",
    "type": "object",
    "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "liked": {"type": "boolean"},
        "mood": {"enum": ["happy", "sad"]},
    },
    "required": ["stars", "liked", "mood"],
}
SCHEMAS: dict[str, Any] = {
    "pydantic": Rating,
    "typeddict": RatingDict,
    "json_schema": RATING_SCHEMA,
}


@pytest.fixture(scope="module")
def long_context_model(tiny_tokenizer):
    """A tiny Llama with a window that fits tool schemas spelled out by the tiny tokenizer."""
    return build_tiny_llama(tiny_tokenizer, max_position_embeddings=2048)


@pytest.fixture()
def guard(long_context_model, tiny_tokenizer) -> InferenceGuard:
    return InferenceGuard(
        long_context_model, tiny_tokenizer, cost=KeywordCost(["bomb"]), config=CONFIG
    )


@pytest.fixture()
def chat(guard) -> ChatSafeguard:
    return ChatSafeguard(guard=guard, seed=0)


def refusing_chat(guard: InferenceGuard, on_unsafe: str) -> ChatSafeguard:
    """A chat model whose cost model rejects every response but the refusal (with no
    resampling, which could not help)."""
    refusal = GuardConfig().refusal_text
    cost = CallableScorer(lambda prompt, response: float(response != refusal), batched=False)
    other = InferenceGuard(guard.lm.model, guard.lm.tokenizer, cost=cost, config=CONFIG)
    return ChatSafeguard(guard=other, seed=0, on_unsafe=on_unsafe, resample_rounds=0)


def assert_valid_calls(message: AIMessage, tools: list[BaseTool]) -> None:
    """`message` holds at least one tool call, each of a tool in `tools` with arguments
    that validate against its schema, and nothing else (but, in a response that reached
    `max_tokens`, one last call cut short)."""
    schemas = {t.name: convert_to_openai_tool(t)["function"]["parameters"] for t in tools}
    assert message.tool_calls, message
    if message.response_metadata["finish_reason"] == "length":
        assert len(message.invalid_tool_calls) <= 1
    else:
        assert message.invalid_tool_calls == []
    assert message.text == ""  # a forced call is the whole response
    for call in message.tool_calls:
        assert call["name"] in schemas
        jsonschema.validate(call["args"], schemas[call["name"]])


def assert_fits(value: Any, schema: Any) -> None:
    """`value` is an instance of a pydantic `schema`, else a dict; either way its data
    validates against the schema's JSON Schema."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        assert isinstance(value, schema)
        value = value.model_dump()
    assert isinstance(value, dict)
    jsonschema.validate(value, convert_to_json_schema(schema))


# ------------------------------------------------------------------- tool calls
@pytest.mark.parametrize("choice", ["any", "required", True])
def test_a_required_tool_choice_forces_a_call_that_fits_the_schema(chat, choice):
    model = chat.bind_tools(TOOLS, tool_choice=choice, parallel_tool_calls=False)
    message = model.invoke(PROMPTS[0])
    assert_valid_calls(message, TOOLS)
    assert len(message.tool_calls) == 1
    assert message.response_metadata["finish_reason"] == "stop"  # the grammar ended it


@pytest.mark.parametrize(
    "choice", ["get_time", {"type": "function", "function": {"name": "get_time"}}]
)
def test_a_named_tool_choice_forces_calls_of_that_tool(chat, choice):
    message = chat.bind_tools(TOOLS, tool_choice=choice, parallel_tool_calls=False).invoke("Hi")
    assert_valid_calls(message, [get_time])


def test_parallel_calls_each_fit_their_schemas(chat):
    # A random model rarely chooses to stop after a call, so this one writes calls
    # until max_tokens; all but a last one cut short are complete.
    message = chat.bind_tools(TOOLS, tool_choice="any").invoke(PROMPTS[0])
    assert_valid_calls(message, TOOLS)


def test_parallel_tool_calls_false_gives_one_call_per_response(chat):
    model = chat.bind_tools(TOOLS, tool_choice="any", parallel_tool_calls=False)
    for message in model.batch(PROMPTS):
        assert_valid_calls(message, TOOLS)
        assert len(message.tool_calls) == 1
        assert message.response_metadata["finish_reason"] == "stop"


def test_tool_choice_none_offers_no_tools(chat):
    message = chat.bind_tools(TOOLS, tool_choice="none").invoke(PROMPTS[0])
    assert message.tool_calls == [] and message.invalid_tool_calls == []


def test_streamed_forced_calls_aggregate_into_valid_calls(chat):
    model = chat.bind_tools(TOOLS, tool_choice="any", parallel_tool_calls=False)
    chunks = list(model.stream(PROMPTS[0]))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    assert all("<tool_call>" not in chunk.text for chunk in chunks)
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert_valid_calls(full, TOOLS)


async def test_async_forced_calls_fit_the_schemas(chat):
    model = chat.bind_tools(TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert_valid_calls(await model.ainvoke(PROMPTS[0]), TOOLS)
    for message in await model.abatch(PROMPTS[:2]):
        assert_valid_calls(message, TOOLS)


def test_strict_marks_every_tool_strict(chat):
    bound = chat.bind_tools(TOOLS, strict=True)
    for formatted in bound.kwargs["tools"]:  # type: ignore[attr-defined]
        function = formatted["function"]
        assert function["strict"] is True
        assert function["parameters"]["additionalProperties"] is False
        assert set(function["parameters"]["required"]) == set(function["parameters"]["properties"])
    model = chat.bind_tools(TOOLS, strict=True, tool_choice="any", parallel_tool_calls=False)
    assert_valid_calls(model.invoke("Hi"), TOOLS)


def test_strict_tools_reject_schema_keywords_the_grammar_cannot_enforce(chat):
    tags = {
        "type": "function",
        "function": {
            "name": "tag",
            "description": "Tag a text.",
            "parameters": {
                "type": "object",
                "properties": {
                    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True}
                },
                "required": ["tags"],
            },
        },
    }
    with pytest.raises(OutputFormatError, match="uniqueItems"):
        chat.bind_tools([tags], strict=True, tool_choice="tag").invoke("Tag it.")
    model = chat.bind_tools([tags], tool_choice="tag", parallel_tool_calls=False)
    message = model.invoke("Tag it.")
    assert [call["name"] for call in message.tool_calls] == ["tag"]  # uniqueItems ignored


def test_bad_call_shapes_fail_before_decoding(chat, guard, monkeypatch):
    searches = count_searches(guard, monkeypatch)
    with pytest.raises(ValueError, match="needs tools"):
        chat.invoke("Hi", tool_choice="any")
    with pytest.raises(ValueError, match="not one of the bound tools"):
        chat.bind_tools(TOOLS).invoke("Hi", tool_choice="teleport")
    with pytest.raises(ValueError, match="response_format"):
        chat.invoke("Hi", response_format={"type": "xml"})
    assert searches == []


# ----------------------------------------------------------- structured output
@pytest.mark.parametrize("schema_kind", list(SCHEMAS))
@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_output_fits_the_schema(chat, method, schema_kind):
    schema = SCHEMAS[schema_kind]
    assert_fits(chat.with_structured_output(schema, method=method).invoke(PROMPTS[1]), schema)


def test_json_schema_method_asks_for_json_not_a_call(chat):
    bound = chat.with_structured_output(RatingDict, method="json_schema").first
    response_format = bound.kwargs["response_format"]  # type: ignore[attr-defined]
    assert response_format["json_schema"]["schema"]["additionalProperties"] is False
    structured = chat.with_structured_output(RatingDict, method="json_schema", include_raw=True)
    out = structured.invoke("Hi")
    assert out["parsing_error"] is None
    assert out["raw"].tool_calls == []
    assert_fits(out["parsed"], RatingDict)
    assert out["raw"].text.startswith("{")  # the JSON itself, in the canonical layout


def test_strict_structured_output_is_strict_json_schema(chat):
    structured = chat.with_structured_output(Rating, method="json_schema", strict=True)
    response_format = structured.first.kwargs["response_format"]  # type: ignore[attr-defined]
    assert response_format["json_schema"]["strict"] is True
    assert response_format["json_schema"]["schema"]["required"] == list(Rating.model_fields)
    assert_fits(structured.invoke(PROMPTS[1]), Rating)
    by_call = chat.with_structured_output(Rating, strict=True)
    bound_tools = by_call.first.kwargs["tools"]  # type: ignore[attr-defined]
    assert bound_tools[0]["function"]["strict"] is True


def test_json_mode_returns_a_json_object(chat):
    value = chat.with_structured_output(method="json_mode").invoke(PROMPTS[1])
    assert isinstance(value, dict)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_output_batches_in_one_search(chat, guard, monkeypatch, method):
    searches = count_searches(guard, monkeypatch)
    values = chat.with_structured_output(Rating, method=method).batch(PROMPTS)
    assert searches == [len(PROMPTS)]
    for value in values:
        assert_fits(value, Rating)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_output_streams_the_whole_object(chat, method):
    values = list(chat.with_structured_output(RATING_SCHEMA, method=method).stream(PROMPTS[1]))
    assert values
    for value in values:
        assert_fits(value, RATING_SCHEMA)


async def test_async_structured_output_fits_the_schema(chat):
    structured = chat.with_structured_output(Rating, method="json_schema")
    assert_fits(await structured.ainvoke(PROMPTS[1]), Rating)
    for value in await structured.abatch(PROMPTS[:2]):
        assert_fits(value, Rating)
    async for value in structured.astream(PROMPTS[1]):
        assert_fits(value, Rating)


# ---------------------------------------------------------------- no answer
@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_a_refusal_is_never_returned_as_the_object(guard, method):
    chat = refusing_chat(guard, "refuse")
    with pytest.raises(OutputParserException, match="refused"):
        chat.with_structured_output(Rating, method=method).invoke(PROMPTS[1])
    out = chat.with_structured_output(Rating, method=method, include_raw=True).invoke("Hi")
    assert out["parsed"] is None
    assert isinstance(out["parsing_error"], OutputParserException)
    assert out["raw"].text == GuardConfig().refusal_text
    assert out["raw"].response_metadata["safety"]["refused"] is True


def test_a_refused_forced_call_is_the_refusal_text_without_calls(guard):
    chat = refusing_chat(guard, "refuse")
    message = chat.bind_tools(TOOLS, tool_choice="any", parallel_tool_calls=False).invoke("Hi")
    assert message.tool_calls == []
    assert message.text == GuardConfig().refusal_text
    assert message.response_metadata["safety"]["refused"] is True


def test_on_unsafe_return_and_raise_apply_to_structured_output(guard):
    out = (
        refusing_chat(guard, "return")
        .with_structured_output(Rating, include_raw=True)
        .invoke(PROMPTS[1])
    )
    assert_fits(out["parsed"], Rating)  # returned as asked, flagged in the safety record
    assert out["raw"].response_metadata["safety"]["safe"] is False
    with pytest.raises(UnsafeGenerationError):
        refusing_chat(guard, "raise").with_structured_output(Rating).invoke(PROMPTS[1])


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_a_response_cut_by_max_tokens_fails_to_parse_clearly(guard, method):
    chat = ChatSafeguard(guard=guard, seed=0, max_tokens=6)
    structured = chat.with_structured_output(Rating, method=method, include_raw=True)
    out = structured.invoke(PROMPTS[1])
    assert out["parsed"] is None
    assert out["raw"].response_metadata["finish_reason"] == "length"
    assert "reached max_tokens (6 tokens)" in str(out["parsing_error"])
    with pytest.raises(OutputParserException, match="raise max_tokens"):
        chat.with_structured_output(Rating, method=method).invoke(PROMPTS[1])


# ------------------------------------------------------------ formats and plans
def test_response_format_is_a_per_call_keyword(chat):
    digits = {"type": "regex", "pattern": "[0-9]{4}"}
    assert re.fullmatch("[0-9]{4}", chat.invoke(PROMPTS[0], response_format=digits).text)
    for message in chat.batch(PROMPTS, response_format=digits):
        assert re.fullmatch("[0-9]{4}", message.text)


def test_a_batch_plan_never_serves_a_call_of_another_format(chat, guard, monkeypatch):
    plan = chat._plan_inputs(PROMPTS[:2], {"response_format": {"type": "json_object"}})
    searches = count_searches(guard, monkeypatch)
    with planned(plan):
        message = chat.invoke(PROMPTS[0], response_format={"type": "regex", "pattern": "[ab]{3}"})
    assert re.fullmatch("[ab]{3}", message.text)
    assert searches == [1]  # decoded alone, not by the JSON plan


def test_the_text_llm_takes_a_response_format_per_call(guard):
    llm = SafeguardLLM(guard=guard, seed=0)
    digits = {"type": "regex", "pattern": "[0-9]{4}"}
    assert re.fullmatch("[0-9]{4}", llm.invoke("The year is ", response_format=digits))
    with pytest.raises(TypeError, match="unexpected keyword 'tool_choice'"):
        llm.invoke("Hi", tool_choice="any")
