"""ChatSafeguard with safety sessions: one budget per session id across calls and chains."""

from __future__ import annotations

import pytest
from conftest import PROMPT

pytest.importorskip("langchain_core")

from langchain_core.chat_history import InMemoryChatMessageHistory
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory

from inference_safeguard import GuardConfig, InferenceGuard, SafetySession
from inference_safeguard.scorers import CallableScorer
from langchain_safeguard import ChatSafeguard

REFUSAL = GuardConfig().refusal_text


@pytest.fixture()
def chat(tiny_model, tiny_tokenizer, small_config) -> ChatSafeguard:
    cost = CallableScorer(
        lambda prompt, response: float(bool(response.strip()) and response != REFUSAL),
        batched=False,
    )
    guard = InferenceGuard(
        tiny_model,
        tiny_tokenizer,
        cost=cost,
        config=small_config.with_overrides(budget=5.0, max_new_tokens=8),
    )
    return ChatSafeguard(guard=guard, seed=0, session_budgets={"cost": 2.0}, use_engine=False)


def test_message_history_sessions_each_carry_their_own_budget(chat):
    histories: dict[str, InMemoryChatMessageHistory] = {}
    talk = RunnableWithMessageHistory(
        chat, lambda session_id: histories.setdefault(session_id, InMemoryChatMessageHistory())
    )
    replies = [
        talk.invoke([HumanMessage(PROMPT)], config={"configurable": {"session_id": "alice"}})
        for _ in range(3)
    ]
    records = [reply.response_metadata["safety"] for reply in replies]
    assert [r["refused"] for r in records] == [False, False, True]
    assert replies[2].content == REFUSAL
    assert chat.sessions is not None and chat.sessions.get("alice").remaining() == {"cost": 0.0}
    other = talk.invoke([HumanMessage(PROMPT)], config={"configurable": {"session_id": "bob"}})
    assert not other.response_metadata["safety"]["refused"]
    assert chat.sessions.get("bob").remaining() == {"cost": 1.0}


def test_every_model_call_of_a_run_is_charged_to_its_session(chat):
    follow_up = RunnableLambda(lambda reply: [HumanMessage(f"{reply.content} And then?")])
    run = chat | follow_up | chat
    answer = run.invoke([HumanMessage(PROMPT)], config={"configurable": {"session_id": "run-1"}})
    assert isinstance(answer, AIMessage)
    session = chat.sessions.get("run-1") if chat.sessions else None
    assert session is not None and session.turns == 2 and session.is_spent


def test_a_session_can_be_passed_per_call_and_calls_without_one_are_not_charged(chat):
    session = SafetySession({"cost": 1.0})
    chat.invoke([HumanMessage(PROMPT)], session=session)
    assert session.is_spent
    refused = chat.invoke([HumanMessage(PROMPT)], session=session)
    assert refused.response_metadata["safety"]["refused"]
    free = chat.invoke([HumanMessage(PROMPT)])
    assert not free.response_metadata["safety"]["refused"]
    assert chat.sessions is not None and len(chat.sessions) == 0


def test_a_streamed_session_call_is_charged(chat):
    config = {"configurable": {"session_id": "stream"}}
    text = "".join(chunk.content for chunk in chat.stream([HumanMessage(PROMPT)], config=config))
    assert text and chat.sessions is not None
    assert chat.sessions.get("stream").charged() == {"cost": 1.0}
