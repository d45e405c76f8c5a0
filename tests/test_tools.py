"""Tool specs, tool rendering into prompts, and tool-call parsing."""

from __future__ import annotations

import json

import pytest
from conftest import PROMPT

from inference_safeguard import InferenceGuard, InvalidPromptError
from inference_safeguard.lm import CausalLM
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.testing import ScriptedGuard, build_tiny_llama
from inference_safeguard.tools import (
    TOOL_CALL_MARKERS,
    TOOL_CALL_OPEN,
    ToolCall,
    ToolCallHoldback,
    ToolSpec,
    as_tool_specs,
    choose_tools,
    format_tool_call,
    inline_tool_messages,
    name_tool_results,
    parse_tool_calls,
    template_renders_tools,
)

WEATHER = ToolSpec(
    name="get_weather",
    description="Current weather in a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)
TOOLS = [WEATHER, ToolSpec(name="add", description="Add two numbers.")]

TOOL_TEMPLATE = (
    "{% if tools %}<|system|>TOOLS:{{ tools | tojson }}</s>{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "CALL:{{ call.function | tojson }}{% endfor %}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "content": "Sunny, 21 C", "tool_call_id": "call_1", "name": "get_weather"},
]


# ------------------------------------------------------------------ specs
def test_tool_specs_read_both_openai_shapes_and_round_trip():
    nested = WEATHER.to_openai()
    assert nested["type"] == "function"
    assert ToolSpec.from_openai(nested) == WEATHER
    assert ToolSpec.from_openai(nested["function"]) == WEATHER


def test_bad_tool_specs_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="no name"):
        ToolSpec.from_openai({"function": {"description": "nameless"}})
    with pytest.raises(ValueError, match="JSON Schema"):
        ToolSpec(name="x", parameters=["not", "a", "schema"])
    with pytest.raises(ValueError, match="unique"):
        as_tool_specs([WEATHER, WEATHER.to_openai()])
    with pytest.raises(TypeError, match="list of ToolSpec"):
        as_tool_specs(WEATHER.to_openai())


# ----------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
        '{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}',
    ],
)
def test_tool_calls_are_read_from_the_formats_local_models_use(text):
    parsed = parse_tool_calls(text, TOOLS)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert parsed.content == ""
    assert parsed.invalid_tool_calls == []


def test_several_tagged_calls_and_surrounding_text_are_separated():
    text = (
        "Let me check.\n"
        + format_tool_call("get_weather", {"city": "Paris"})
        + "\n"
        + format_tool_call("add", {"a": 1, "b": 2})
    )
    parsed = parse_tool_calls(text, TOOLS)
    assert [c.name for c in parsed.tool_calls] == ["get_weather", "add"]
    assert parsed.tool_calls[1].arguments == {"a": 1, "b": 2}
    assert parsed.content == "Let me check."
    assert len({c.id for c in parsed.tool_calls}) == 2


def test_a_list_of_calls_in_bare_json_is_read():
    text = json.dumps([{"name": "add", "arguments": {"a": 1}}, {"name": "add", "arguments": {}}])
    assert len(parse_tool_calls(text, TOOLS).tool_calls) == 2


def test_plain_text_and_non_call_json_stay_content():
    assert parse_tool_calls("The weather is fine.", TOOLS).tool_calls == []
    parsed = parse_tool_calls('{"city": "Paris"}', TOOLS)
    assert parsed.tool_calls == [] and parsed.content == '{"city": "Paris"}'
    answer = '{"name": "Alice", "age": 31}'
    parsed = parse_tool_calls(answer, TOOLS)
    assert parsed.tool_calls == [] and parsed.invalid_tool_calls == []
    assert parsed.content == answer


def test_broken_or_unknown_calls_are_reported_invalid():
    broken = parse_tool_calls("<tool_call>{not json}</tool_call>", TOOLS)
    assert broken.tool_calls == [] and broken.invalid_tool_calls[0].error == "not valid JSON"
    unknown = parse_tool_calls(format_tool_call("launch", {"what": "rocket"}), TOOLS)
    assert unknown.tool_calls == []
    assert unknown.invalid_tool_calls[0].name == "launch"
    bad_args = parse_tool_calls('<tool_call>{"name": "add", "arguments": "1, 2"}</tool_call>')
    assert bad_args.invalid_tool_calls[0].error == "arguments are not JSON"


def test_without_a_tool_list_any_named_call_counts():
    parsed = parse_tool_calls(format_tool_call("anything", {"x": 1}))
    assert parsed.tool_calls[0].name == "anything"


# --------------------------------------------------------------- rendering
def test_templates_that_read_tools_are_detected():
    assert template_renders_tools(TOOL_TEMPLATE)
    assert template_renders_tools({"default": "x", "tool_use": TOOL_TEMPLATE})
    assert not template_renders_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_renders_tools(None)


def test_inline_rendering_describes_tools_and_writes_calls_and_results_as_text():
    messages = inline_tool_messages(
        [{"role": "system", "content": "Be brief."}, *CONVERSATION], TOOLS
    )
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("Be brief.")
    assert '"name": "get_weather"' in messages[0]["content"]
    assert parse_tool_calls(messages[2]["content"]).tool_calls[0].arguments == {"city": "Paris"}
    assert messages[3] == {
        "role": "user",
        "content": "<tool_response name='get_weather'>Sunny, 21 C</tool_response>",
    }


def test_prompts_with_tools_render_through_a_template_without_tool_support(tiny_tokenizer):
    lm_tokenizer = tiny_tokenizer
    assert not template_renders_tools(lm_tokenizer.chat_template)
    from inference_safeguard.testing import build_tiny_llama

    lm = CausalLM(build_tiny_llama(lm_tokenizer), lm_tokenizer)
    encoded = lm.encode(CONVERSATION, TOOLS)
    rendered = lm_tokenizer.decode(encoded.ids)
    assert "<|system|>" in rendered and "get_weather" in rendered
    assert "tool_response" in rendered
    # Scorers see the calls and results as text, but not the tool description.
    assert "get_weather" in encoded.text and "Sunny" in encoded.text
    assert "You can call" not in encoded.text


def test_prompts_with_tools_render_through_a_template_with_tool_support(tiny_model):
    from inference_safeguard.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    lm = CausalLM(tiny_model, tokenizer)
    rendered = tokenizer.decode(lm.encode(CONVERSATION, TOOLS).ids)
    assert "TOOLS:" in rendered and '"get_weather"' in rendered
    assert 'CALL:{"name": "get_weather", "arguments": {"city": "Paris"}}' in rendered
    assert "TOOLS:" not in tokenizer.decode(lm.encode(CONVERSATION).ids)


def test_the_guard_offers_tools_and_the_budget_covers_tool_call_text(
    tiny_model, tiny_tokenizer, keyword_cost, small_config
):
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=keyword_cost, config=small_config)
    messages = [{"role": "user", "content": PROMPT}]
    with_tools = guard.generate(messages, tools=TOOLS, seed=0)
    without = guard.generate(messages, seed=0)
    assert with_tools.stats.prompt_tokens > without.stats.prompt_tokens
    assert with_tools.safe
    with pytest.raises(InvalidPromptError, match="tools need a chat prompt"):
        guard.generate(PROMPT, tools=TOOLS)
    with pytest.raises(InvalidPromptError, match="only assistant messages carry tool_calls"):
        guard.generate([{"role": "user", "content": "hi", "tool_calls": []}])


# ------------------------------------------------------------------ tool choice
@pytest.mark.parametrize("choice", [None, "auto", False])
def test_an_open_tool_choice_offers_every_tool_and_asks_for_nothing(choice):
    assert choose_tools(TOOLS, choice) == (TOOLS, None)


def test_tool_choice_none_offers_no_tools():
    assert choose_tools(TOOLS, "none") == ([], None)


@pytest.mark.parametrize("choice", ["any", "required", True])
def test_a_required_call_offers_every_tool_and_asks_for_a_call(choice):
    tools, instruction = choose_tools(TOOLS, choice)
    assert tools == TOOLS
    assert instruction == "Answer by calling one of the tools you are given."
    assert choose_tools([], choice) == ([], None)  # nothing to ask for


@pytest.mark.parametrize("choice", ["add", {"type": "function", "function": {"name": "add"}}])
def test_a_named_tool_choice_offers_only_that_tool_and_asks_for_it(choice):
    assert choose_tools(TOOLS, choice) == ([TOOLS[1]], "Answer by calling the tool add.")


def test_bad_tool_choices_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="names no offered tool: 'divide'"):
        choose_tools(TOOLS, "divide")
    with pytest.raises(ValueError, match="names no tool"):
        choose_tools(TOOLS, {"type": "function"})
    with pytest.raises(ValueError, match="tool_choice must be"):
        choose_tools(TOOLS, 3.5)


# ----------------------------------------------------------- message helpers
def test_a_tool_call_renders_as_a_chat_tool_call_entry():
    call = ToolCall(name="add", arguments={"a": 1}, id="c1")
    assert call.to_chat() == {
        "id": "c1",
        "type": "function",
        "function": {"name": "add", "arguments": {"a": 1}},
    }


def test_tool_results_are_named_after_the_call_they_answer():
    messages = [
        *CONVERSATION[:2],
        {"role": "tool", "content": "Sunny", "tool_call_id": "call_1"},
        {"role": "tool", "content": "?", "tool_call_id": "unknown"},
        {"role": "tool", "content": "Named", "tool_call_id": "call_1", "name": "mine"},
    ]
    named = name_tool_results(messages)
    assert [m.get("name") for m in named[2:]] == ["get_weather", None, "mine"]
    assert "name" not in messages[2]  # the input is not modified
    assert named[:2] == CONVERSATION[:2]


# -------------------------------------------------------------------- holdback
def test_the_first_marker_is_the_tagged_call_opening():
    assert TOOL_CALL_MARKERS[0] == TOOL_CALL_OPEN


@pytest.mark.parametrize(
    ("deltas", "released"),
    [
        (["Hello", " there", "."], ["Hello", " there", "."]),
        (["Sure ", "<tool", "_call>{}"], ["Sure", "", ""]),
        (["  {", '"name"'], ["", ""]),
        (["ok\n", "[TOOL_CALLS] [", "]"], ["ok", "", ""]),
        (["Hi <", "b>"], ["Hi", " <b>"]),
        (["`", "``json"], ["", ""]),
        (["`x` is", " code"], ["`x` is", " code"]),
        (["See [", "1]."], ["See", " [1]."]),
        (["a\n\n", "\n", "b"], ["a", "", "\n\n\nb"]),
    ],
)
def test_holdback_releases_only_text_that_cannot_start_a_call(deltas, released):
    holdback = ToolCallHoldback()
    assert [holdback.feed(d) for d in deltas] == released


def test_holdback_releases_text_after_a_finished_call_and_tracks_the_calls():
    holdback = ToolCallHoldback(TOOLS)
    call = format_tool_call("add", {"a": 1})
    released = [holdback.feed(d) for d in ["Adding. ", call[:20], call[20:], " Done."]]
    assert released == ["Adding.", "", "", "  Done."]
    assert [c.name for c in holdback.parsed.tool_calls] == ["add"]
    content = parse_tool_calls(holdback.text, TOOLS).content
    assert "".join(released) == content


def test_holdback_finishes_with_the_rest_of_the_parsed_content():
    holdback = ToolCallHoldback()
    holdback.feed("Sure, ")
    assert holdback.finish("Sure, here.") == " here."
    assert holdback.finish("Different") == ""


def test_a_scripted_tool_call_is_held_to_the_budget(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer, max_position_embeddings=4096)
    reply = format_tool_call("get_weather", {"city": "Paris"})
    guard = ScriptedGuard(model, tiny_tokenizer, [reply], cost=KeywordCost(["paris"]))
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    stream = guard.stream(messages, tools=TOOLS, on_unsafe="return")
    assert "".join(stream) == reply
    assert stream.result.cost == 1.0 and not stream.result.safe
    refused = guard.generate(messages, tools=TOOLS)
    assert refused.refused and parse_tool_calls(refused.text, TOOLS).tool_calls == []
    assert guard.search_sizes == [1, 1]
    assert "get_weather" in guard.rendered_prompts[-1]


def test_a_call_repeated_in_one_response_is_kept_once():
    call = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    other = '<tool_call>{"name": "f", "arguments": {"x": 2}}</tool_call>'
    parsed = parse_tool_calls("\n".join([call, other, call, call]))
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", {"x": 1}), ("f", {"x": 2})]
    bare = parse_tool_calls('[{"name": "f", "arguments": {}}, {"name": "f", "arguments": {}}]')
    assert len(bare.tool_calls) == 1
