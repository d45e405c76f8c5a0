"""Leaving a stream or cancelling a call stops its search, frees its memory, and does not
delay other calls: in the core and in both integrations, sync and async.

Each test leaves at a known point and then counts the base model's forwards per search
(see `search_tracking`): a search told to stop may finish the forward it is in, and no
more; a stream nobody reads makes no forwards at all.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import OTHER_PROMPT, PROMPT
from llama_index.core.llms import ChatMessage, MessageRole
from search_tracking import PAUSE_TIMEOUT, SearchTracker, until, wait_until

from inference_safeguard import GenerationCancelledError, GuardConfig, InferenceGuard
from inference_safeguard.baselines import ARGS
from inference_safeguard.scorers import CallableScorer
from langchain_safeguard import ChatSafeguard
from langchain_safeguard import SafeguardLLM as LangChainLLM
from llamaindex_safeguard import SafeguardLLM as LlamaIndexLLM

CONFIG = GuardConfig(num_candidates=8, beam_width=2, block_size=8, max_new_tokens=128)
SEED = 3
PAUSE_AT = 12
"""Forwards after which a tracked search waits to be cancelled: inside its second block,
before any commit of the default "agreement" mode."""
FIRST_BLOCK = 1 + CONFIG.block_size
"""Forwards until a "block" stream's first delta: the prefill and one block."""


def _free_cost() -> CallableScorer:
    """A cost model that accepts everything, so "block" commits every step."""
    return CallableScorer(lambda prompts, responses: [0.0] * len(responses))


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer) -> InferenceGuard:
    return InferenceGuard(tiny_model, tiny_tokenizer, cost=_free_cost(), config=CONFIG)


@pytest.fixture()
def tracker(guard, monkeypatch) -> SearchTracker:
    return SearchTracker(guard, monkeypatch)


@pytest.fixture(scope="module")
def full_search(tiny_model, tiny_tokenizer) -> int:
    """Forwards of the search these tests leave, run to its end."""
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=_free_cost(), config=CONFIG)
    with pytest.MonkeyPatch.context() as patch:
        tracker = SearchTracker(guard, patch)
        guard.generate(PROMPT, seed=SEED)
        [forwards] = tracker.forwards
    assert forwards > 8 * (PAUSE_AT + 1)
    return forwards


def _assert_stopped(tracker: SearchTracker, index: int, forwards: int) -> None:
    """Search `index` has ended after exactly `forwards` forwards, its KV cache freed."""
    record = tracker.searches[index]
    assert wait_until(record.ended.is_set), "the search is still running"
    assert record.forwards == forwards
    assert not record.state_alive, "the search's decode state is still referenced"


# ------------------------------------------------------------------------- core, sync
def test_breaking_out_of_a_stream_stops_its_search_and_frees_its_cache(guard, tracker, full_search):
    for _ in guard.stream(PROMPT, seed=SEED, stream_commit="block"):
        break
    _assert_stopped(tracker, 0, FIRST_BLOCK)
    with guard.stream(PROMPT, seed=SEED, stream_commit="block") as stream:
        next(stream)
    _assert_stopped(tracker, 1, FIRST_BLOCK)
    assert list(stream) == [] and stream.result is None
    assert full_search > 8 * FIRST_BLOCK  # what running on would have cost


def test_closing_a_stream_from_another_thread_stops_its_search_within_a_token(
    guard, tracker, full_search
):
    tracker.pause_at = PAUSE_AT
    stream = guard.stream(PROMPT, seed=SEED)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            list(stream)
        except BaseException as error:
            errors.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    assert wait_until(lambda: bool(tracker.searches) and tracker.searches[0].paused.is_set())
    stream.close()
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert [type(e) for e in errors] == [GenerationCancelledError]
    _assert_stopped(tracker, 0, PAUSE_AT + 1)  # the forward in flight, and no more
    assert full_search > 8 * (PAUSE_AT + 1)


# ------------------------------------------------------------------------ core, async
async def test_breaking_out_of_an_astream_stops_its_search(guard, tracker, full_search):
    tracker.pause_at = PAUSE_AT  # a search running ahead of its reader would wait here
    async for _ in guard.astream(PROMPT, seed=SEED, stream_commit="block"):
        break
    tracker.pause_at = None
    await guard.agenerate(OTHER_PROMPT, seed=SEED)  # time in which it could run on
    _assert_stopped(tracker, 0, FIRST_BLOCK)
    async with guard.astream(PROMPT, seed=SEED, stream_commit="block") as stream:
        await stream.__anext__()
    _assert_stopped(tracker, 2, FIRST_BLOCK)
    assert full_search > 8 * FIRST_BLOCK  # what running on would have cost


async def test_cancelling_a_task_reading_an_agreement_astream_stops_its_search(
    guard, tracker, full_search
):
    tracker.pause_at = PAUSE_AT
    stream = guard.astream(PROMPT, seed=SEED)  # "agreement": few commits, maybe one at the end

    async def read() -> None:
        async for _ in stream:
            pass

    task = asyncio.create_task(read())
    assert await until(lambda: bool(tracker.searches) and tracker.searches[0].paused.is_set())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The cancellation completes once the search has stopped: no waiting needed.
    assert tracker.searches[0].ended.is_set()
    _assert_stopped(tracker, 0, PAUSE_AT + 1)
    assert stream.result is None
    assert full_search > 8 * (PAUSE_AT + 1)


async def test_agenerate_timing_out_under_wait_for_stops_its_search(guard, tracker, full_search):
    tracker.pause_at = PAUSE_AT  # the search waits here until it is cancelled
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(guard.agenerate(PROMPT, seed=SEED), timeout=1.0)
    assert tracker.searches[0].paused.is_set()
    assert tracker.searches[0].ended.is_set()
    _assert_stopped(tracker, 0, PAUSE_AT + 1)
    assert full_search > 8 * (PAUSE_AT + 1)


async def test_abandoned_streams_do_not_run_while_another_call_decodes(guard, tracker):
    tracker.pause_at = PAUSE_AT
    kept = []
    for seed in range(6):
        stream = guard.astream(PROMPT, seed=seed, stream_commit="block")
        await stream.__anext__()
        if seed % 2:
            kept.append(stream)  # abandoned, but still referenced
        del stream  # the others are dropped unread
    left_at = tracker.forwards
    tracker.pause_at = None
    result = await guard.agenerate(OTHER_PROMPT, seed=SEED)
    assert result.text
    # Not one forward of an abandoned search while the other call decoded.
    assert tracker.forwards[:6] == left_at
    assert all(forwards < PAUSE_AT for forwards in left_at)
    for dropped in range(0, 6, 2):
        _assert_stopped(tracker, dropped, left_at[dropped])
    for stream in kept:
        await stream.aclose()
    for closed in range(1, 6, 2):
        _assert_stopped(tracker, closed, left_at[closed])


async def test_cancelling_a_token_level_baseline_stops_its_decoding(
    tiny_model, tiny_tokenizer, monkeypatch
):
    decoder = ARGS(
        tiny_model, tiny_tokenizer, cost=_free_cost(), reward_weight=0.0, cost_weight=1.0
    )
    forward, worker_forwards = tiny_model.forward, [0]
    paused, release = threading.Event(), threading.Event()

    def counted(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            if worker_forwards[0] == PAUSE_AT:
                paused.set()
                release.wait(PAUSE_TIMEOUT)
            worker_forwards[0] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "forward", counted)
    task = asyncio.create_task(decoder.agenerate(PROMPT, seed=SEED, max_new_tokens=128))
    assert await until(paused.is_set)
    task.cancel()
    await asyncio.sleep(0)  # the task takes the cancellation and sets the search's flag
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    decoder.generate(OTHER_PROMPT, seed=SEED, max_new_tokens=128)  # on this thread
    assert worker_forwards[0] == PAUSE_AT + 1


# ---------------------------------------------------------------------------- LangChain
def test_breaking_out_of_a_langchain_stream_stops_its_search(guard, tracker):
    chat = ChatSafeguard(guard=guard, seed=SEED, stream_commit="block")
    for _ in chat.stream(PROMPT):
        break
    _assert_stopped(tracker, 0, FIRST_BLOCK)
    llm = LangChainLLM(guard=guard, seed=SEED, stream_commit="block")
    for _ in llm.stream(PROMPT):
        break
    _assert_stopped(tracker, 1, FIRST_BLOCK)


async def test_closing_a_langchain_astream_stops_its_search(guard, tracker):
    tracker.pause_at = PAUSE_AT
    for model in (
        ChatSafeguard(guard=guard, seed=SEED, stream_commit="block"),
        LangChainLLM(guard=guard, seed=SEED, stream_commit="block"),
    ):
        chunks = model.astream(PROMPT)
        await chunks.__anext__()
        await chunks.aclose()
    assert await until(tracker.searches[0].ended.is_set)
    _assert_stopped(tracker, 0, FIRST_BLOCK)
    _assert_stopped(tracker, 1, FIRST_BLOCK)


# --------------------------------------------------------------------------- LlamaIndex
async def test_breaking_out_of_a_llamaindex_astream_complete_stops_its_search(guard, tracker):
    llm = LlamaIndexLLM(guard=guard, seed=SEED, stream_commit="block")
    tracker.pause_at = PAUSE_AT
    chunks = await llm.astream_complete(PROMPT)
    async for _ in chunks:
        break
    tracker.pause_at = None
    await llm.acomplete(OTHER_PROMPT)  # time in which the left search could run on
    assert tracker.searches[0].forwards == FIRST_BLOCK
    await chunks.aclose()
    assert await until(tracker.searches[0].ended.is_set)
    _assert_stopped(tracker, 0, FIRST_BLOCK)


def test_breaking_out_of_a_llamaindex_stream_chat_stops_its_search(guard, tracker):
    llm = LlamaIndexLLM(guard=guard, seed=SEED, stream_commit="block")
    for _ in llm.stream_chat([ChatMessage(role=MessageRole.USER, content=PROMPT)]):
        break
    _assert_stopped(tracker, 0, FIRST_BLOCK)
