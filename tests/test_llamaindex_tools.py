"""Function calling through SafeguardLLM: tool rendering and parsing, predict_and_call,
FunctionAgent and ReActAgent with a scripted decoder, and the call shapes LlamaIndex asks
for (`tool_required`, `tool_choice`, `allow_parallel_tool_calls`) enforced by grammar on
a real search over the random tiny model, whose calls are valid only by grammar."""

from __future__ import annotations

import json

import jsonschema
import pytest
from llama_index.core.agent.workflow import AgentStream, FunctionAgent, ReActAgent
from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.errors import InvalidPromptError
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.testing import ScriptedGuard, build_tiny_llama
from llamaindex_safeguard import SafeguardLLM, to_guard_messages, to_tool_specs


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


class SmallInts(BaseModel):
    """Two integers below 100: bounded, so that a random model's digits end."""

    a: int = Field(ge=0, le=99)
    b: int = Field(ge=0, le=99)


ADD = FunctionTool.from_defaults(add)
MULTIPLY = FunctionTool.from_defaults(multiply)
SMALL_ADD = FunctionTool.from_defaults(add, fn_schema=SmallInts)
SMALL_MULTIPLY = FunctionTool.from_defaults(multiply, fn_schema=SmallInts)
QUESTION = "What is 2 + 3?"


def call(name: str, **arguments: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


@pytest.fixture(scope="module")
def long_model(tiny_tokenizer):
    """The tiny Llama with room for tool descriptions (its tokenizer spends many tokens
    on JSON)."""
    return build_tiny_llama(tiny_tokenizer, seed=0, max_position_embeddings=4096)


@pytest.fixture()
def scripted(long_model, tiny_tokenizer):
    """`scripted(*texts, **kwargs)`: a SafeguardLLM whose model answers with `texts`."""

    def build(*texts: str, **kwargs: object) -> SafeguardLLM:
        return SafeguardLLM(guard=ScriptedGuard(long_model, tiny_tokenizer, texts, **kwargs))

    return build


@pytest.fixture()
def searching(long_model, tiny_tokenizer):
    """`searching(**config)`: a SafeguardLLM over a real search on the random tiny model."""

    def build(cost: KeywordCost | None = None, **config: object) -> SafeguardLLM:
        settings = {"num_candidates": 4, "beam_width": 2, "block_size": 8, "max_new_tokens": 96}
        guard = InferenceGuard(
            long_model,
            tiny_tokenizer,
            cost=cost or KeywordCost(["bomb"]),
            config=GuardConfig(**{**settings, "seed": 0, **config}),
        )
        return SafeguardLLM(guard=guard)

    return build


def assert_valid_calls(llm, response, tool_names) -> list:
    """The response's calls, each of one of `tool_names` with arguments that validate."""
    selections = llm.get_tool_calls_from_response(response)
    for selection in selections:
        assert selection.tool_name in tool_names
        jsonschema.validate(selection.tool_kwargs, SmallInts.model_json_schema())
    return selections


# ------------------------------------------------------------------- tool calls
def test_chat_with_tools_offers_the_tools_and_parses_the_call(scripted):
    llm = scripted("I will add them. " + call("add", a=2, b=3))
    response = llm.chat_with_tools([ADD], user_msg=QUESTION)
    prompt = llm.guard.rendered_prompts[-1]
    assert '"name": "add"' in prompt and "Add two integers." in prompt
    assert response.message.content == "I will add them."
    [selection] = llm.get_tool_calls_from_response(response)
    assert (selection.tool_name, selection.tool_kwargs) == ("add", {"a": 2, "b": 3})
    [block] = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    assert block.tool_call_id == selection.tool_id
    assert response.additional_kwargs["safety"]["safe"]
    assert response.raw["text"].endswith("</tool_call>")


def test_missing_tool_call_raises_only_when_one_is_required(scripted):
    llm = scripted("Five.", "Five.")
    response = llm.chat_with_tools([ADD], user_msg=QUESTION)
    with pytest.raises(ValueError, match="Expected at least one tool call"):
        llm.get_tool_calls_from_response(response)
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []


def test_tool_choice_offers_only_the_named_tool(scripted):
    llm = scripted(call("multiply", a=2, b=3), call("add", a=2, b=3))
    llm.chat_with_tools([ADD, MULTIPLY], user_msg=QUESTION, tool_choice="multiply")
    assert '"name": "multiply"' in llm.guard.rendered_prompts[-1]
    assert '"name": "add"' not in llm.guard.rendered_prompts[-1]
    none = llm.chat_with_tools([ADD, MULTIPLY], user_msg=QUESTION, tool_choice="none")
    assert "You can call these tools" not in llm.guard.rendered_prompts[-1]
    assert none.message.content.startswith("<tool_call>")  # not parsed: no tools offered
    with pytest.raises(ValueError, match="names no offered tool"):
        llm.chat_with_tools([ADD], user_msg=QUESTION, tool_choice="divide")


def test_calls_of_unknown_tools_or_bad_json_are_reported_not_returned(scripted):
    llm = scripted(call("divide", a=1, b=2) + "<tool_call>{not json}</tool_call>")
    response = llm.chat_with_tools([ADD], user_msg=QUESTION)
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    errors = [c["error"] for c in response.raw["invalid_tool_calls"]]
    assert errors == ["no tool named 'divide'", "not valid JSON"]


def test_an_over_budget_tool_call_is_refused_not_executed(scripted):
    llm = scripted(call("add", a=2, b=3), cost=KeywordCost(["add"]))
    output = llm.predict_and_call([ADD], user_msg=QUESTION, error_on_no_tool_call=False)
    assert output.sources == []
    assert output.response == llm.guard.config.refusal_text


def test_a_refusal_that_looks_like_a_tool_call_stays_text(long_model, tiny_tokenizer):
    refusal = call("add", a=2, b=3)
    guard = ScriptedGuard(long_model, tiny_tokenizer, ["bomb"], cost=KeywordCost(["bomb"]))
    llm = SafeguardLLM(guard=guard, refusal_text=refusal)
    for response in (
        llm.chat_with_tools([ADD], user_msg=QUESTION),
        list(llm.stream_chat_with_tools([ADD], user_msg=QUESTION))[-1],
    ):
        assert response.additional_kwargs["safety"]["refused"]
        assert not any(isinstance(b, ToolCallBlock) for b in response.message.blocks)
        assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
        assert response.message.content == refusal


def test_predict_and_call_runs_the_chosen_tool(scripted):
    llm = scripted(call("multiply", a=6, b=7))
    output = llm.predict_and_call([ADD, MULTIPLY], user_msg="What is 6 times 7?")
    assert output.response == "42"
    assert output.sources[0].raw_input == {"args": (), "kwargs": {"a": 6, "b": 7}}


async def test_apredict_and_call_runs_the_tool_too(scripted):
    llm = scripted(call("add", a=20, b=22))
    output = await llm.apredict_and_call([ADD, MULTIPLY], user_msg="What is 20 + 22?")
    assert output.response == "42"


# ------------------------------------------------------------- message history
def test_tool_calls_and_results_in_the_history_are_rendered_for_the_model(scripted):
    llm = scripted("It is 5.")
    history = [
        ChatMessage(role=MessageRole.USER, content=QUESTION),
        ChatMessage(
            role=MessageRole.ASSISTANT,
            blocks=[
                ToolCallBlock(tool_call_id="c1", tool_name="add", tool_kwargs={"a": 2, "b": 3})
            ],
        ),
        ChatMessage(role=MessageRole.TOOL, content="5", additional_kwargs={"tool_call_id": "c1"}),
    ]
    llm.chat_with_tools([ADD], chat_history=history)
    prompt = llm.guard.rendered_prompts[-1]
    assert call("add", a=2, b=3) in prompt
    assert "<tool_response name='add'>5</tool_response>" in prompt


def test_openai_style_tool_calls_convert_to_core_messages():
    openai_call = {
        "id": "c7",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
    }
    messages = [
        ChatMessage(role=MessageRole.USER, content=QUESTION),
        ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [openai_call]}),
        ChatMessage(role="tool", content="3", additional_kwargs={"tool_call_id": "c7"}),
    ]
    assert to_guard_messages(messages) == [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c7",
                    "type": "function",
                    "function": {"name": "add", "arguments": {"a": 1, "b": 2}},
                }
            ],
        },
        {"role": "tool", "content": "3", "tool_call_id": "c7", "name": "add"},
    ]


def test_tools_convert_from_llamaindex_tools_and_dicts():
    dict_tool = {"type": "function", "function": {"name": "noop", "parameters": {}}}
    specs = to_tool_specs([ADD, dict_tool])
    assert [s.name for s in specs] == ["add", "noop"]
    assert specs[0].parameters["required"] == ["a", "b"]
    with pytest.raises(ValueError, match="unique"):
        to_tool_specs([ADD, ADD])
    with pytest.raises(TypeError):
        to_tool_specs([add])


# -------------------------------------------------------------------- streaming
def test_stream_chat_with_tools_holds_back_the_call_markup(scripted):
    llm = scripted("Let me add. " + call("add", a=2, b=3))
    chunks = list(llm.stream_chat_with_tools([ADD], user_msg=QUESTION))
    assert len(chunks) > 3
    assert "".join(c.delta for c in chunks) == "Let me add."
    assert not any("<" in c.delta for c in chunks)
    [selection] = llm.get_tool_calls_from_response(chunks[-1])
    assert selection.tool_kwargs == {"a": 2, "b": 3}
    assert chunks[-1].additional_kwargs["safety"]["safe"]


async def test_astream_chat_with_a_bare_json_call_streams_no_text(scripted):
    llm = scripted(json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}}))
    chunks = [c async for c in await llm.astream_chat_with_tools([ADD], user_msg=QUESTION)]
    assert "".join(c.delta for c in chunks) == ""
    assert [s.tool_name for s in llm.get_tool_calls_from_response(chunks[-1])] == ["add"]


class _CommitsThenRefuses(ScriptedGuard):
    """Streams all of its reply but the last word, as a search commits the text the cost
    model accepts, then refuses the reply, which the last word puts over budget."""

    def _stream(self, prompt, config, cancel):
        [result] = self._generate_encoded([prompt], config, cancel)
        reply = self.replies[-1]
        yield reply[: reply.rindex(" ")]
        return result


def test_a_stream_refused_after_committing_a_tool_call_calls_no_tool(long_model, tiny_tokenizer):
    reply = call("add", a=2, b=3) + " bomb"
    guard = _CommitsThenRefuses(long_model, tiny_tokenizer, [reply], cost=KeywordCost(["bomb"]))
    llm = SafeguardLLM(guard=guard)
    last = list(llm.stream_chat_with_tools([ADD], user_msg=QUESTION))[-1]
    assert last.additional_kwargs["safety"]["refused"]
    assert llm.get_tool_calls_from_response(last, error_on_no_tool_call=False) == []
    assert last.message.content == guard.config.refusal_text


# ----------------------------------------------------------------------- agents
async def test_function_agent_calls_the_tool_and_answers(scripted):
    llm = scripted(call("add", a=2, b=3), "The answer is 5.")
    agent = FunctionAgent(tools=[ADD], llm=llm)
    handler = agent.run(QUESTION)
    deltas = [
        event.delta async for event in handler.stream_events() if isinstance(event, AgentStream)
    ]
    output = await handler
    assert str(output.response.content) == "The answer is 5."
    [result] = output.tool_calls
    assert (result.tool_name, result.tool_kwargs, result.tool_output.raw_output) == (
        "add",
        {"a": 2, "b": 3},
        5,
    )
    assert "<tool_response name='add'>5</tool_response>" in llm.guard.rendered_prompts[-1]
    assert "".join(deltas) == "The answer is 5."
    assert output.raw["safety"]["safe"]  # the last step's record


async def test_react_agent_calls_the_tool_and_answers(scripted):
    llm = scripted(
        'Thought: I need to add.\nAction: add\nAction Input: {"a": 2, "b": 3}',
        "Thought: I can answer without using any more tools.\nAnswer: 5",
    )
    output = await ReActAgent(tools=[ADD], llm=llm).run(QUESTION)
    assert str(output.response.content) == "5"
    assert [r.tool_output.raw_output for r in output.tool_calls] == [5]
    assert "Observation: 5" in llm.guard.rendered_prompts[-1]
    assert output.raw["safety"]["safe"]


# ------------------------------------------------------- call shapes by grammar
def test_tool_required_makes_a_random_model_answer_with_one_valid_call(searching):
    llm = searching()
    response = llm.chat_with_tools(
        [SMALL_ADD, SMALL_MULTIPLY], user_msg=QUESTION, tool_required=True
    )
    assert len(assert_valid_calls(llm, response, {"add", "multiply"})) == 1
    assert response.raw["text"].startswith("<tool_call>")
    assert response.raw["finish_reason"] == "stop"


def test_parallel_tool_calls_allow_several_calls_each_valid(searching):
    llm = searching()
    response = llm.chat_with_tools(
        [SMALL_ADD, SMALL_MULTIPLY],
        user_msg=QUESTION,
        tool_required=True,
        allow_parallel_tool_calls=True,
    )
    # The random model keeps calling until max_new_tokens cuts a call short; the cut
    # call is reported invalid, never returned.
    assert assert_valid_calls(llm, response, {"add", "multiply"})
    for invalid in response.raw.get("invalid_tool_calls", []):
        assert response.raw["finish_reason"] == "length" and invalid["error"] == "not valid JSON"


@pytest.mark.parametrize(
    "choice", ["multiply", {"type": "function", "function": {"name": "multiply"}}]
)
def test_a_named_tool_choice_forces_a_call_of_that_tool(searching, choice):
    llm = searching()
    response = llm.chat_with_tools(
        [SMALL_ADD, SMALL_MULTIPLY], user_msg=QUESTION, tool_choice=choice
    )
    assert len(assert_valid_calls(llm, response, {"multiply"})) == 1


def test_the_guard_configs_tool_choice_applies_when_the_call_sets_none(searching):
    llm = searching(tool_choice="multiply")
    response = llm.chat_with_tools([SMALL_ADD, SMALL_MULTIPLY], user_msg=QUESTION)
    assert len(assert_valid_calls(llm, response, {"multiply"})) == 1


def test_a_required_call_without_tools_is_rejected_with_the_fix(searching):
    with pytest.raises(InvalidPromptError, match="pass tools"):
        searching().chat_with_tools([], user_msg=QUESTION, tool_required=True)


def test_predict_and_call_runs_the_forced_call(searching):
    output = searching().predict_and_call([SMALL_ADD], user_msg=QUESTION, tool_choice="required")
    [source] = output.sources
    kwargs = source.raw_input["kwargs"]
    assert source.raw_output == kwargs["a"] + kwargs["b"]
    assert output.response == str(source.raw_output)


def test_a_streamed_forced_call_is_valid(searching):
    llm = searching()
    chunks = list(
        llm.stream_chat_with_tools(
            [SMALL_ADD, SMALL_MULTIPLY], user_msg=QUESTION, tool_required=True
        )
    )
    assert "".join(c.delta for c in chunks) == ""  # a forced call has no text to stream
    assert len(assert_valid_calls(llm, chunks[-1], {"add", "multiply"})) == 1


async def test_an_async_forced_call_is_valid_streamed_or_not(searching):
    llm = searching()
    response = await llm.achat_with_tools([SMALL_ADD], user_msg=QUESTION, tool_required=True)
    assert len(assert_valid_calls(llm, response, {"add"})) == 1
    stream = await llm.astream_chat_with_tools([SMALL_ADD], user_msg=QUESTION, tool_required=True)
    chunks = [c async for c in stream]
    assert len(assert_valid_calls(llm, chunks[-1], {"add"})) == 1


def test_an_over_budget_forced_call_is_refused_not_called(searching):
    llm = searching(cost=KeywordCost(["tool_call"]))  # every forced response is over budget
    response = llm.chat_with_tools([SMALL_ADD], user_msg=QUESTION, tool_required=True)
    assert response.additional_kwargs["safety"]["refused"]
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    assert response.message.content == llm.guard.config.refusal_text


async def test_function_agent_on_a_random_model_makes_valid_calls_that_run(searching):
    """Grammar guarantees the forced first call and any call the model starts later; the
    random model's final answer is noise, so only the calls are checked."""
    llm = searching()
    agent = FunctionAgent(
        tools=[SMALL_ADD, SMALL_MULTIPLY], llm=llm, initial_tool_choice="required"
    )
    output = await agent.run(QUESTION)
    assert output.tool_calls
    for result in output.tool_calls:
        jsonschema.validate(result.tool_kwargs, SmallInts.model_json_schema())
        assert not result.tool_output.is_error
        fn = add if result.tool_name == "add" else multiply
        assert result.tool_output.raw_output == fn(**result.tool_kwargs)
