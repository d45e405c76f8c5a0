"""LlamaIndex SafeguardLLM bound to a safety session: a chat engine or an agent run
spends one budget across its calls."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool

from inference_safeguard import GuardConfig, SafetySession
from inference_safeguard.scorers import CallableScorer
from inference_safeguard.testing import ScriptedGuard, build_tiny_llama
from llamaindex_safeguard import SafeguardLLM

REFUSAL = GuardConfig().refusal_text
COSTS_ONE = CallableScorer(
    lambda prompt, response: float(bool(response.strip()) and response != REFUSAL),
    batched=False,
)


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.fixture(scope="module")
def long_model(tiny_tokenizer):
    return build_tiny_llama(tiny_tokenizer, seed=0, max_position_embeddings=4096)


def scripted_llm(long_model, tiny_tokenizer, *replies: str) -> SafeguardLLM:
    guard = ScriptedGuard(
        long_model, tiny_tokenizer, replies, cost=COSTS_ONE, config=GuardConfig(budget=5.0)
    )
    return SafeguardLLM(guard=guard, use_engine=False)


def test_a_chat_engine_on_a_bound_llm_is_stopped_by_its_session(long_model, tiny_tokenizer):
    llm = scripted_llm(long_model, tiny_tokenizer, "Hello there.")
    session = SafetySession({"cost": 2.0})
    engine = SimpleChatEngine.from_defaults(llm=llm.with_session(session))
    answers = [engine.chat("Hi!") for _ in range(3)]
    assert [str(a) for a in answers] == ["Hello there.", "Hello there.", REFUSAL]
    assert session.turns == 2 and session.is_spent
    # The unbound LLM and another engine's session are untouched.
    assert llm.session is None and llm.chat([ChatMessage(role="user", content="Hi")])
    other = SafetySession({"cost": 2.0})
    assert str(SimpleChatEngine.from_defaults(llm=llm.with_session(other)).chat("Hi")) != REFUSAL
    assert other.remaining() == {"cost": 1.0}


def test_each_response_of_a_bound_llm_says_what_its_session_has_left(long_model, tiny_tokenizer):
    session = SafetySession({"cost": 1.0}, session_id="conv")
    llm = scripted_llm(long_model, tiny_tokenizer, "Hello there.").with_session(session)
    first, second = (llm.chat([ChatMessage(role="user", content="Hi")]) for _ in range(2))
    assert first.raw is not None and second.raw is not None
    assert first.raw["safety"]["session"] == {
        "id": "conv",
        "remaining": {"cost": 0.0},
        "spent": True,
        "turns": 1,
    }
    assert second.raw["safety"]["refused"] and second.raw["safety"]["session"]["spent"]


def test_a_streamed_chat_on_a_bound_llm_is_charged(long_model, tiny_tokenizer):
    session = SafetySession({"cost": 5.0})
    llm = scripted_llm(long_model, tiny_tokenizer, "Hello there.").with_session(session)
    chunks = list(llm.stream_chat([ChatMessage(role="user", content="Hi")]))
    assert chunks[-1].message.content == "Hello there."
    assert session.charged() == {"cost": 1.0}


async def test_every_llm_call_of_a_function_agent_run_spends_one_budget(long_model, tiny_tokenizer):
    call = "<tool_call>" + json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})
    llm = scripted_llm(long_model, tiny_tokenizer, call + "</tool_call>", "The answer is 5.")
    session = SafetySession({"cost": 1.5})
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(add)], llm=llm.with_session(session))
    output = await agent.run("What is 2 + 3?")
    # The tool call spent 1; the answer would spend 1 more, over what is left: refused.
    assert output.tool_calls and output.tool_calls[0].tool_output.raw_output == 5
    assert str(output.response.content) == REFUSAL
    assert session.charged() == {"cost": 1.0} and session.remaining() == {"cost": 0.5}
