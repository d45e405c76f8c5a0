"""GuardEngine: requests join a running search at block boundaries and leave it when
done, cancelled or timed out, each decoding as it would alone.

The tests hold the scheduler inside a step with a gated cost model (its calls wait
while the gate is shut), act while it waits, then let it go on; they wait for what the
engine reports and then count, never time it.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from search_tracking import until, wait_until
from test_cache_layouts import causal_lm

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.baselines import ARGS, BestOfN
from inference_safeguard.engine import GuardEngine, serves, shared_engine
from inference_safeguard.errors import (
    EngineClosedError,
    EngineOverloadedError,
    GenerationTimeoutError,
    InvalidPromptError,
)
from inference_safeguard.scorers import KeywordCost, Scorer
from inference_safeguard.testing import ScriptedGuard, build_random_critic

CONFIG = GuardConfig(
    num_candidates=4, beam_width=2, block_size=4, max_new_tokens=16, seed=7, on_unsafe="return"
)
PROMPT = "Tell me about the dog and the garden."
LONG_PROMPT = (
    "What is a good name for a small bird that sings in the garden every morning, "
    "and what should I feed it in the winter?"
)


class GatedCost(Scorer):
    """A cost model whose calls wait while its gate is shut.

    Args:
        inner: the scorer that gives the costs.
    """

    def __init__(self, inner: Scorer) -> None:
        self.inner = inner
        self._gate = threading.Condition()
        self._shut = False
        self._permits = 0
        self.waiting = 0
        """Calls waiting at the gate now."""

    def shut(self) -> None:
        with self._gate:
            self._shut, self._permits = True, 0

    def open(self) -> None:
        with self._gate:
            self._shut = False
            self._gate.notify_all()

    def let_one_through(self) -> None:
        with self._gate:
            self._permits += 1
            self._gate.notify_all()

    def held(self) -> bool:
        """Whether a call waits at the gate with no permit left for it."""
        with self._gate:
            return self.waiting > 0 and self._permits == 0

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        with self._gate:
            self.waiting += 1
            self._gate.wait_for(lambda: not self._shut or self._permits > 0, timeout=60)
            if self._shut and self._permits:
                self._permits -= 1
            self.waiting -= 1
        return self.inner(prompts, responses)


@pytest.fixture()
def gate(keyword_cost: KeywordCost) -> GatedCost:
    return GatedCost(keyword_cost)


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer, gate: GatedCost) -> InferenceGuard:
    return InferenceGuard(tiny_model, tiny_tokenizer, cost=gate, config=CONFIG)


@contextmanager
def counted_forwards(model: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the model's forwards (prefills and decoded tokens) in the block."""
    count = [0]
    hook = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        hook.remove()


def step_until(gate: GatedCost, condition: Callable[[], bool]) -> bool:
    """Let the held scheduler through one cost-model call at a time until `condition`
    holds while it waits at the gate again."""
    for _ in range(100):
        if gate.held() and condition():
            return True
        gate.let_one_through()
        if not wait_until(gate.held):
            return False
    return False


# ------------------------------------------------------------------- batching
async def test_concurrent_requests_share_the_decode_forwards_and_decode_as_alone(
    guard, gate, tiny_model
):
    prompts = [f"Tell me about the dog number {i} and its garden." for i in range(16)]
    with counted_forwards(tiny_model) as separate:
        alone = [guard.generate(p) for p in prompts]
    with GuardEngine(guard) as engine:
        gate.shut()
        with counted_forwards(tiny_model) as shared:
            tasks = [asyncio.create_task(engine.agenerate(p)) for p in prompts]
            waiting = lambda: engine.stats().queued + engine.stats().requests_running  # noqa: E731
            assert await until(lambda: gate.held() and waiting() == 16)
            gate.open()
            results = await asyncio.gather(*tasks)
        stats = engine.stats()

    assert [r.token_ids for r in results] == [a.token_ids for a in alone]
    assert shared[0] < separate[0] / 4  # about two searches' forwards instead of 16
    assert stats.responses == 16 and stats.requests_running == 0 and stats.rows_in_flight == 0
    assert stats.tokens_generated == sum(len(r.token_ids) for r in results)
    assert stats.resample_rounds == sum(r.stats.resample_rounds for r in results)


def test_a_request_joining_a_running_search_decodes_as_it_would_alone(guard, gate):
    # The joiner's prompt is longer (the running rows' cache is left-padded) and its
    # max_new_tokens and budget are its own: its last block is shorter than the
    # running prompt's block at that step.
    first_alone = guard.generate(PROMPT, max_new_tokens=24)
    joiner_alone = guard.generate(LONG_PROMPT, max_new_tokens=10, budget=1.0, seed=3)
    with GuardEngine(guard) as engine, ThreadPoolExecutor(2) as pool:
        gate.shut()
        first = pool.submit(engine.generate, PROMPT, max_new_tokens=24)
        assert wait_until(gate.held)  # the first request's first block is being scored
        joiner = pool.submit(engine.generate, LONG_PROMPT, max_new_tokens=10, budget=1.0, seed=3)
        assert wait_until(lambda: engine.stats().queued == 1)
        assert step_until(gate, lambda: engine.stats().requests_running == 2)
        assert engine.stats().groups == 1  # one search holds both
        gate.open()
        assert first.result().token_ids == first_alone.token_ids
        assert joiner.result().token_ids == joiner_alone.token_ids
        assert joiner.result().budget == 1.0 and joiner.result().text == joiner_alone.text


@pytest.mark.filterwarnings("ignore::inference_safeguard.errors.RefusalOverBudgetWarning")
def test_stop_strings_and_refusals_are_per_request_within_one_search(guard, gate):
    stop = (guard.generate(PROMPT).text.split()[2],)
    refuse = {"budget": -1.0, "on_unsafe": "refuse"}
    expected = [guard.generate(PROMPT, stop=stop), guard.generate(LONG_PROMPT, **refuse)]
    assert expected[1].refused
    with GuardEngine(guard) as engine, ThreadPoolExecutor(2) as pool:
        gate.shut()
        stopped = pool.submit(engine.generate, PROMPT, stop=stop)
        assert wait_until(gate.held)
        refused = pool.submit(engine.generate, LONG_PROMPT, **refuse)
        assert step_until(gate, lambda: engine.stats().requests_running == 2)
        assert engine.stats().groups == 1
        gate.open()
        results = [stopped.result(), refused.result()]
        assert [(r.token_ids, r.text, r.refused) for r in results] == [
            (r.token_ids, r.text, r.refused) for r in expected
        ]
        assert engine.stats().refusals == 1


def test_a_constrained_request_joins_an_unconstrained_search_and_keeps_its_grammar(guard, gate):
    digits = {"response_format": {"type": "regex", "pattern": "[0-9]{3,12}"}}
    expected = [guard.generate(PROMPT).token_ids, guard.generate(LONG_PROMPT, **digits)]
    assert expected[1].text.isdigit()
    with GuardEngine(guard) as engine, ThreadPoolExecutor(2) as pool:
        gate.shut()
        free = pool.submit(engine.generate, PROMPT)
        assert wait_until(gate.held)
        constrained = pool.submit(engine.generate, LONG_PROMPT, **digits)
        assert step_until(gate, lambda: engine.stats().requests_running == 2)
        assert engine.stats().groups == 1
        gate.open()
        assert free.result().token_ids == expected[0]
        assert constrained.result().token_ids == expected[1].token_ids


def test_critic_mode_requests_join_and_decode_as_alone(tiny_model, tiny_tokenizer, gate):
    critic = build_random_critic(tiny_model, budget=0.0, block_size=CONFIG.block_size)
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=gate, critic=critic, config=CONFIG)
    expected = [guard.generate(PROMPT).token_ids, guard.generate(LONG_PROMPT).token_ids]
    with GuardEngine(guard) as engine, ThreadPoolExecutor(2) as pool:
        gate.shut()
        first = pool.submit(engine.generate, PROMPT)
        assert wait_until(gate.held)
        second = pool.submit(engine.generate, LONG_PROMPT)
        assert step_until(gate, lambda: engine.stats().requests_running == 2)
        assert engine.stats().groups == 1
        gate.open()
        assert [first.result().token_ids, second.result().token_ids] == expected


def test_requests_of_different_search_shapes_run_in_separate_groups(guard, gate):
    wide = {"num_candidates": 8, "beam_width": 4}
    expected = [guard.generate(PROMPT), guard.generate(LONG_PROMPT, **wide)]
    with GuardEngine(guard) as engine, ThreadPoolExecutor(2) as pool:
        gate.shut()
        first = pool.submit(engine.generate, PROMPT)
        assert wait_until(gate.held)
        second = pool.submit(engine.generate, LONG_PROMPT, **wide)
        assert step_until(gate, lambda: engine.stats().requests_running == 2)
        assert engine.stats().groups == 2
        gate.open()
        assert [first.result().token_ids, second.result().token_ids] == [
            r.token_ids for r in expected
        ]


# ------------------------------------------------------------------- leaving
async def test_a_cancelled_request_leaves_and_frees_its_rows_while_others_go_on(guard, gate):
    expected = guard.generate(LONG_PROMPT, max_new_tokens=32)
    with GuardEngine(guard) as engine:
        gate.shut()
        staying = asyncio.create_task(engine.agenerate(LONG_PROMPT, max_new_tokens=32))
        assert await until(gate.held)
        leaving = asyncio.create_task(engine.agenerate(PROMPT, max_new_tokens=32))
        assert await until(lambda: engine.stats().queued == 1)
        assert await asyncio.to_thread(
            step_until, gate, lambda: engine.stats().requests_running == 2
        )
        assert engine.stats().rows_in_flight > CONFIG.num_candidates
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert await asyncio.to_thread(
            step_until, gate, lambda: engine.stats().requests_running == 1
        )
        assert engine.stats().rows_in_flight <= CONFIG.num_candidates
        gate.open()
        assert (await staying).token_ids == expected.token_ids
        assert await until(lambda: engine.stats().requests_running == 0)
        assert engine.stats().rows_in_flight == 0


def test_a_closed_stream_leaves_the_engine(guard):
    with GuardEngine(guard) as engine:
        stream = engine.stream(PROMPT, max_new_tokens=64)
        stream.close()
        assert wait_until(lambda: engine.stats().queued + engine.stats().requests_running == 0)
        assert engine.stats().rows_in_flight == 0
        assert engine.generate(PROMPT).token_ids == guard.generate(PROMPT).token_ids


def test_a_request_past_its_timeout_fails_and_the_others_finish(guard, gate):
    expected = guard.generate(LONG_PROMPT)
    with GuardEngine(guard) as engine, ThreadPoolExecutor(2) as pool:
        gate.shut()
        other = pool.submit(engine.generate, LONG_PROMPT)
        assert wait_until(gate.held)
        late = pool.submit(engine.generate, PROMPT, timeout=0.01)
        assert wait_until(lambda: engine.stats().queued == 1)
        threading.Event().wait(0.05)  # past the late request's deadline
        gate.open()
        with pytest.raises(GenerationTimeoutError, match="timeout"):
            late.result()
        assert other.result().token_ids == expected.token_ids
        assert wait_until(lambda: engine.stats().requests_running == 0)


# ------------------------------------------------------------------- caps
def test_a_full_queue_refuses_a_request_at_once(guard, gate):
    with GuardEngine(guard, max_queued=1) as engine, ThreadPoolExecutor(2) as pool:
        gate.shut()
        running = pool.submit(engine.generate, PROMPT)
        assert wait_until(gate.held)
        queued = pool.submit(engine.generate, LONG_PROMPT)
        assert wait_until(lambda: engine.stats().queued == 1)
        with pytest.raises(EngineOverloadedError, match="max_queued"):
            engine.generate("One more, please.")
        gate.open()
        assert running.result().text is not None and queued.result().text is not None


def test_requests_beyond_the_row_cap_wait_for_rows_instead_of_failing(guard, gate):
    prompts = [PROMPT, LONG_PROMPT, "What does the dog eat?"]
    expected = [guard.generate(p).token_ids for p in prompts]
    with GuardEngine(guard, max_rows=CONFIG.num_candidates) as engine:
        with pytest.raises(EngineOverloadedError, match="max_rows"):
            engine.generate_batch(prompts[:2])  # needs 8 rows: it could never run
        with ThreadPoolExecutor(3) as pool:
            gate.shut()
            first = pool.submit(engine.generate, prompts[0])
            assert wait_until(gate.held)
            rest = [pool.submit(engine.generate, p) for p in prompts[1:]]
            assert wait_until(lambda: engine.stats().queued == 2)
            assert engine.stats().requests_running == 1
            gate.open()
            assert [f.result().token_ids for f in [first, *rest]] == expected


def test_closing_the_engine_fails_queued_and_running_requests(guard, gate):
    engine = GuardEngine(guard, max_rows=CONFIG.num_candidates)
    with ThreadPoolExecutor(3) as pool:
        gate.shut()
        running = pool.submit(engine.generate, PROMPT)
        assert wait_until(gate.held)
        queued = pool.submit(engine.generate, LONG_PROMPT)
        assert wait_until(lambda: engine.stats().queued == 1)
        closing = pool.submit(engine.close)
        gate.open()
        closing.result()
        for call in (running, queued):
            with pytest.raises(EngineClosedError, match="closed"):
                call.result()
    with pytest.raises(EngineClosedError, match="closed"):
        engine.generate(PROMPT)


# ------------------------------------------------------------------- the API
def test_streaming_through_the_engine_gives_the_text_of_the_decoder(guard):
    expected = guard.generate(PROMPT)
    streamed_by_block = "".join(guard.stream(PROMPT, stream_commit="block"))
    with GuardEngine(guard) as engine:
        stream = engine.stream(PROMPT)
        assert "".join(stream) == expected.text
        assert stream.result is not None and stream.result.token_ids == expected.token_ids

        async def by_block() -> str:
            return "".join([d async for d in engine.astream(PROMPT, stream_commit="block")])

        assert asyncio.run(by_block()) == streamed_by_block


def test_the_engine_stands_in_for_its_decoder(guard):
    with GuardEngine(guard) as engine:
        assert engine.lm is guard.lm and engine.config == guard.config
        assert engine.identity() == guard.identity()
        batch = engine.generate_batch([PROMPT, LONG_PROMPT], budget=2.0)
        assert [r.token_ids for r in batch] == [
            r.token_ids for r in guard.generate_batch([PROMPT, LONG_PROMPT], budget=2.0)
        ]
        with pytest.raises(InvalidPromptError, match="no prompts"):
            engine.generate_batch([])


def test_block_search_baselines_run_through_the_engine_and_args_is_refused(
    tiny_model, tiny_tokenizer, keyword_cost, length_reward
):
    best_of_n = BestOfN(tiny_model, tiny_tokenizer, cost=keyword_cost, config=CONFIG)
    expected = best_of_n.generate(PROMPT)
    with GuardEngine(best_of_n) as engine:
        assert engine.generate(PROMPT).token_ids == expected.token_ids
        assert "".join(engine.stream(PROMPT)) == expected.text  # at once, at the end
    args = ARGS(tiny_model, tiny_tokenizer, cost=keyword_cost, reward=length_reward)
    with pytest.raises(TypeError, match="ARGS"):
        GuardEngine(args)


@pytest.mark.parametrize("model_type", ["mistral", "qwen3_5_text"])
def test_a_model_whose_cache_cannot_take_rows_runs_a_joiner_in_its_own_group(
    model_type, tiny_tokenizer
):
    gate = GatedCost(KeywordCost(["the", "a"]))
    guard = InferenceGuard(
        causal_lm(model_type, tiny_tokenizer).model, tiny_tokenizer, cost=gate, config=CONFIG
    )
    expected = [guard.generate(PROMPT).token_ids, guard.generate(LONG_PROMPT).token_ids]
    with GuardEngine(guard) as engine, ThreadPoolExecutor(2) as pool:
        gate.shut()
        first = pool.submit(engine.generate, PROMPT)
        assert wait_until(gate.held)
        second = pool.submit(engine.generate, LONG_PROMPT)
        assert step_until(gate, lambda: engine.stats().requests_running == 2)
        assert engine.stats().groups == 2
        gate.open()
        assert [first.result().token_ids, second.result().token_ids] == expected


# ---------------------------------------------------------------------- sharing
def test_a_shared_engine_serves_every_caller_and_is_freed_when_idle_and_unheld(guard):
    engine = shared_engine(guard)
    assert engine is not None and shared_engine(guard) is engine
    expected = engine.generate(PROMPT).token_ids
    freed = weakref.ref(engine)
    del engine  # its scheduler ended with the last request: nothing else holds it
    assert wait_until(lambda: gc.collect() >= 0 and freed() is None)
    again = shared_engine(guard)
    assert again is not None and again.generate(PROMPT).token_ids == expected


def test_decoders_that_decode_their_own_way_get_no_engine(tiny_model, tiny_tokenizer):
    scripted = ScriptedGuard(tiny_model, tiny_tokenizer, ["Hello."])
    assert not serves(scripted) and shared_engine(scripted) is None
    with pytest.raises(TypeError, match="ScriptedGuard"):
        GuardEngine(scripted)


def test_an_engine_that_overflows_to_its_decoder_runs_a_call_it_cannot_take_there(guard):
    expected = [r.token_ids for r in guard.generate_batch([PROMPT, LONG_PROMPT])]
    with GuardEngine(guard, max_rows=CONFIG.num_candidates, overflow="decoder") as engine:
        results = engine.generate_batch([PROMPT, LONG_PROMPT])  # two prompts' rows: too many
        assert [r.token_ids for r in results] == expected
        assert engine.stats().responses == 0  # the decoder ran it
    assert shared_engine(guard).overflow == "decoder"
