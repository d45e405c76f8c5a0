"""ChatSafeguard tool calling and structured output, with scripted replies standing in
for a model that follows instructions (the prompts, parsing and streaming around the
search); message conversion. tests/test_langchain_structured.py runs the same paths
through the real grammar-constrained search."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import (
    AIMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_helpers import RecordingHandler
from pydantic import BaseModel, Field

from inference_safeguard import GuardConfig, InvalidPromptError
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.testing import ScriptedGuard, build_tiny_llama
from langchain_safeguard import ChatSafeguard
from langchain_safeguard._messages import to_chat_messages

TOOL_TEMPLATE = (
    "{% if tools %}<|system|>TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}</s>"
    "{% endif %}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "CALL:{{ call.function.name }}{% endfor %}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@tool
def weather(city: str) -> str:
    """Current weather in a city."""
    return f"Sunny in {city}"


@tool
def clock(zone: str) -> str:
    """Current time in a time zone."""
    return f"Noon in {zone}"


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="Their name.")
    age: int = Field(description="Their age in years.")


def call(tool_name: str, /, **arguments: Any) -> str:
    return f"<tool_call>{json.dumps({'name': tool_name, 'arguments': arguments})}</tool_call>"


@pytest.fixture(scope="module")
def long_context_model(tiny_tokenizer):
    """A tiny Llama with a window that fits tool schemas spelled out by the tiny
    tokenizer (a scripted guard never runs it)."""
    return build_tiny_llama(tiny_tokenizer, max_position_embeddings=4096)


@pytest.fixture()
def scripted(long_context_model, tiny_tokenizer):
    """`scripted(*replies, **config)`: a ChatSafeguard answering with `replies` in turn."""

    def build(*replies: str, cost: Any = None, **config: Any) -> ChatSafeguard:
        guard = ScriptedGuard(long_context_model, tiny_tokenizer, list(replies), cost=cost)
        return ChatSafeguard(guard=guard, **config)

    return build


def rendered(chat: ChatSafeguard) -> str:
    """The last prompt the scripted guard was given, as the model saw it."""
    guard = chat.guard
    assert isinstance(guard, ScriptedGuard)
    return guard.rendered_prompts[-1]


# ------------------------------------------------------------------- tool calls
def test_tool_calls_are_parsed_into_the_message(scripted):
    chat = scripted("Let me check.\n" + call("weather", city="Paris"))
    message = chat.bind_tools([weather, clock]).invoke("Weather in Paris?")
    assert message.content == "Let me check."
    assert [(c["name"], c["args"], c["type"]) for c in message.tool_calls] == [
        ("weather", {"city": "Paris"}, "tool_call")
    ]
    assert message.tool_calls[0]["id"]
    assert message.invalid_tool_calls == []
    assert message.response_metadata["safety"]["safe"] is True


def test_calls_of_unknown_tools_are_reported_invalid(scripted):
    message = scripted(call("teleport", to="Mars")).bind_tools([weather]).invoke("Go.")
    assert message.tool_calls == []
    assert [c["name"] for c in message.invalid_tool_calls] == ["teleport"]
    assert "no tool named" in message.invalid_tool_calls[0]["error"]


def test_without_bound_tools_call_text_is_plain_content(scripted):
    reply = call("weather", city="Paris")
    message = scripted(reply).invoke("Weather in Paris?")
    assert message.content == reply
    assert message.tool_calls == []


def test_streamed_tool_calls_aggregate_like_invoke_and_never_leak_into_content(scripted):
    reply = "Let me check the weather for you.\n" + call("weather", city="Paris")
    chat = scripted(reply).bind_tools([weather])
    chunks = list(chat.stream("Weather in Paris?"))
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert all("<tool" not in chunk.content for chunk in chunks)
    assert chunks[0].content == "Let"  # text before the call streams at once
    assert full.content == "Let me check the weather for you."
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("weather", {"city": "Paris"})]
    assert full.chunk_position == "last"


def test_streamed_invalid_tool_calls_stay_invalid(scripted):
    chat = scripted(call("teleport", to="Mars")).bind_tools([weather])
    chunks = list(chat.stream("Go."))
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.tool_calls == []
    assert [c["name"] for c in full.invalid_tool_calls] == ["teleport"]


def test_parallel_tool_calls_false_keeps_the_first_call(scripted):
    reply = call("weather", city="Paris") + "\n" + call("clock", zone="CET")
    chat = scripted(reply, reply)
    assert len(chat.bind_tools([weather, clock]).invoke("Both?").tool_calls) == 2
    calls = chat.bind_tools([weather, clock], parallel_tool_calls=False).invoke("Both?").tool_calls
    assert [c["name"] for c in calls] == ["weather"]


def test_tool_choice_asks_for_a_call_and_a_named_choice_offers_only_that_tool(scripted):
    chat = scripted(call("clock", zone="CET"))
    chat.bind_tools([weather, clock], tool_choice="any").invoke("Hi")
    assert "Answer by calling one of the tools" in rendered(chat)
    assert "weather" in rendered(chat) and "clock" in rendered(chat)
    message = chat.bind_tools([weather, clock], tool_choice="clock").invoke("Hi")
    assert "Answer by calling the tool clock." in rendered(chat)
    assert "weather" not in rendered(chat)
    assert message.tool_calls[0]["name"] == "clock"


def test_tool_choice_none_offers_no_tools_and_parses_nothing(scripted):
    reply = call("weather", city="Paris")
    chat = scripted(reply)
    message = chat.bind_tools([weather], tool_choice="none").invoke("Hi")
    assert "weather" not in rendered(chat)
    assert message.content == reply and message.tool_calls == []


def test_bad_tool_choices_fail_when_binding(scripted):
    chat = scripted("hi")
    with pytest.raises(ValueError, match="not one of the bound tools"):
        chat.bind_tools([weather], tool_choice="clock")
    with pytest.raises(ValueError, match="needs tools"):
        chat.bind_tools([], tool_choice="any")


def test_tools_render_through_a_template_that_supports_them(long_context_model, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)  # the session's tokenizer is shared
    tokenizer.chat_template = TOOL_TEMPLATE
    guard = ScriptedGuard(long_context_model, tokenizer, [call("weather", city="Paris")])
    chat = ChatSafeguard(guard=guard)
    message = chat.bind_tools([weather, clock]).invoke("Weather in Paris?")
    prompt = rendered(chat)
    assert "TOOLS:weather;clock;" in prompt
    assert "You can call these tools" not in prompt  # the template did it, not the fallback
    assert message.tool_calls[0]["args"] == {"city": "Paris"}


def test_tools_fall_back_to_a_system_description_without_template_support(scripted):
    chat = scripted("No tools needed.")
    chat.bind_tools([weather]).invoke([SystemMessage("Be brief."), HumanMessage("Hi")])
    prompt = rendered(chat)
    assert "Be brief." in prompt
    assert "You can call these tools" in prompt and "weather" in prompt


def test_tool_call_history_reaches_the_prompt(scripted):
    chat = scripted("It is sunny.")
    history = [
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "c1"}]),
        ToolMessage("Sunny, 21 C", tool_call_id="c1"),
    ]
    message = chat.bind_tools([weather]).invoke(history)
    assert message.content == "It is sunny."
    transcript = chat.guard.prompts[-1].text
    assert '"name": "weather"' in transcript and '"city": "Paris"' in transcript
    assert "<tool_response name='weather'>Sunny, 21 C</tool_response>" in transcript


def test_the_safety_budget_applies_to_tool_call_text(scripted):
    chat = scripted(call("weather", city="Paris"), cost=KeywordCost(["paris"]))
    message = chat.bind_tools([weather]).invoke("Weather in Paris?")
    assert message.tool_calls == []
    assert message.content == GuardConfig().refusal_text
    assert message.response_metadata["safety"]["refused"] is True
    assert message.response_metadata["safety"]["cost"] == 1.0


def test_an_agent_loop_runs_tools_and_answers(scripted):
    chat = scripted(call("weather", city="Paris"), "It is sunny in Paris.")
    model = chat.bind_tools([weather, clock])
    messages: list[Any] = [HumanMessage("Weather in Paris?")]
    reply = model.invoke(messages)
    while reply.tool_calls:
        messages.append(reply)
        tools = {"weather": weather, "clock": clock}
        messages += [tools[c["name"]].invoke(c) for c in reply.tool_calls]
        reply = model.invoke(messages)
    assert reply.content == "It is sunny in Paris."
    assert isinstance(messages[-1], ToolMessage) and messages[-1].content == "Sunny in Paris"


# ----------------------------------------------------------- structured output
def test_structured_output_by_function_calling_parses_the_call(scripted):
    chat = scripted(call("Person", name="Alice", age=31))
    handler = RecordingHandler()
    person = chat.with_structured_output(Person).invoke(
        "Alice is 31.", config={"callbacks": [handler]}
    )
    assert person == Person(name="Alice", age=31)
    assert "Answer by calling the tool Person." in rendered(chat)
    assert handler.options[0]["ls_structured_output_format"]["schema"] == (
        convert_to_json_schema(Person)
    )


def test_structured_output_with_a_json_schema_dict_returns_a_dict(scripted):
    schema = convert_to_json_schema(Person)
    chat = scripted(call("Person", name="Bob", age=40))
    assert chat.with_structured_output(schema).invoke("Bob is 40.") == {"name": "Bob", "age": 40}


def test_json_schema_method_shows_the_schema_and_parses_the_json_answer(scripted):
    class Answer(BaseModel):
        """An answer and how sure it is."""

        answer: str
        confidence: float

    chat = scripted('```json\n{"answer": "yes", "confidence": 0.9}\n```')
    parsed = chat.with_structured_output(Answer, method="json_schema").invoke("Sure?")
    assert parsed == Answer(answer="yes", confidence=0.9)
    assert "fits this JSON Schema" in rendered(chat) and "confidence" in rendered(chat)
    assert "You can call these tools" not in rendered(chat)  # an answer, not a call


def test_structured_answers_are_parsed_strictly(scripted):
    # LangChain's partial-JSON parsing would close the object and return {"answer": "y"}.
    chat = scripted('{"answer": "y')
    out = chat.with_structured_output(method="json_mode", include_raw=True).invoke("Sure?")
    assert out["parsed"] is None
    assert "not JSON" in str(out["parsing_error"])


def test_json_mode_asks_for_json_and_parses_it(scripted):  # the grammar forces it too
    chat = scripted('{"name": "Carol", "age": 7}')
    assert chat.with_structured_output(method="json_mode").invoke("Carol is 7.") == {
        "name": "Carol",
        "age": 7,
    }
    assert "Answer with a single JSON object and nothing else." in rendered(chat)


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_a_refused_structured_answer_raises_or_comes_back_raw(scripted, method):
    reply = call("Person", name="Alice", age=31)
    if method != "function_calling":
        reply = '{"name": "Alice", "age": 31}'
    chat = scripted(reply, cost=KeywordCost(["alice"]))
    structured = chat.with_structured_output(Person, method=method)
    with pytest.raises(OutputParserException, match="refused"):
        structured.invoke("Alice is 31.")
    out = chat.with_structured_output(Person, method=method, include_raw=True).invoke("A")
    assert out["parsed"] is None
    assert isinstance(out["parsing_error"], OutputParserException)
    assert "over the safety budget" in str(out["parsing_error"])
    assert out["raw"].content == GuardConfig().refusal_text
    assert out["raw"].response_metadata["safety"]["refused"] is True


def test_structured_output_batches_in_one_search(scripted):
    chat = scripted(call("Person", name="Alice", age=31))
    people = chat.with_structured_output(Person).batch(["a", "b", "c"])
    assert people == [Person(name="Alice", age=31)] * 3
    assert chat.guard.searches == 1


# -------------------------------------------------------------- message conversion
def test_messages_convert_to_the_core_chat_format():
    messages = [
        SystemMessage("Be brief."),
        SystemMessage("Be kind."),
        HumanMessage([{"type": "text", "text": "Weather"}, " in Paris?"]),
        AIMessage(
            [{"type": "text", "text": "Checking."}, {"type": "tool_use", "id": "c1"}],
            tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "c1"}],
        ),
        ToolMessage("Sunny", tool_call_id="c1"),
        ChatMessage(role="human", content="Thanks!"),
    ]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": "Sunny", "tool_call_id": "c1", "name": "weather"},
        {"role": "user", "content": "Thanks!"},
    ]


def test_non_text_content_and_unknown_roles_are_refused_clearly():
    image = HumanMessage([{"type": "image", "url": "https://example.com/a.png"}])
    with pytest.raises(NotImplementedError, match="'image' content block"):
        to_chat_messages([image])
    with pytest.raises(ValueError, match="role 'narrator'"):
        to_chat_messages([ChatMessage(role="narrator", content="Once")])


def _history_with_call(call: object) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "Sunny", "tool_call_id": "c1"},
    ]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"id": "c1", "function": {"name": "weather", "arguments": "{bad"}}, "not valid JSON"),
        ({"id": "c1", "function": {"arguments": "{}"}}, "has no tool name"),
        ({"id": "c1", "function": "weather"}, "'function' must be a dict"),
        ("weather", "tool call 0 must be a dict"),
        ({"id": "c1", "function": {"name": "weather", "arguments": "[1]"}}, "JSON object"),
    ],
    ids=["bad-json", "no-name", "function-str", "call-str", "list-args"],
)
def test_malformed_tool_calls_in_message_dicts_raise_invalid_prompt(scripted, call, message):
    chat = scripted("It is sunny.").bind_tools([weather])
    with pytest.raises(InvalidPromptError, match=f"message 1, tool call 0.*{message}|{message}"):
        chat.invoke(_history_with_call(call))


def test_a_lone_surrogate_in_a_message_raises_invalid_prompt(scripted):
    with pytest.raises(InvalidPromptError, match="unpaired surrogate"):
        scripted("Hi.").invoke([HumanMessage("caf\udce9")])
