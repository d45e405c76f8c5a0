"""Chat template variables (`chat_template_kwargs`) and thinking models: reasoning is
held to the budget like the answer and returned apart from it, in the core and in both
integrations."""

from __future__ import annotations

import asyncio
import copy

import pytest

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.reasoning import ReasoningMarkers
from inference_safeguard.scorers import CallableScorer, KeywordCost
from inference_safeguard.testing import CHAT_TEMPLATE, ScriptedGuard

TURNS = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
)
THINKING_TEMPLATE = TURNS + (
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
"""Qwen3-style: the model opens its reasoning itself; `enable_thinking=False` pre-fills
an empty one."""
OPENING_TEMPLATE = TURNS + "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
"""DeepSeek-R1-style: the generation prompt opens the reasoning."""

REPLY = "<think>The user asks about a dog. Be careful.</think>\n\nDogs like gardens."
MESSAGES = [{"role": "user", "content": "Tell me about the dog."}]


def _tokenizer(tiny_tokenizer, template: str):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture()
def thinking(tiny_model, tiny_tokenizer) -> ScriptedGuard:
    return ScriptedGuard(tiny_model, _tokenizer(tiny_tokenizer, THINKING_TEMPLATE), [REPLY])


# --- the core -------------------------------------------------------------------------


def test_markers_come_from_the_chat_template(tiny_tokenizer):
    assert ReasoningMarkers.of(_tokenizer(tiny_tokenizer, THINKING_TEMPLATE)) == (
        ReasoningMarkers("<think>", "</think>")
    )
    assert ReasoningMarkers.of(_tokenizer(tiny_tokenizer, CHAT_TEMPLATE)) is None


def test_chat_template_kwargs_reach_the_template_per_call_and_as_a_default(
    tiny_model, tiny_tokenizer
):
    tokenizer = _tokenizer(tiny_tokenizer, THINKING_TEMPLATE)
    guard = ScriptedGuard(tiny_model, tokenizer, ["ok"])
    guard.generate(MESSAGES)
    guard.generate(MESSAGES, chat_template_kwargs={"enable_thinking": False})
    off = ScriptedGuard(
        tiny_model,
        tokenizer,
        ["ok"],
        config=GuardConfig(chat_template_kwargs={"enable_thinking": False}),
    )
    off.generate(MESSAGES)
    off.generate(MESSAGES, chat_template_kwargs={"enable_thinking": True})
    empty_thoughts = ["</think>" in p for p in guard.rendered_prompts + off.rendered_prompts]
    assert empty_thoughts == [False, True, True, False]


def test_chat_template_kwargs_cannot_take_over_the_rendering():
    with pytest.raises(ValueError, match="add_generation_prompt"):
        GuardConfig(chat_template_kwargs={"add_generation_prompt": False})


def test_reasoning_is_returned_apart_from_the_answer(thinking):
    result = thinking.generate(MESSAGES)
    assert result.text == "Dogs like gardens."
    assert result.reasoning == "The user asks about a dog. Be careful."
    assert result.safe and not result.refused


def test_the_cost_model_scores_the_reasoning_too(tiny_model, tiny_tokenizer):
    tokenizer = _tokenizer(tiny_tokenizer, THINKING_TEMPLATE)
    scored: list[str] = []

    def cost(prompts: list[str], responses: list[str]) -> list[float]:
        scored.extend(responses)
        return [float("careful" in r.lower()) for r in responses]

    guard = ScriptedGuard(tiny_model, tokenizer, [REPLY], cost=CallableScorer(cost))
    result = guard.generate(MESSAGES)
    assert REPLY in scored
    assert result.refused and result.cost == 1.0
    assert result.reasoning is None  # withheld with the rest of the response
    assert result.text == GuardConfig().refusal_text


def test_a_template_that_opens_the_reasoning_splits_at_its_end(tiny_model, tiny_tokenizer):
    tokenizer = _tokenizer(tiny_tokenizer, OPENING_TEMPLATE)
    guard = ScriptedGuard(tiny_model, tokenizer, ["Think first.\n</think>\nThe answer."])
    result = guard.generate(MESSAGES)
    assert (result.reasoning, result.text) == ("Think first.", "The answer.")
    # Unfinished reasoning is all reasoning and no answer.
    cut = ScriptedGuard(tiny_model, tokenizer, ["Still thinking about"]).generate(MESSAGES)
    assert (cut.reasoning, cut.text) == ("Still thinking about", "")


def test_a_model_without_markers_keeps_its_text_whole(tiny_model, tiny_tokenizer):
    guard = ScriptedGuard(tiny_model, tiny_tokenizer, [REPLY])
    result = guard.generate(MESSAGES)
    assert result.text == REPLY and result.reasoning is None


@pytest.mark.parametrize("opened", [False, True])
def test_a_growing_response_only_ever_settles_the_start_of_its_answer(opened):
    markers = ReasoningMarkers("<think>", "</think>")
    full = (" Some reasoning </thi" if opened else " <think>Some reasoning") + (
        "</think>\n Answer <b>here</b>."
    )
    full = full.replace("</thi</think>", "</think>")
    _, answer = markers.split(full, opened=opened)
    assert answer == "Answer <b>here</b>."
    settled = [markers.settled_answer(full[:end], opened=opened) for end in range(len(full) + 1)]
    assert all(answer.startswith(part) for part in settled)
    assert settled[-1] == answer
    assert all(part == "" for part in settled[: full.index("</think>") + len("</think>")])


def test_a_stream_emits_the_answer_and_not_the_reasoning(tiny_model, tiny_tokenizer):
    config = GuardConfig(
        num_candidates=1, beam_width=1, block_size=4, max_new_tokens=24, temperature=0.0
    )
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=KeywordCost(["zzzz"]), config=config)
    prompt = "Tell me about the dog and the garden."
    words = guard.generate(prompt).text.split()
    assert len(words) >= 6
    # Treat two words of the greedy response as this model's reasoning markers.
    guard.lm.reasoning_markers = ReasoningMarkers(words[0], words[3])
    result = guard.generate(prompt)
    assert result.reasoning is not None and words[1] in result.reasoning
    with guard.stream(prompt) as stream:
        deltas = list(stream)
    assert "".join(deltas) == result.text == stream.result.text
    assert stream.result.reasoning == result.reasoning
    assert words[1] not in "".join(deltas).split()


# --- the integrations -------------------------------------------------------------------


def test_langchain_returns_reasoning_as_a_reasoning_content_block(thinking):
    from langchain_safeguard import ChatSafeguard

    chat = ChatSafeguard(guard=thinking, chat_template_kwargs={"enable_thinking": True})
    message = chat.invoke(MESSAGES)
    assert message.content == "Dogs like gardens."
    assert message.additional_kwargs["reasoning_content"] == (
        "The user asks about a dog. Be careful."
    )
    assert message.content_blocks[0] == {
        "type": "reasoning",
        "reasoning": "The user asks about a dog. Be careful.",
    }
    chunks = list(chat.stream(MESSAGES))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert whole.content == "Dogs like gardens."
    assert whole.content_blocks[0]["type"] == "reasoning"
    assert not any("careful" in str(chunk.content) for chunk in chunks)


def test_langchain_passes_chat_template_kwargs_per_call_and_as_a_field(thinking):
    from langchain_safeguard import ChatSafeguard, SafeguardLLM

    chat = ChatSafeguard(guard=thinking, chat_template_kwargs={"enable_thinking": False})
    chat.invoke(MESSAGES)
    chat.invoke(MESSAGES, chat_template_kwargs={"enable_thinking": True})
    assert ["</think>" in p for p in thinking.rendered_prompts] == [True, False]
    llm = SafeguardLLM(guard=thinking)
    generation = llm.generate(["Tell me"]).generations[0][0]
    assert generation.generation_info["reasoning"] == "The user asks about a dog. Be careful."


def test_llamaindex_returns_reasoning_in_a_thinking_block(thinking):
    from llama_index.core.base.llms.types import ChatMessage, TextBlock, ThinkingBlock

    from llamaindex_safeguard import SafeguardLLM

    llm = SafeguardLLM(thinking, chat_template_kwargs={"enable_thinking": True})
    response = llm.chat([ChatMessage(role="user", content="Tell me about the dog.")])
    thought, text = response.message.blocks
    assert isinstance(thought, ThinkingBlock) and isinstance(text, TextBlock)
    assert thought.content == "The user asks about a dog. Be careful."
    assert response.message.content == "Dogs like gardens."
    assert response.raw["reasoning"] == thought.content
    *_, last = llm.stream_chat(
        [ChatMessage(role="user", content="Tell me about the dog.")],
        chat_template_kwargs={"enable_thinking": False},
    )
    assert isinstance(last.message.blocks[0], ThinkingBlock)
    assert last.message.content == "Dogs like gardens."
    assert "</think>" in thinking.rendered_prompts[-1]

    async def achat() -> str:
        response = await llm.achat([ChatMessage(role="user", content="Tell me")])
        return response.message.blocks[0].content

    assert asyncio.run(achat()) == thought.content
