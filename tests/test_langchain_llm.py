"""SafeguardLLM (LangChain text completion) on the tiny local Llama."""

from __future__ import annotations

import pytest
from conftest import OTHER_PROMPT, PROMPT
from langchain_core.caches import InMemoryCache
from langchain_core.globals import set_llm_cache
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_helpers import RecordingHandler, count_searches

from inference_safeguard import GuardConfig, InferenceGuard, UnsafeGenerationError
from inference_safeguard.scorers import CallableScorer, KeywordCost
from inference_safeguard.testing import ScriptedGuard
from langchain_safeguard import SafeguardLLM

CONFIG = GuardConfig(num_candidates=8, beam_width=2, block_size=8, max_new_tokens=24)
SAFETY_KEYS = {"safe", "cost", "budget", "reward", "refused", "resample_rounds", "constraints"}


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer) -> InferenceGuard:
    return InferenceGuard(tiny_model, tiny_tokenizer, cost=KeywordCost(["bomb"]), config=CONFIG)


@pytest.fixture()
def llm(guard) -> SafeguardLLM:
    return SafeguardLLM(guard=guard, seed=0)


def test_invoke_completes_the_plain_text_prompt(llm, guard):
    assert llm.invoke(PROMPT) == guard.generate(PROMPT, seed=0).text


def test_generate_decodes_all_prompts_in_one_search_with_metadata(llm, guard, monkeypatch):
    searches = count_searches(guard, monkeypatch)
    result = llm.generate([PROMPT, OTHER_PROMPT, "Hello"])
    assert searches == [3]
    infos = [generations[0].generation_info for generations in result.generations]
    assert all(set(info["safety"]) == SAFETY_KEYS for info in infos)
    assert all(info["finish_reason"] in ("stop", "length") for info in infos)
    assert result.llm_output["token_usage"]["output_tokens"] == sum(
        info["usage"]["output_tokens"] for info in infos
    )
    assert result.llm_output["model_name"] == guard.lm.name


def test_batch_runs_one_search(llm, guard, monkeypatch):
    searches = count_searches(guard, monkeypatch)
    texts = llm.batch([PROMPT, OTHER_PROMPT])
    assert searches == [2]
    assert texts == [llm.invoke(PROMPT), llm.invoke(OTHER_PROMPT)]


async def test_abatch_runs_one_search(llm, guard, monkeypatch):
    searches = count_searches(guard, monkeypatch)
    texts = await llm.abatch([PROMPT, OTHER_PROMPT])
    assert searches == [2]
    assert texts == llm.batch([PROMPT, OTHER_PROMPT])


def test_stream_yields_the_invoke_text_and_fires_callbacks(llm):
    handler = RecordingHandler()
    deltas = list(llm.stream(PROMPT, config={"callbacks": [handler]}))
    assert "".join(deltas) == llm.invoke(PROMPT)
    assert "".join(handler.tokens) == "".join(deltas)
    [end] = handler.ends
    assert set(end.generations[0][0].generation_info["safety"]) == SAFETY_KEYS


async def test_astream_yields_the_invoke_text(llm):
    assert "".join([d async for d in llm.astream(PROMPT)]) == llm.invoke(PROMPT)
    assert await llm.ainvoke(PROMPT) == llm.invoke(PROMPT)


def test_interleaved_streams_each_end_with_their_own_result(tiny_model, tiny_tokenizer):
    """Streams on one guard may interleave (a scripted guard settles each result before
    the stream's first delta); each must end with its own result."""
    length = CallableScorer(lambda prompt, response: float(len(response)), batched=False)
    replies = ["A short one.", "A much longer reply than the first."]
    guard = ScriptedGuard(tiny_model, tiny_tokenizer, replies, cost=length)
    llm = SafeguardLLM(guard=guard, budget=1000.0)
    handlers = [RecordingHandler(), RecordingHandler()]
    streams = [llm.stream(PROMPT, config={"callbacks": [handler]}) for handler in handlers]
    texts = [next(stream) for stream in streams]  # both results are settled now
    texts = [text + "".join(stream) for text, stream in zip(texts, streams, strict=True)]
    assert texts == replies
    for handler, text in zip(handlers, texts, strict=True):
        [end] = handler.ends
        assert end.generations[0][0].generation_info["safety"]["cost"] == len(text)


def test_streaming_true_streams_invoke_through_callbacks(guard):
    handler = RecordingHandler()
    text = SafeguardLLM(guard=guard, seed=0, streaming=True).invoke(
        PROMPT, config={"callbacks": [handler]}
    )
    assert handler.tokens and "".join(handler.tokens) == text


def test_on_unsafe_raise_reaches_the_error_callbacks(tiny_model, tiny_tokenizer):
    cost = CallableScorer(lambda prompt, response: 1.0, batched=False)
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=cost, config=CONFIG)
    llm = SafeguardLLM(guard=guard, seed=0, on_unsafe="raise", resample_rounds=0)
    handler = RecordingHandler()
    with pytest.raises(UnsafeGenerationError) as raised:
        llm.invoke(PROMPT, config={"callbacks": [handler]})
    assert handler.errors == [raised.value]


def test_stop_and_max_tokens_apply_per_call(llm):
    free = llm.invoke(PROMPT)
    word = free.split()[len(free.split()) // 2]
    assert word not in llm.invoke(PROMPT, stop=[word])
    result = llm.generate([PROMPT], max_tokens=3)
    assert result.generations[0][0].generation_info["usage"]["output_tokens"] <= 3


def test_a_stop_string_is_one_stop_sequence_not_one_per_character(tiny_model, tiny_tokenizer):
    guard = ScriptedGuard(tiny_model, tiny_tokenizer, ["Hi. Are You. there"])
    assert SafeguardLLM(guard=guard).invoke("hi", stop="You.") == "Hi. Are "
    assert SafeguardLLM(guard=guard, stop="You.").invoke("hi") == "Hi. Are "


def test_the_llm_cache_never_hands_one_guards_answer_to_another(tiny_model, tiny_tokenizer):
    def scripted(cost: KeywordCost, **settings: object) -> SafeguardLLM:
        guard = ScriptedGuard(tiny_model, tiny_tokenizer, ["Hello there."], cost=cost)
        return SafeguardLLM(guard=guard, **settings)

    set_llm_cache(InMemoryCache())
    try:
        lax = scripted(KeywordCost(["goodbye"]))
        assert lax.invoke("Hi") == "Hello there."
        strict = scripted(KeywordCost(["hello"]))
        assert strict.invoke("Hi") == strict.guard.config.refusal_text
        assert strict.guard.searches == 1
        assert lax.invoke("Hi") == "Hello there." and lax.guard.searches == 1
    finally:
        set_llm_cache(None)


def test_lcel_prompt_llm_parser_pipeline(llm):
    chain = PromptTemplate.from_template("Q: {question}\nA:") | llm | StrOutputParser()
    answer = chain.invoke({"question": "Where is the dog?"})
    assert answer == llm.invoke("Q: Where is the dog?\nA:")
