"""Both integrations decode through the decoder's shared `GuardEngine`: concurrent calls
join one batched search and answer as they would one at a time; `use_engine=False`
and decoders no engine serves (ScriptedGuard) call the decoder directly.

The batching tests hold the engine's first search at its gated cost model until every
call has reached the engine, then count the model's forwards; no timing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest
from conftest import PROMPT
from search_tracking import until
from test_engine import CONFIG, GatedCost, counted_forwards

from inference_safeguard import InferenceGuard
from inference_safeguard.baselines import ARGS
from inference_safeguard.engine import GuardEngine, shared_engine
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.testing import ScriptedGuard
from langchain_safeguard import ChatSafeguard
from langchain_safeguard import SafeguardLLM as LangChainLLM
from llamaindex_safeguard import SafeguardLLM as LlamaIndexLLM

PROMPTS = [f"Tell me about the dog number {i} and its garden." for i in range(16)]


@pytest.fixture()
def gate(keyword_cost: KeywordCost) -> GatedCost:
    return GatedCost(keyword_cost)


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer, gate: GatedCost) -> InferenceGuard:
    return InferenceGuard(tiny_model, tiny_tokenizer, cost=gate, config=CONFIG)


@contextlib.contextmanager
def held(gate: GatedCost) -> Iterator[None]:
    """The gate shut for the block, and open again however the block ends (so that no
    search is left waiting at it)."""
    gate.shut()
    try:
        yield
    finally:
        gate.open()


async def _all_reach(engine: GuardEngine, gate: GatedCost, calls: int) -> bool:
    """Whether `calls` requests wait in or run in `engine` while its search is held."""
    stats = engine.stats
    return await until(lambda: gate.held() and stats().queued + stats().requests_running == calls)


# ------------------------------------------------------------------- batching
async def test_concurrent_langchain_ainvoke_calls_share_one_batched_search(guard, gate, tiny_model):
    with counted_forwards(tiny_model) as separate:
        alone = [ChatSafeguard(guard=guard, use_engine=False).invoke(p).content for p in PROMPTS]
    chat = ChatSafeguard(guard=guard)
    engine = chat.engine
    assert engine is not None
    with counted_forwards(tiny_model) as shared:
        with held(gate):
            tasks = [asyncio.create_task(chat.ainvoke(p)) for p in PROMPTS]
            assert await _all_reach(engine, gate, len(PROMPTS))
        messages = await asyncio.gather(*tasks)

    assert [m.content for m in messages] == alone
    assert shared[0] < separate[0] / 4  # about two searches' forwards instead of 16
    assert engine.stats().responses == len(PROMPTS)
    assert all(m.response_metadata["safety"]["safe"] is not None for m in messages)


async def test_concurrent_llamaindex_acomplete_calls_share_one_batched_search(
    guard, gate, tiny_model
):
    with counted_forwards(tiny_model) as separate:
        alone = [LlamaIndexLLM(guard=guard, use_engine=False).complete(p).text for p in PROMPTS]
    llm = LlamaIndexLLM(guard=guard)
    engine = llm.engine
    assert engine is not None
    with counted_forwards(tiny_model) as shared:
        with held(gate):
            tasks = [asyncio.create_task(llm.acomplete(p)) for p in PROMPTS]
            assert await _all_reach(engine, gate, len(PROMPTS))
        responses = await asyncio.gather(*tasks)

    assert [r.text for r in responses] == alone
    assert shared[0] < separate[0] / 4
    assert engine.stats().responses == len(PROMPTS)
    assert all("safety" in r.raw for r in responses)


async def test_langchain_and_llamaindex_calls_on_one_guard_join_one_search(guard, gate):
    chat, llm = ChatSafeguard(guard=guard), LlamaIndexLLM(guard=guard)
    expected = [chat.invoke(PROMPT).content, llm.complete(PROMPT).text]
    engine = chat.engine
    assert engine is not None
    with held(gate):
        tasks = [
            asyncio.create_task(chat.ainvoke(PROMPT)),
            asyncio.create_task(llm.acomplete(PROMPT)),
        ]
        assert await _all_reach(engine, gate, 2)
        assert engine.stats().groups == 1
    message, response = await asyncio.gather(*tasks)
    assert [message.content, response.text] == expected


# ------------------------------------------------------------------ sharing
def test_every_wrapper_of_one_guard_shares_its_engine(guard):
    engine = shared_engine(guard)
    assert engine is not None
    wrappers = [
        ChatSafeguard(guard=guard),
        ChatSafeguard(guard=guard, budget=2.0),
        LangChainLLM(guard=guard),
        LlamaIndexLLM(guard=guard),
    ]
    assert all(w.engine is engine for w in wrappers)
    wrappers[0].invoke(PROMPT)
    wrappers[3].complete(PROMPT)
    assert engine.stats().responses == 2


def test_an_engine_passed_as_guard_serves_the_calls(guard):
    expected = guard.generate(PROMPT).text
    with GuardEngine(guard, max_rows=64) as engine:
        chat, llm = ChatSafeguard(guard=engine), LlamaIndexLLM(guard=engine)
        assert chat.engine is engine and llm.engine is engine
        assert chat.load_guard() is guard and llm.guard is guard
        assert LangChainLLM(guard=engine).invoke(PROMPT) == expected
        assert llm.complete(PROMPT, formatted=True).text == expected
        assert engine.stats().responses == 2
        assert chat.model_name == guard.lm.name
        with pytest.raises(ValueError, match="use_engine=False"):
            ChatSafeguard(guard=engine, use_engine=False)
        with pytest.raises(ValueError, match="use_engine=False"):
            LlamaIndexLLM(guard=engine, use_engine=False)


def test_use_engine_false_calls_the_decoder_directly(guard):
    engine = shared_engine(guard)
    assert engine is not None
    chat = ChatSafeguard(guard=guard, use_engine=False)
    llm = LlamaIndexLLM(guard=guard, use_engine=False)
    assert chat.engine is None and llm.engine is None
    assert chat.invoke(PROMPT).content == ChatSafeguard(guard=guard).invoke(PROMPT).content
    assert llm.complete(PROMPT).text == LlamaIndexLLM(guard=guard).complete(PROMPT).text
    assert engine.stats().responses == 2  # the two calls with the engine only


async def test_a_scripted_guard_is_called_directly(tiny_model, tiny_tokenizer):
    guard = ScriptedGuard(tiny_model, tiny_tokenizer, ["Hello there."])
    assert shared_engine(guard) is None
    with pytest.raises(TypeError, match="ScriptedGuard"):
        GuardEngine(guard)
    chat, llm = ChatSafeguard(guard=guard), LlamaIndexLLM(guard=guard)
    assert chat.engine is None and llm.engine is None
    assert (await chat.ainvoke("Hi")).content == "Hello there."
    assert (await llm.acomplete("Hi")).text == "Hello there."
    assert guard.searches == 2


def test_a_token_level_decoder_is_called_directly(
    tiny_model, tiny_tokenizer, keyword_cost, length_reward
):
    args = ARGS(tiny_model, tiny_tokenizer, cost=keyword_cost, reward=length_reward)
    assert shared_engine(args) is None
    assert ChatSafeguard(guard=args).engine is None
    assert LlamaIndexLLM(guard=args).engine is None
