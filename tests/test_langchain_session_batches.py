"""LangChain models on safety sessions: the completion model's sessions, and batches whose
inputs are on sessions, decoded once each and charged in input order per session."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import OTHER_PROMPT, PROMPT

pytest.importorskip("langchain_core")

from langchain_core.messages import HumanMessage

from inference_safeguard import GuardConfig, InferenceGuard, SafetySession
from inference_safeguard.scorers import CallableScorer
from langchain_safeguard import ChatSafeguard, SafeguardLLM

REFUSAL = GuardConfig().refusal_text


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer, small_config) -> InferenceGuard:
    cost = CallableScorer(
        lambda prompt, response: float(bool(response.strip()) and response != REFUSAL),
        batched=False,
    )
    return InferenceGuard(
        tiny_model,
        tiny_tokenizer,
        cost=cost,
        config=small_config.with_overrides(budget=5.0, max_new_tokens=8),
    )


@pytest.fixture()
def decoded(guard, monkeypatch) -> list[int]:
    """The size of each search the guard runs."""
    searches: list[int] = []
    search = guard._generate_batch

    def counted(prompts, *args: Any, **kwargs: Any) -> Any:
        searches.append(len(prompts))
        return search(prompts, *args, **kwargs)

    monkeypatch.setattr(guard, "_generate_batch", counted)
    return searches


def on(session_id: str) -> dict[str, Any]:
    return {"configurable": {"session_id": session_id}}


def llm_of(guard: InferenceGuard, **settings: Any) -> SafeguardLLM:
    return SafeguardLLM(
        guard=guard, seed=0, session_budgets={"cost": 2.0}, use_engine=False, **settings
    )


def chat_of(guard: InferenceGuard) -> ChatSafeguard:
    return ChatSafeguard(guard=guard, seed=0, session_budgets={"cost": 2.0}, use_engine=False)


# --------------------------------------------------------------- completion model
def test_the_completion_model_charges_the_session_its_config_names(guard, decoded):
    llm = llm_of(guard)
    answers = [llm.invoke(PROMPT, config=on("alice")) for _ in range(3)]
    assert answers[:2] != [REFUSAL, REFUSAL] and answers[2] == REFUSAL
    assert decoded == [1, 1]  # the refusal generated nothing
    assert llm.sessions is not None and llm.sessions.get("alice").remaining() == {"cost": 0.0}
    assert llm.invoke(PROMPT, config=on("bob")) != REFUSAL  # sessions are isolated
    assert llm.invoke(PROMPT) != REFUSAL  # no session: per response only
    assert llm.sessions.get("bob").charged() == {"cost": 1.0} and len(llm.sessions) == 2


def test_the_completion_models_record_says_what_the_session_has_left(guard):
    result = llm_of(guard).generate([PROMPT], session=SafetySession({"cost": 3.0}))
    info = result.generations[0][0].generation_info
    assert info is not None
    assert info["safety"]["session"] == {
        "id": None,
        "remaining": {"cost": 2.0},
        "spent": False,
        "turns": 1,
    }


@pytest.mark.parametrize("streaming", [False, True])
def test_the_completion_models_streams_are_charged_to_the_session(guard, decoded, streaming):
    llm = llm_of(guard, streaming=streaming)
    streamed = ["".join(llm.stream(PROMPT, config=on("s"))) for _ in range(2)]
    assert REFUSAL not in streamed
    assert asyncio.run(_joined(llm.astream(PROMPT, config=on("s")))) == REFUSAL
    assert llm.invoke(PROMPT, config=on("s")) == REFUSAL
    assert decoded == [1, 1]
    assert llm.sessions is not None and llm.sessions.get("s").turns == 2


async def _joined(stream) -> str:
    return "".join([chunk async for chunk in stream])


def test_the_completion_models_async_calls_are_charged(guard, decoded):
    llm = llm_of(guard)
    answers = [asyncio.run(llm.ainvoke(PROMPT, config=on("a"))) for _ in range(3)]
    assert answers[2] == REFUSAL and REFUSAL not in answers[:2]
    assert decoded == [1, 1]


# ------------------------------------------------------------------------ batches
PROMPTS = [PROMPT, OTHER_PROMPT, "Where is the cat?", "Name a colour."]


def _batch_configs() -> list[dict[str, Any]]:
    """Three inputs on session x (budget 2: the third is refused), one on y, two on none."""
    return [on("x"), on("x"), {}, on("y"), on("x"), {}]


def _inputs() -> list[str]:
    return [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[2], PROMPTS[3]]


def _check_batch(model: Any, texts: list[str], decoded: list[int]) -> None:
    assert [t == REFUSAL for t in texts] == [False, False, False, False, True, False]
    # Decoded once each: two on x, one on y, the two on no session in one search.
    assert sorted(decoded) == [1, 1, 1, 2]
    assert model.sessions.get("x").turns == 2 and model.sessions.get("x").is_spent
    assert model.sessions.get("y").charged() == {"cost": 1.0}


def test_a_completion_batch_on_sessions_decodes_each_input_once_in_order(guard, decoded):
    llm = llm_of(guard)
    texts = llm.batch(_inputs(), _batch_configs())
    _check_batch(llm, texts, decoded)
    # Session x's calls ran in input order: its first two inputs got the answers.
    assert texts[0] == llm_of(guard).invoke(PROMPTS[0])
    assert texts[1] == llm_of(guard).invoke(PROMPTS[1])


def test_a_chat_batch_on_sessions_decodes_each_input_once_in_order(guard, decoded):
    chat = chat_of(guard)
    messages = [[HumanMessage(p)] for p in _inputs()]
    replies = chat.batch(messages, _batch_configs())
    _check_batch(chat, [str(r.content) for r in replies], decoded)
    record = replies[4].response_metadata["safety"]
    assert record["refused"] and record["session"]["id"] == "x" and record["session"]["spent"]
    assert "session" not in replies[2].response_metadata["safety"]


def test_async_batches_on_sessions_decode_each_input_once(guard, decoded):
    llm = llm_of(guard)
    _check_batch(llm, asyncio.run(llm.abatch(_inputs(), _batch_configs())), decoded)
    decoded.clear()
    chat = chat_of(guard)
    messages = [[HumanMessage(p)] for p in _inputs()]
    replies = asyncio.run(chat.abatch(messages, _batch_configs()))
    _check_batch(chat, [str(r.content) for r in replies], decoded)


def test_a_batch_given_one_session_is_charged_input_by_input(guard, decoded):
    session = SafetySession({"cost": 1.0})
    texts = llm_of(guard).batch(PROMPTS[:3], session=session)
    assert [t == REFUSAL for t in texts] == [False, True, True]
    assert decoded == [1]
    replies = chat_of(guard).batch([[HumanMessage(p)] for p in PROMPTS[:2]], session=session)
    assert all(r.content == REFUSAL for r in replies) and decoded == [1]


def test_a_batch_on_a_spent_session_raises_once_every_input_is_done(tiny_model, tiny_tokenizer):
    cost = CallableScorer(lambda prompt, response: float(bool(response.strip())), batched=False)
    guard = InferenceGuard(
        tiny_model, tiny_tokenizer, cost=cost, config=GuardConfig(budget=5.0, max_new_tokens=4)
    )
    llm = SafeguardLLM(
        guard=guard,
        seed=0,
        session_budgets={"cost": 1.0},
        session_on_spent="raise",
        use_engine=False,
    )
    outputs = llm.batch(PROMPTS[:3], [on("z")] * 3, return_exceptions=True)
    assert isinstance(outputs[0], str)
    assert [type(o).__name__ for o in outputs[1:]] == ["SessionBudgetSpentError"] * 2
    with pytest.raises(Exception, match="spent"):
        llm.batch(PROMPTS[:2], [on("z")] * 2)


def test_a_chat_batch_on_sessions_through_the_engine_is_charged_in_order(guard):
    chat = ChatSafeguard(guard=guard, seed=0, session_budgets={"cost": 2.0})
    replies = chat.batch([[HumanMessage(p)] for p in _inputs()], _batch_configs())
    assert [r.content == REFUSAL for r in replies] == [False, False, False, False, True, False]
    assert chat.sessions is not None and chat.sessions.get("x").turns == 2
