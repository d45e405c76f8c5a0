"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Bad input of any kind (malformed JSON, a missing or mistyped field, settings the search
refuses, a prompt too long for the model, a response format or tool choice that cannot
be enforced) is a 4xx that says what to fix, never a 500; a 500 means a fault of the
server, and its body says no more than that.

The batching engine's limits have their own statuses, so that clients and balancers
can tell load from faults: a full queue (or a request bigger than the engine may ever
hold) is a 429 in OpenAI's rate-limit shape with a `Retry-After` header, a request past
the server's `--request-timeout` a 504 (the server, not the client, ran out of time;
OpenAI's clients retry both), and a request the engine dropped as the server shut down
a 503.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from inference_safeguard.errors import (
    ChatTemplateError,
    EngineClosedError,
    EngineOverloadedError,
    GenerationTimeoutError,
    InvalidPromptError,
    OutputFormatError,
    PromptTooLongError,
)
from inference_safeguard.server.schemas import ErrorBody, ErrorDetail

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}

RETRY_AFTER_SECONDS = 1
"""What a 429 asks a client to wait: the engine frees rows at every block boundary, so
a queue that is full now has room again within about a block's time."""


class APIError(Exception):
    """An error response: HTTP status, message, and OpenAI's `type`, `param`, `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})
        if status == 401:
            self.headers["WWW-Authenticate"] = "Bearer"
        self.detail = ErrorDetail(
            message=message,
            type=error_type or _TYPES.get(status, "invalid_request_error"),
            param=param,
            code=code,
        )

    def body(self) -> dict[str, Any]:
        """The JSON body of the response."""
        return ErrorBody(error=self.detail).model_dump(mode="json")

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def core_error(
    error: Exception, *, prompt_param: str, format_param: str = "response_format"
) -> APIError | None:
    """The 400 for an error the core raised over bad input, or None for any other error.

    Args:
        prompt_param: the request field that holds the prompt ("messages", "prompt").
        format_param: the request field whose grammar an `OutputFormatError` is about
            ("response_format", or "tools" for a tool schema).
    """
    if isinstance(error, PromptTooLongError):
        return bad_request(str(error), param=prompt_param, code="context_length_exceeded")
    if isinstance(error, (InvalidPromptError, ChatTemplateError)):
        return bad_request(str(error), param=prompt_param)
    if isinstance(error, OutputFormatError):
        return bad_request(str(error), param=format_param)
    return None


def engine_error(error: Exception) -> APIError | None:
    """The 429, 503 or 504 for an error of the engine's limits, or None for any other."""
    if isinstance(error, EngineOverloadedError):
        return APIError(
            429,
            str(error),
            code="engine_overloaded",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if isinstance(error, GenerationTimeoutError):
        return APIError(
            504,
            "the response ran past this server's request timeout and was stopped; ask for "
            "fewer tokens (max_tokens) or retry when the server is less busy",
            code="generation_timeout",
        )
    if isinstance(error, EngineClosedError):
        return APIError(503, str(error), code="server_shutting_down")
    return None


def validation_error(error: ValidationError, names: dict[str, str]) -> APIError:
    """The 400 for settings `GuardConfig` refused; `names` maps its field names back to
    the request's (`max_new_tokens` -> `max_tokens`)."""
    problems, params = [], []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else None
        param = names.get(field, field) if field is not None else None
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{param}: {message}" if param else message)
        if param:
            params.append(param)
    return bad_request("; ".join(problems), param=params[0] if params else None)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape: request validation (bad JSON, missing or
    mistyped fields) as 400, unknown routes as 404, and unexpected faults as 500."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems, param = [], None
        for item in error.errors():
            # The location starts with "body"; the rest is the path to the bad field.
            path = [str(part) for part in item.get("loc", ())[1:]]
            where = ".".join(path)
            if item.get("type") == "json_invalid":  # the location is a character offset
                problems.append(f"the body is not valid JSON (at character {where or 0})")
                continue
            problems.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
            param = param or (path[0] if path else None)
        return bad_request("; ".join(problems), param=param).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else "request failed"
        return APIError(error.status_code, message).response()

    @app.exception_handler(Exception)
    async def _fault(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request to %s failed", request.url.path, exc_info=error)
        return APIError(500, "the server failed to answer this request; see its log").response()
