"""`GuardEngine`: one model serving many requests with continuous batching at block
granularity.

Calling a decoder from many threads runs one search per call, side by side, each with
its own small batch. An engine instead owns the decoder and runs one scheduler thread:
requests (sync, async, streaming) wait in a queue, join a running search at the next
block boundary (their prompts prefilled and their rows appended to its decode state),
and leave it when their search ends, when they are cancelled (cancel flag, task
cancellation, stream closed) or when they time out, freeing their rows at once.

Requests share a running search when their settings give the same search shape; each
keeps its own `budget` (or `budgets`, one per constraint), `max_new_tokens`, `stop`,
`seed`, `stream_commit`, and what only shapes the prompt or the result (`tools`,
`response_format`, `tool_choice`, `parallel_tool_calls`, `chat_template_kwargs`,
`on_unsafe`, `refusal_text`): see
`PER_REQUEST_FIELDS`. Requests that differ in anything else (candidates, beams, block
size, resampling, penalties, sampling, scorer) form separate groups, which take turns
one block at a time.

A prompt decodes the same alone or joined with others: its sampler is seeded for it
alone (see `Decoder._seeds`), its candidates are scored, resampled and pruned within
its own group of rows, and joining left-pads the shorter KV cache with masked
positions (the requests that arrived during one step are prefilled together, in one
left-padded forward). The same, not bit for bit: as with `Decoder.generate_batch` against
`generate`, a row's float32 logits can move by rounding (about 1e-6 on the tiny test
Llama on CPU) when its keys gain left padding (the attention's softmax and value sums
run over a longer key axis, in another reduction order) or when SDPA takes another
kernel for a batch whose mask has padding; eager attention over rows whose padding is
unchanged gives identical logits. A sampled token can change only where two tokens'
perturbed logits lie within that rounding of each other.

Only models whose cache is full attention can merge rows; on a model with
sliding-window or linear-attention layers, requests that arrive while a search runs
form a new group of the same shape (batched among themselves) instead.

Cancellation and timeouts act at block boundaries (closing the engine stops within
one decoded token). The scorers are called from the scheduler thread during the
search and from the callers' threads for the final check, as when a decoder serves
concurrent calls.

The scheduler thread runs while there are requests and ends when the last one leaves
(the next request starts another), so an idle engine holds no thread and is freed
with its last reference. `shared_engine` gives every caller of one decoder the same
engine, so that separate wrappers of one model (the LangChain and LlamaIndex
integrations) batch their calls together.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Protocol, cast

from inference_safeguard.config import GuardConfig
from inference_safeguard.decoder import Decoder, Response, ToolsInput
from inference_safeguard.errors import (
    EngineClosedError,
    EngineOverloadedError,
    GenerationCancelledError,
    GenerationTimeoutError,
)
from inference_safeguard.guard import InferenceGuard
from inference_safeguard.lm import EncodedPrompt, LanguageModel, PromptInput
from inference_safeguard.results import GuardResult
from inference_safeguard.search import (
    BlockSearch,
    CandidateEvaluator,
    PromptSearch,
    RunningSearch,
)
from inference_safeguard.session import SafetySession
from inference_safeguard.streaming import AsyncGuardStream, GuardStream

PER_REQUEST_FIELDS = frozenset(
    {
        "budget",
        "budgets",
        "max_new_tokens",
        "stop",
        "seed",
        "stream_commit",
        "on_unsafe",
        "refusal_text",
        "chat_template_kwargs",
        "response_format",
        "tool_choice",
        "parallel_tool_calls",
    }
)
"""`GuardConfig` fields that may differ between requests of one running search."""


class _SearchDecoder(Protocol):
    """What the engine needs of a decoder: its block search and the plan of a call."""

    search: BlockSearch

    def search_plan(self, config: GuardConfig) -> tuple[GuardConfig, CandidateEvaluator | None]:
        """The settings and evaluator (None: the search's own) of a call under `config`."""


_END = object()
"""Put on a streaming request's queue once it has left the engine."""


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's load and totals since it started.

    Attributes:
        queued: requests waiting to join a search.
        rows_in_flight: rows of the running searches' decode states.
        requests_running: requests in a running search.
        groups: running searches (requests of different search shapes, or that could
            not join a running search, take turns in separate ones).
        tokens_generated: response tokens of the finished prompts.
        responses: finished prompts.
        refusals: responses replaced by the refusal text.
        resample_rounds: resample rounds of the finished prompts.
        tokens_per_second: `tokens_generated` over the seconds the scheduler was busy.
    """

    queued: int
    rows_in_flight: int
    requests_running: int
    groups: int
    tokens_generated: int
    responses: int
    refusals: int
    resample_rounds: int
    tokens_per_second: float


@dataclasses.dataclass(eq=False)
class _Request:
    """One call: its prompts, settings and where its outcome goes.

    Attributes:
        config: the call's settings (for the final check and enforcement).
        search_config, evaluator: what the decoder's search runs the call with.
        seeds: one sampler seed per prompt.
        commit: what each step commits when streaming (None: not streaming).
        shape: the search settings that requests of one group share, as a key.
        rows: decode rows the call may hold at once (prompts x candidates).
        deadline: `time.monotonic()` after which it times out, or None.
        started: `time.perf_counter()` at the call, for the results' seconds.
        cancel: set by the caller to make it leave.
        outcome: its searches in prompt order, or the error it failed with.
        prefixes: a streaming call's committed token ids after each step, then `_END`.
        slots: its prompts' slots in its group's running search.
        ended: the searches of its prompts that have ended, by slot.
    """

    prompts: list[EncodedPrompt]
    config: GuardConfig
    search_config: GuardConfig
    evaluator: CandidateEvaluator | None
    seeds: list[int]
    commit: Literal["agreement", "block"] | None
    shape: str
    rows: int
    deadline: float | None
    started: float
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    outcome: concurrent.futures.Future[list[PromptSearch]] = dataclasses.field(
        default_factory=concurrent.futures.Future
    )
    prefixes: queue.SimpleQueue[Any] = dataclasses.field(default_factory=queue.SimpleQueue)
    admitted: bool = False
    """Whether it holds rows under the cap (from admission until it leaves)."""
    slots: list[int] = dataclasses.field(default_factory=list)
    ended: dict[int, PromptSearch] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class _Group:
    """A running search and the requests in it, by slot."""

    shape: str
    running: RunningSearch
    requests: dict[int, _Request] = dataclasses.field(default_factory=dict)


class GuardEngine:
    """Serve guarded requests from one scheduler thread, batched at block boundaries.

    The same calls as a `Decoder` (`generate`, `generate_batch`, `stream` and their
    async forms, with per-call `GuardConfig` overrides), so an engine can stand where a
    decoder does; each also takes `timeout` (seconds from the call; None: no limit),
    after which the request leaves its search and the call raises
    `GenerationTimeoutError`. Results carry the decoder's own safety record and
    enforcement (`on_unsafe`). A request is cancelled by cancelling the task awaiting
    it or closing its stream; it leaves at the next block boundary.

    Args:
        guard: an `InferenceGuard` or a block-search baseline (`SamplingDecoder`,
            `BestOfN`, `BlockBeamSearch`); the engine drives its model and scorers, so
            they should not serve other calls meanwhile.
        max_rows: most decode rows in flight (each request holds `num_candidates` rows
            per prompt); a request that does not fit waits in the queue.
        max_queued: most requests waiting; beyond it a call raises
            `EngineOverloadedError` at once.
        overflow: what a call that the engine cannot take (more rows than `max_rows`,
            or a full queue) does: "raise" `EngineOverloadedError`, or run on the
            decoder directly ("decoder", without `timeout`), as it would with no engine.

    Raises:
        TypeError: `guard` does not decode by block search (ARGS, or a subclass that
            overrides `_decode`, such as `testing.ScriptedGuard`).
    """

    def __init__(
        self,
        guard: Decoder,
        *,
        max_rows: int = 512,
        max_queued: int = 1024,
        overflow: Literal["raise", "decoder"] = "raise",
    ) -> None:
        if not serves(guard):
            raise TypeError(
                "GuardEngine serves decoders that run the block search (InferenceGuard, "
                f"SamplingDecoder, BestOfN, BlockBeamSearch), got {type(guard).__name__}; "
                "call that decoder directly instead"
            )
        if max_rows < 1 or max_queued < 0:
            raise ValueError(
                f"max_rows must be >= 1 and max_queued >= 0, got {max_rows} and {max_queued}"
            )
        self.guard = guard
        self._searcher = cast(_SearchDecoder, guard)
        self.max_rows = max_rows
        self.max_queued = max_queued
        self.overflow = overflow
        self._lock = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._groups: list[_Group] = []
        self._reserved = 0
        self._running = 0
        self._rows_in_flight = 0
        self._group_count = 0
        self._totals = {"tokens": 0, "responses": 0, "refusals": 0, "resample_rounds": 0}
        self._busy = 0.0
        self._closed = False
        self._closing = threading.Event()
        self._scheduler: threading.Thread | None = None
        """The scheduler thread while there are requests to serve, else None."""

    # ------------------------------------------------------------ passthrough
    @property
    def lm(self) -> LanguageModel:
        return self.guard.lm

    @property
    def config(self) -> GuardConfig:
        return self.guard.config

    def identity(self, config: GuardConfig | None = None) -> dict[str, Any]:
        """The decoder's identity (see `Decoder.identity`): an engine returns what its
        decoder would."""
        return self.guard.identity(config)

    # ------------------------------------------------------------- public API
    def generate(
        self,
        prompt: PromptInput,
        *,
        tools: ToolsInput = None,
        timeout: float | None = None,
        session: SafetySession | None = None,
        **overrides: Any,
    ) -> GuardResult:
        """`Decoder.generate` through the engine; blocks until the response is ready. With
        a `session`, the request is held to (and charged to) its remaining budget."""
        return self.generate_batch(
            [prompt], tools=tools, timeout=timeout, session=session, **overrides
        )[0]

    def generate_batch(
        self,
        prompts: Sequence[PromptInput],
        *,
        tools: ToolsInput = None,
        timeout: float | None = None,
        session: SafetySession | None = None,
        **overrides: Any,
    ) -> list[GuardResult]:
        """`Decoder.generate_batch` through the engine: the prompts join together. With a
        `session`, they are requests made one after another, in order, each held to what
        the one before left (see `Decoder.generate_batch`)."""
        if session is not None:
            return session.run_each(
                self.guard,
                len(prompts),
                overrides,
                lambda i, budgeted: self.generate_batch(
                    [prompts[i]], tools=tools, timeout=timeout, **budgeted
                )[0],
            )
        try:
            request = self._submit(prompts, tools, overrides, timeout, streaming=False)
        except EngineOverloadedError:
            if self.overflow == "raise":
                raise
            return self.guard.generate_batch(prompts, tools=tools, **overrides)
        try:
            searches = request.outcome.result()
        except BaseException:
            self._cancel(request)  # Ctrl-C, or any other way out: leave the engine
            raise
        return self._results(request, searches)

    async def agenerate(
        self,
        prompt: PromptInput,
        *,
        tools: ToolsInput = None,
        timeout: float | None = None,
        session: SafetySession | None = None,
        **overrides: Any,
    ) -> GuardResult:
        """`generate` for async code; cancelling the awaiting task cancels the request.
        With a `session`, the call waits in a worker thread for the session's turn."""
        if session is not None:
            return await asyncio.to_thread(
                self.generate, prompt, tools=tools, timeout=timeout, session=session, **overrides
            )
        [result] = await self.agenerate_batch([prompt], tools=tools, timeout=timeout, **overrides)
        return result

    async def agenerate_batch(
        self,
        prompts: Sequence[PromptInput],
        *,
        tools: ToolsInput = None,
        timeout: float | None = None,
        session: SafetySession | None = None,
        **overrides: Any,
    ) -> list[GuardResult]:
        """`generate_batch` for async code; waiting takes no thread, the final check by
        the cost model runs in a worker thread. With a `session`, the requests wait in a
        worker thread for the session's turn."""
        if session is not None:
            return await asyncio.to_thread(
                self.generate_batch,
                prompts,
                tools=tools,
                timeout=timeout,
                session=session,
                **overrides,
            )
        try:
            request = self._submit(prompts, tools, overrides, timeout, streaming=False)
        except EngineOverloadedError:
            if self.overflow == "raise":
                raise
            return await self.guard.agenerate_batch(prompts, tools=tools, **overrides)
        try:
            searches = await asyncio.shield(asyncio.wrap_future(request.outcome))
        except asyncio.CancelledError:
            self._cancel(request)
            raise
        return await asyncio.to_thread(self._results, request, searches)

    def stream(
        self,
        prompt: PromptInput,
        *,
        tools: ToolsInput = None,
        timeout: float | None = None,
        session: SafetySession | None = None,
        **overrides: Any,
    ) -> GuardStream:
        """`Decoder.stream` through the engine: an `InferenceGuard` commits text as its
        search settles it (`stream_commit`), a baseline yields its response at the end.
        The search runs whether or not deltas are asked for; `close()` makes the request
        leave at the next block boundary. With a `session` (see `generate`), the request
        runs when the first delta is asked for and is charged before any of it is shown,
        so the response comes as one delta."""
        if session is not None:
            return GuardStream(self._charged(prompt, tools, timeout, session, overrides))
        try:
            request = self._submit([prompt], tools, overrides, timeout, streaming=True)
        except EngineOverloadedError:
            if self.overflow == "raise":
                raise
            return self.guard.stream(prompt, tools=tools, **overrides)
        return GuardStream(self._deltas(request), request.cancel)

    def astream(
        self,
        prompt: PromptInput,
        *,
        tools: ToolsInput = None,
        timeout: float | None = None,
        **overrides: Any,
    ) -> AsyncGuardStream:
        """`stream` for async code: `async for delta in engine.astream(...)`."""
        return AsyncGuardStream(self.stream(prompt, tools=tools, timeout=timeout, **overrides))

    def _charged(
        self,
        prompt: PromptInput,
        tools: ToolsInput,
        timeout: float | None,
        session: SafetySession,
        overrides: dict[str, Any],
    ) -> Generator[str, None, GuardResult]:
        """The whole response of a request charged to `session`, as one delta."""
        result = self.generate(prompt, tools=tools, timeout=timeout, session=session, **overrides)
        if result.text:
            yield result.text
        return result

    def stats(self) -> EngineStats:
        """The engine's load now and its totals so far."""
        with self._lock:
            busy = self._busy
            return EngineStats(
                queued=len(self._queue),
                rows_in_flight=self._rows_in_flight,
                requests_running=self._running,
                groups=self._group_count,
                tokens_generated=self._totals["tokens"],
                responses=self._totals["responses"],
                refusals=self._totals["refusals"],
                resample_rounds=self._totals["resample_rounds"],
                tokens_per_second=self._totals["tokens"] / busy if busy else 0.0,
            )

    def close(self) -> None:
        """Stop the engine and wait for its scheduler: the running step stops before its
        next decoded token (after a scorer call in progress), and every queued or running
        request fails with `EngineClosedError`. Idempotent."""
        with self._lock:
            self._closed = True
            self._closing.set()
            self._lock.notify_all()
            scheduler = self._scheduler
        if scheduler is not None and threading.current_thread() is not scheduler:
            scheduler.join()

    def __enter__(self) -> GuardEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------- submitting
    def _submit(
        self,
        prompts: Sequence[PromptInput],
        tools: ToolsInput,
        overrides: Mapping[str, Any],
        timeout: float | None,
        *,
        streaming: bool,
    ) -> _Request:
        """Check and encode a call in the caller's thread (bad input fails at once) and
        queue it."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        config = self.guard.call_config(overrides)
        encoded = self.guard.encode_prompts(prompts, config, tools)
        search_config, evaluator = self._searcher.search_plan(config)
        shape = json.dumps(
            search_config.model_dump(mode="json", exclude=set(PER_REQUEST_FIELDS)),
            sort_keys=True,
        )
        started = time.perf_counter()
        request = _Request(
            prompts=encoded,
            config=config,
            search_config=search_config,
            evaluator=evaluator,
            seeds=self.guard._seeds(encoded, config),
            commit=config.stream_commit
            if streaming and isinstance(self.guard, InferenceGuard)
            else None,
            shape=shape,
            rows=len(encoded) * search_config.num_candidates,
            deadline=None if timeout is None else time.monotonic() + timeout,
            started=started,
        )
        if request.rows > self.max_rows:
            raise EngineOverloadedError(
                f"this request needs {request.rows} rows ({len(encoded)} prompts x "
                f"{search_config.num_candidates} candidates), more than the engine's "
                f"max_rows={self.max_rows}; split the batch, lower num_candidates, or "
                "raise max_rows"
            )
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is closed; create a new GuardEngine")
            if len(self._queue) >= self.max_queued:
                raise EngineOverloadedError(
                    f"the engine's queue is full ({self.max_queued} requests waiting); "
                    "retry later, or raise max_queued (or max_rows, so that more run at once)"
                )
            self._queue.append(request)
            if self._scheduler is None:
                self._scheduler = threading.Thread(
                    target=self._schedule, name="guard-engine-scheduler", daemon=True
                )
                self._scheduler.start()
            self._lock.notify_all()
        return request

    def _cancel(self, request: _Request) -> None:
        with self._lock:
            request.cancel.set()
            self._lock.notify_all()

    def _results(self, request: _Request, searches: list[PromptSearch]) -> list[GuardResult]:
        """The decoder's results of a finished request: final check and enforcement."""
        responses = [Response.of(search) for search in searches]
        seconds = time.perf_counter() - request.started
        results = self.guard._finalize(request.prompts, responses, request.config, seconds)
        self._count_refusals(results)
        return results

    def _count_refusals(self, results: Sequence[GuardResult]) -> None:
        with self._lock:
            self._totals["refusals"] += sum(r.refused for r in results)

    def _deltas(self, request: _Request) -> Generator[str, None, GuardResult]:
        """A streaming request's deltas, from the prefixes the scheduler commits."""

        def run() -> Generator[list[list[int] | None], None, list[PromptSearch]]:
            while (prefix := request.prefixes.get()) is not _END:
                yield [prefix]
            return request.outcome.result()

        try:
            if isinstance(self.guard, InferenceGuard):
                [encoded] = request.prompts
                result = yield from self.guard._stream_run(
                    encoded, request.config, run(), request.started
                )
                self._count_refusals([result])
                return result
            [result] = self._results(request, request.outcome.result())
            if result.text:
                yield result.text
            return result
        finally:
            if not request.outcome.done():  # closed early: leave the engine
                self._cancel(request)

    # -------------------------------------------------------------- scheduling
    def _schedule(self) -> None:
        """The scheduler thread: serve until idle or closed; once closed, fail what is
        left (also if serving itself failed, so that no caller waits forever)."""
        reason = "the engine was closed before this request finished"
        idle = False
        try:
            idle = self._serve()
        except BaseException as error:
            reason = f"the engine's scheduler stopped ({error!r}); create a new GuardEngine"
            raise
        finally:
            if not idle:
                with self._lock:
                    self._closed = True
                self._fail_all(EngineClosedError(reason))

    def _serve(self) -> bool:
        """Admit, reap, then step each group in turn, until the engine is closed (False)
        or has nothing left to do (True: the thread ends, and the next request starts
        another)."""
        turn = 0
        while True:
            with self._lock:
                if self._closed:
                    return False
                if not (self._queue or self._groups):
                    self._scheduler = None
                    return True
                admitted = self._admit()
            for joiners in _by_search(admitted):
                self._join(joiners)
            self._reap()
            self._publish_rows()
            if self._groups:
                turn %= len(self._groups)
                self._step(self._groups[turn])
                turn += 1

    def _admit(self) -> list[_Request]:
        """Take from the queue every cancelled or timed-out request (to fail them) and the
        requests that fit the row cap, first come first served: one that does not fit
        holds back the ones behind it, so that a large request is not starved. Called
        with the lock held."""
        stopped = [r for r in self._queue if r.cancel.is_set() or _expired(r)]
        for request in stopped:
            self._queue.remove(request)
        admitted = []
        while self._queue and self._reserved + self._queue[0].rows <= self.max_rows:
            request = self._queue.popleft()
            self._reserved += request.rows
            self._running += 1
            request.admitted = True
            admitted.append(request)
        return stopped + admitted

    def _join(self, requests: list[_Request]) -> None:
        """Prefill the prompts of requests of one search shape (and one way of
        committing) together into a group of that shape that can take rows, or a new
        group: one prefill forward for everything that arrived during a step, rather than
        one per request, whose fixed cost would hold up the running requests."""
        requests = [r for r in requests if not self._leave_if_stopped(r, group=None)]
        if not requests:
            return
        first = requests[0]
        group = next(
            (g for g in self._groups if g.shape == first.shape and g.running.can_merge),
            None,
        )
        if group is None:
            running = RunningSearch(
                self._searcher.search,
                first.search_config,
                first.evaluator,
                self._closing,
            )
            group = _Group(first.shape, running)
            self._groups.append(group)
        started = time.perf_counter()
        try:
            slots = group.running.add(
                [prompt for r in requests for prompt in r.prompts],
                [r.search_config for r in requests for _ in r.prompts],
                [seed for r in requests for seed in r.seeds],
                first.commit,
            )
        except Exception as error:  # these requests fail, the engine goes on
            for request in requests:
                self._finish(request, error)
            self._drop_if_idle(group)
            return
        finally:
            self._add_busy(time.perf_counter() - started)
        for request in requests:
            request.slots, slots = slots[: len(request.prompts)], slots[len(request.prompts) :]
            for slot in request.slots:
                group.requests[slot] = request

    def _reap(self) -> None:
        """Remove cancelled and timed-out requests from their groups."""
        for group in list(self._groups):
            for request in {id(r): r for r in group.requests.values()}.values():
                self._leave_if_stopped(request, group)
            self._drop_if_idle(group)

    def _leave_if_stopped(self, request: _Request, group: _Group | None) -> bool:
        """If `request` was cancelled or timed out, drop its rows and fail it."""
        if request.cancel.is_set() or request.outcome.cancelled():
            error: BaseException = GenerationCancelledError(
                "the request was cancelled: its stream was closed or its caller stopped waiting"
            )
        elif _expired(request):
            error = GenerationTimeoutError(
                "the request ran past its timeout and was stopped; raise timeout=, lower "
                "max_new_tokens or num_candidates, or send fewer requests at once"
            )
        else:
            return False
        if group is not None:
            live = [s for s in request.slots if s in group.requests]
            group.running.drop(live)
            for slot in live:
                del group.requests[slot]
        self._finish(request, error)
        return True

    def _step(self, group: _Group) -> None:
        """One block for every live prompt of `group`; deliver what ended."""
        started = time.perf_counter()
        try:
            ended = group.running.step()
        except GenerationCancelledError:  # the engine is closing
            return
        except Exception as error:  # fail this group's requests, keep serving
            for request in {id(r): r for r in group.requests.values()}.values():
                self._finish(request, error)
            self._groups.remove(group)
            return
        finally:
            self._add_busy(time.perf_counter() - started)
        done = []
        for slot in ended:
            request = group.requests.pop(slot)
            request.ended[slot] = group.running.take(slot)
            if len(request.ended) == len(request.slots):
                done.append(request)
        for slot, request in group.requests.items():
            if request.commit is not None:
                request.prefixes.put(group.running.committed(slot))
        self._drop_if_idle(group)
        self._publish_rows()  # before the callers see their results
        for request in done:
            self._finish(request, [request.ended[s] for s in request.slots])

    def _drop_if_idle(self, group: _Group) -> None:
        if not group.running.live and group in self._groups:
            self._groups.remove(group)

    def _finish(self, request: _Request, outcome: list[PromptSearch] | BaseException) -> None:
        """Settle a request that leaves the engine and release its rows."""
        with self._lock:
            if request.admitted:
                request.admitted = False
                self._reserved -= request.rows
                self._running -= 1
            if isinstance(outcome, BaseException):
                if not request.outcome.done():
                    request.outcome.set_exception(outcome)
            else:
                self._totals["responses"] += len(outcome)
                self._totals["tokens"] += sum(len(s.best().token_ids) for s in outcome)
                self._totals["resample_rounds"] += sum(s.resample_rounds for s in outcome)
                if not request.outcome.done():
                    request.outcome.set_result(outcome)
        request.prefixes.put(_END)

    def _publish_rows(self) -> None:
        """Make the scheduler's view of its groups visible to `stats`."""
        rows = sum(g.running.rows for g in self._groups)
        with self._lock:
            self._rows_in_flight = rows
            self._group_count = len(self._groups)

    def _add_busy(self, seconds: float) -> None:
        with self._lock:
            self._busy += seconds

    def _fail_all(self, error: EngineClosedError) -> None:
        """Fail every queued and running request (the scheduler has stopped)."""
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
        running = {id(r): r for g in self._groups for r in g.requests.values()}
        self._groups.clear()
        for request in [*queued, *running.values()]:
            self._finish(request, error)
        self._publish_rows()


def _by_search(requests: list[_Request]) -> list[list[_Request]]:
    """`requests` in batches that can be prefilled together: same search shape, same
    way of committing; in arrival order within each."""
    batches: dict[tuple[str, str | None], list[_Request]] = {}
    for request in requests:
        batches.setdefault((request.shape, request.commit), []).append(request)
    return list(batches.values())


def serves(decoder: Decoder) -> bool:
    """Whether a `GuardEngine` can serve `decoder`: it runs the block search that the
    engine drives, not a decoding of its own (ARGS, or a subclass such as
    `testing.ScriptedGuard` that overrides `_decode`, whose answers the engine would
    bypass)."""
    kind = type(decoder)
    planner = next((c for c in kind.__mro__ if "search_plan" in vars(c)), None)
    return planner is not None and vars(planner).get("_decode") is getattr(kind, "_decode", None)


_SHARED: weakref.WeakKeyDictionary[Decoder, weakref.ref[GuardEngine]] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def shared_engine(decoder: Decoder) -> GuardEngine | None:
    """The engine that serves `decoder` for every caller that asks, created on first use
    (None if no engine can serve it: see `serves`).

    Its callers did not choose its limits, so a call it cannot take runs on the decoder
    directly (`overflow="decoder"`) instead of failing. Callers keep the engine alive
    by holding it; one that nobody holds (or that was closed) is replaced on the next
    call, so the mapping itself keeps neither the decoder nor the engine.
    """
    if not serves(decoder):
        return None
    with _SHARED_LOCK:
        held = _SHARED.get(decoder)
        engine = held() if held is not None else None
        if engine is None or engine._closed:
            engine = GuardEngine(decoder, overflow="decoder")
            _SHARED[decoder] = weakref.ref(engine)
        return engine


def _expired(request: _Request) -> bool:
    return request.deadline is not None and time.monotonic() >= request.deadline
