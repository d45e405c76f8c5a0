"""`create_app`: the OpenAI-compatible HTTP API over one backend.

Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (JSON, or server-sent
events with `"stream": true`), `GET /v1/models`, `GET /health` and `GET /metrics`. With
an API key, every `/v1/` route needs `Authorization: Bearer <key>`; `/health` and
`/metrics` stay open for load balancers and scrapers.

The app holds no state between requests beyond its metrics: each replica behind a load
balancer owns its model, and any replica can answer any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference_safeguard.errors import SafeguardError, UnsafeGenerationError
from inference_safeguard.results import GuardResult
from inference_safeguard.server.backend import Backend, ResultStream
from inference_safeguard.server.errors import APIError, install_error_handlers
from inference_safeguard.server.mapping import (
    Call,
    assistant_message,
    chat_call,
    check_model,
    completion_call,
    finish_reason,
    parsed,
    safety_record,
    usage,
    withheld,
)
from inference_safeguard.server.metrics import CONTENT_TYPE, ServerMetrics
from inference_safeguard.server.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    TextChoice,
    completion_id,
)
from inference_safeguard.server.sse import chat_events, completion_events
from inference_safeguard.session import SafetySession, SafetySessions
from inference_safeguard.tools import as_tool_specs

T = TypeVar("T")

DISCONNECT_POLL_SECONDS = 0.5
"""How often a request being generated checks whether its client is still there."""

SESSION_HEADER = "x-safety-session"
"""The request header that names a safety session (as the `safety_session` field does)."""

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class ClientGone(Exception):
    """The client disconnected before its response was ready; its search was stopped."""


def create_app(
    backend: Backend,
    *,
    model_name: str,
    api_key: str | None = None,
    max_prompt_tokens: int | None = None,
    request_timeout: float | None = None,
    sessions: SafetySessions | None = None,
) -> FastAPI:
    """The HTTP app that serves `backend` as the model `model_name`.

    Args:
        backend: what generates: any `Decoder` (e.g. `InferenceGuard`) or the batching
            engine; see `inference_safeguard.server.backend`.
        model_name: the model id clients send and `/v1/models` lists; requests for any
            other model are answered 404.
        api_key: when set, `/v1/` routes need `Authorization: Bearer <api_key>` (401
            otherwise).
        max_prompt_tokens: refuse (400, `context_length_exceeded`) prompts longer than
            this many tokens, tools included; None: only the model's context window.
        request_timeout: seconds a response may take before the backend stops it (504);
            passed to the backend as `timeout=`, which the engine takes and a bare
            decoder does not. None: no limit.
        sessions: the safety sessions a request may name (`safety_session`, or the
            `X-Safety-Session` header): its call is held to and charged to that
            session's remaining budget, and refused without generating once it is spent.
            A session's streamed response comes in one piece, once it is charged. None:
            requests naming a session are refused (400).
    """
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be at least 1, got {max_prompt_tokens}")
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds or None, got {request_timeout}")
    limits = {} if request_timeout is None else {"timeout": request_timeout}
    app = FastAPI(
        title="Safeguard",
        description="OpenAI-compatible API of InferenceGuard: almost-surely-safe decoding.",
        version="1",
    )
    metrics = ServerMetrics(backend)
    started = int(time.time())
    install_error_handlers(app)

    app.add_middleware(_Gate, metrics=metrics, api_key=api_key)

    def observer(endpoint: str) -> Callable[[str, GuardResult], None]:
        def observe(reason: str, result: GuardResult) -> None:
            metrics.observe(endpoint, reason, result)

        return observe

    async def check_prompt(call: Call) -> None:
        """Refuse a prompt over `max_prompt_tokens` before generating anything."""
        if max_prompt_tokens is None:
            return
        config = backend.config.with_overrides(**call.overrides)
        encoded = await asyncio.to_thread(
            backend.lm.encode, call.prompt, as_tool_specs(call.tools), config.chat_template_kwargs
        )
        if len(encoded.ids) > max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(encoded.ids)} tokens, more than this server's limit of "
                f"{max_prompt_tokens}; shorten it",
                param=call.prompt_param,
                code="context_length_exceeded",
            )

    def session_of(
        body: ChatCompletionRequest | CompletionRequest, request: Request
    ) -> dict[str, SafetySession] | None:
        """`{"session": the safety session the request names}`, or None when it names none."""
        session_id = body.safety_session or request.headers.get(SESSION_HEADER)
        if not session_id:
            return None
        if sessions is None:
            raise APIError(
                400,
                "this server keeps no safety sessions; start it with session budgets "
                "(`safeguard serve --session-budgets '{\"cost\": 1.0}'`) or leave "
                "safety_session out",
                param="safety_session",
            )
        return {"session": sessions.get(session_id)}

    async def generate(
        call: Call, request: Request, session: dict[str, SafetySession] | None = None
    ) -> GuardResult:
        await _as_api_error(check_prompt(call), call)
        work = backend.agenerate(
            call.prompt, tools=call.tools, **limits, **(session or {}), **call.overrides
        )
        try:
            return await _as_api_error(_unless_disconnected(request, work), call)
        except UnsafeGenerationError as error:
            return withheld(error)

    async def open_stream(
        call: Call, request: Request, session: dict[str, SafetySession] | None = None
    ) -> ResultStream:
        if session is not None:  # charged once it is over: the text comes in one piece
            return _Settled(await generate(call, request, session))
        await _as_api_error(check_prompt(call), call)
        try:
            return backend.astream(call.prompt, tools=call.tools, **limits, **call.overrides)
        except SafeguardError as error:
            raise call.error(error) or error from None

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> ChatCompletion | StreamingResponse | Response:
        check_model(body.model, model_name)
        call = chat_call(body, backend.config)
        session = session_of(body, request)
        if body.stream:
            stream = await open_stream(call, request, session)
            return _event_stream(chat_events(stream, call, model_name, observer("chat")))
        try:
            result = await generate(call, request, session)
        except ClientGone:
            return Response(status_code=499)
        response = parsed(result, call)
        reason = finish_reason(result, response)
        metrics.observe("chat", reason, result)
        return ChatCompletion(
            model=model_name,
            choices=[
                ChatChoice(
                    message=assistant_message(result, response),
                    finish_reason=reason,
                    safety=safety_record(result),
                )
            ],
            usage=usage(result),
        )

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request
    ) -> Completion | StreamingResponse | Response:
        check_model(body.model, model_name)
        call = completion_call(body, backend.config)
        session = session_of(body, request)
        if body.stream:
            stream = await open_stream(call, request, session)
            return _event_stream(
                completion_events(stream, call, model_name, observer("completion"))
            )
        try:
            result = await generate(call, request, session)
        except ClientGone:
            return Response(status_code=499)
        reason = finish_reason(result, parsed(result, call))
        metrics.observe("completion", reason, result)
        return Completion(
            id=completion_id("cmpl"),
            created=int(time.time()),
            model=model_name,
            choices=[
                TextChoice(text=result.text, finish_reason=reason, safety=safety_record(result))
            ],
            usage=usage(result),
        )

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=started)])

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "model": model_name})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


class _Gate:
    """ASGI middleware that checks the API key on `/v1/` routes and counts every request
    with its status and latency (to the response headers).

    Plain ASGI rather than a `BaseHTTPMiddleware`, which would hide a client's disconnect
    from the request and so keep a search running for nobody.
    """

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics, api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        began = time.perf_counter()
        status = 500  # unless a response starts

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - began)
            await send(message)

        self.metrics.in_progress.inc()
        try:
            if (
                self.api_key is not None
                and path.startswith("/v1/")
                and not _authorized(scope, self.api_key)
            ):
                refusal = APIError(
                    401,
                    "missing or wrong API key; send it as 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                ).response()
                await refusal(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.metrics.in_progress.dec()
            self.metrics.requests.labels(endpoint, str(status)).inc()


class _Settled:
    """A finished result as a `ResultStream`: its whole text as one delta."""

    def __init__(self, result: GuardResult) -> None:
        self.result = result
        self._pending = [result.text] if result.text else []

    def __aiter__(self) -> _Settled:
        return self

    async def __anext__(self) -> str:
        if not self._pending:
            raise StopAsyncIteration
        return self._pending.pop()

    async def aclose(self) -> None:
        self._pending.clear()


def _authorized(scope: Scope, api_key: str) -> bool:
    """Whether the request sends `Authorization: Bearer <api_key>` (compared in constant
    time, as bytes: a key or header need not be ASCII)."""
    scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(
        token.strip().encode(), api_key.encode()
    )


def _event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _as_api_error(work: Awaitable[T], call: Call) -> T:
    """`await work`, with the core's errors over bad input turned into 400s."""
    try:
        return await work
    except SafeguardError as error:
        api_error = call.error(error)
        if api_error is None:
            raise
        raise api_error from None


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`await work`, cancelled (which stops its search) if the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
