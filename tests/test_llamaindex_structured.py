"""Structured output through SafeguardLLM: `structured_predict` in all its forms and
`as_structured_llm` decode under the output class's JSON Schema, so that even the random
tiny model returns objects that validate; a refusal or a cut-off object raises a typed
error instead of standing in for the object."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.prompts import PromptTemplate
from llama_index.core.types import PydanticProgramMode
from pydantic import BaseModel, Field

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.errors import UnsafeGenerationError
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.testing import ScriptedGuard, build_tiny_llama, build_tiny_tokenizer
from llamaindex_safeguard import SafeguardLLM, StructuredOutputError, StructuredOutputRefusedError


class Song(BaseModel):
    """A song and the year it came out."""

    title: str = Field(max_length=24, description="The song's title.")
    year: int = Field(ge=1900, le=2030)


class Playlist(BaseModel):
    """A named list of songs (nested models: the schema has $defs)."""

    name: str = Field(max_length=12)
    songs: list[Song] = Field(min_length=1, max_length=2)


class Note(BaseModel):
    """Free text with no bound: a random model does not end it."""

    text: str


PROMPT = PromptTemplate("Name a song about {topic}.")


def valid(obj: BaseModel) -> BaseModel:
    """`obj`, after checking its JSON against its class's JSON Schema."""
    jsonschema.validate(json.loads(obj.model_dump_json()), type(obj).model_json_schema())
    return obj


@pytest.fixture(scope="module")
def long_model(tiny_tokenizer):
    return build_tiny_llama(tiny_tokenizer, seed=0, max_position_embeddings=4096)


@pytest.fixture()
def searching(long_model, tiny_tokenizer):
    """`searching(cost=None, tokenizer=None, **config)`: a SafeguardLLM over a real search
    on the random tiny model."""

    def build(cost=None, tokenizer=None, **config: object) -> SafeguardLLM:
        settings = {"num_candidates": 4, "beam_width": 2, "block_size": 8, "max_new_tokens": 96}
        guard = InferenceGuard(
            long_model,
            tokenizer or tiny_tokenizer,
            cost=cost or KeywordCost(["bomb"]),
            config=GuardConfig(**{**settings, "seed": 0, **config}),
        )
        return SafeguardLLM(guard=guard)

    return build


# ------------------------------------------------------------------ the grammar
@pytest.mark.parametrize("output_cls", [Song, Playlist])
def test_structured_predict_returns_an_object_that_validates(searching, output_cls):
    obj = searching().structured_predict(output_cls, PROMPT, topic="rain")
    assert isinstance(valid(obj), output_cls)


async def test_astructured_predict_returns_an_object_that_validates(searching):
    song = await searching().astructured_predict(Song, PROMPT, topic="rain")
    assert isinstance(valid(song), Song)


def test_stream_structured_predict_ends_with_the_object(searching):
    llm = searching()
    *partials, last = list(llm.stream_structured_predict(Song, PROMPT, topic="rain"))
    assert partials  # the JSON arrives as the search commits it
    assert isinstance(valid(last), Song)
    assert last == llm.structured_predict(Song, PROMPT, topic="rain")  # seeded: same search


async def test_astream_structured_predict_ends_with_the_object(searching):
    stream = await searching().astream_structured_predict(Song, PROMPT, topic="rain")
    objects = [obj async for obj in stream]
    assert isinstance(valid(objects[-1]), Song)


def test_as_structured_llm_goes_through_the_same_grammar(searching):
    structured = searching().as_structured_llm(Song)
    message = ChatMessage(role=MessageRole.USER, content="Name a song about rain.")
    response = structured.chat([message])
    assert isinstance(valid(response.raw), Song)
    assert Song.model_validate_json(response.message.content) == response.raw
    last = list(structured.stream_chat([message]))[-1]
    assert isinstance(valid(last.raw), Song)


def test_a_base_model_without_a_chat_template_is_held_to_the_schema_too(searching):
    llm = searching(tokenizer=build_tiny_tokenizer(chat_template=False))
    assert isinstance(valid(llm.structured_predict(Song, PROMPT, topic="rain")), Song)


# --------------------------------------------------------------- what it raises
def test_a_refusal_raises_instead_of_standing_in_for_the_object(searching):
    llm = searching(cost=KeywordCost(["{"]))  # every JSON object is over budget
    with pytest.raises(StructuredOutputRefusedError, match="on_unsafe='return'") as raised:
        llm.structured_predict(Song, PROMPT, topic="rain")
    assert raised.value.response.additional_kwargs["safety"]["refused"]
    assert raised.value.response.message.content == llm.guard.config.refusal_text
    with pytest.raises(StructuredOutputRefusedError):
        list(llm.stream_structured_predict(Song, PROMPT, topic="rain"))
    with pytest.raises(StructuredOutputRefusedError):
        llm.as_structured_llm(Song).chat([ChatMessage(role="user", content="A song.")])


async def test_an_async_refusal_raises_too(searching):
    llm = searching(cost=KeywordCost(["{"]))
    with pytest.raises(StructuredOutputRefusedError):
        await llm.astructured_predict(Song, PROMPT, topic="rain")
    stream = await llm.astream_structured_predict(Song, PROMPT, topic="rain")
    with pytest.raises(StructuredOutputRefusedError):
        _ = [obj async for obj in stream]


def test_on_unsafe_return_gives_the_over_budget_object_and_raise_raises(searching):
    llm = searching(cost=KeywordCost(["{"]))
    song = llm.structured_predict(Song, PROMPT, topic="rain", llm_kwargs={"on_unsafe": "return"})
    assert isinstance(valid(song), Song)
    with pytest.raises(UnsafeGenerationError):
        llm.structured_predict(Song, PROMPT, topic="rain", llm_kwargs={"on_unsafe": "raise"})


def test_an_object_cut_off_by_max_new_tokens_raises_with_the_fix(searching):
    llm = searching(max_new_tokens=8)
    with pytest.raises(StructuredOutputError, match="raise max_new_tokens") as raised:
        llm.structured_predict(Note, PROMPT, topic="rain")
    assert not isinstance(raised.value, StructuredOutputRefusedError)
    assert raised.value.response.additional_kwargs["finish_reason"] == "length"


# ------------------------------------------------------------- what it asks for
def test_the_schema_is_in_the_system_message_and_llm_kwargs_apply(long_model, tiny_tokenizer):
    reply = '{"title": "Blue Sky", "year": 1999}'
    guard = ScriptedGuard(long_model, tiny_tokenizer, [reply])
    llm = SafeguardLLM(guard=guard, system_prompt="You like old songs.")
    song = llm.structured_predict(Song, PROMPT, llm_kwargs={"seed": 3}, topic="sky")
    assert song == Song(title="Blue Sky", year=1999)
    prompt = guard.prompts[-1].text
    assert "You like old songs.\n\nAnswer with a JSON object that fits this JSON Schema:" in prompt
    assert "The song's title." in prompt and "Name a song about sky." in prompt


def test_another_program_mode_takes_llamaindex_programs(long_model, tiny_tokenizer):
    call = '<tool_call>{"name": "Song", "arguments": {"title": "Rain", "year": 2001}}</tool_call>'
    guard = ScriptedGuard(long_model, tiny_tokenizer, [call])
    llm = SafeguardLLM(guard=guard, pydantic_program_mode=PydanticProgramMode.FUNCTION)
    assert llm.structured_predict(Song, PROMPT, topic="rain") == Song(title="Rain", year=2001)
    prompt = guard.rendered_prompts[-1]  # offered as a tool, the call required
    assert '"name": "Song"' in prompt and "Answer by calling one of the tools" in prompt


def test_complete_and_chat_take_a_response_format_per_call(searching):
    llm = searching()
    year = llm.complete("The year is", response_format={"type": "regex", "pattern": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", year.text)
    message = ChatMessage(role=MessageRole.USER, content="Yes or no?")
    reply = llm.chat([message], response_format={"type": "regex", "pattern": "(yes|no)"})
    assert reply.message.content in ("yes", "no")
