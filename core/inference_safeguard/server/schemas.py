"""The OpenAI wire format the server speaks: request bodies and the responses it sends.

Requests accept the fields OpenAI's clients send; fields the server does not know are
ignored (clients add new ones often), while known ones it cannot honour (`n > 1`,
`logprobs`, penalties other than 0) are rejected with a 400 by the request mapping.
The server's own fields: `safety_budget` on a request (a stricter budget for this call),
`safety_session` on a request (the id of a safety session whose budget spans the calls
of a conversation; the `X-Safety-Session` header does the same), and `safety` on each
choice (the response's safety record).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)


# ------------------------------------------------------------------------- requests
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    """Send a last chunk, with no choices, that carries the usage."""


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """One message of a conversation. `developer` is OpenAI's newer name for `system`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionSpec(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpecBody(_Body):
    type: Literal["function"] = "function"
    function: FunctionSpec


class _GenerationRequest(_Body):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Sampling fields that OpenAI lacks and other local servers take too.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    safety_budget: float | None = None
    """This server's own: hold this response to a stricter (lower) safety budget than the
    server's."""
    safety_session: str | None = Field(default=None, min_length=1, max_length=256)
    """This server's own: the safety session (conversation, agent run) this call is held
    to and charged to; needs a server started with session budgets."""


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[ToolSpecBody] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str]
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


# ------------------------------------------------------------------------ responses
OpenAIFinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class ConstraintRecord(BaseModel):
    """One constraint's outcome on a response; a non-finite cost is sent as null."""

    cost: float | None
    budget: float
    safe: bool


class SessionRecord(BaseModel):
    """What the safety session a request named had left once the request was charged."""

    id: str | None
    remaining: dict[str, float]
    """What is left of each constraint's session budget, by name."""
    spent: bool
    """Whether the session is spent: its next request is refused without generating."""
    turns: int
    """Requests that generated a response charged to the session so far."""


class SafetyRecord(BaseModel):
    """The safety outcome of one response (`GuardResult.safety_record`); a cost that is
    not a finite number is sent as null (JSON has no infinities). `cost` and `budget` are
    the worst constraint's; `constraints` has each constraint's by name; `session`, only
    on a response to a request that named a safety session, what the session has left."""

    safe: bool
    cost: float | None
    budget: float
    reward: float | None
    refused: bool
    resample_rounds: int
    constraints: dict[str, ConstraintRecord] = {}
    session: SessionRecord | None = None

    @model_serializer(mode="wrap")
    def _without_absent_session(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        record: dict[str, Any] = handler(self)
        if record.get("session") is None:
            record.pop("session", None)
        return record


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """The arguments object as a JSON string, as OpenAI sends it."""


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = None
    """A thinking model's reasoning, kept out of `content` (the convention of other
    OpenAI-compatible servers)."""


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: OpenAIFinishReason
    logprobs: None = None
    safety: SafetyRecord


def completion_id(prefix: str) -> str:
    """A fresh response id, as OpenAI writes them (`chatcmpl-...`, `cmpl-...`)."""
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: completion_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, Any]
    """Only the fields this chunk adds (`role`, `content`, `tool_calls`, ...)."""
    finish_reason: OpenAIFinishReason | None = None
    logprobs: None = None
    safety: SafetyRecord | None = None
    """Set on the last chunk of a choice, with its finish reason."""


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: OpenAIFinishReason | None
    logprobs: None = None
    safety: SafetyRecord | None


class Completion(BaseModel):
    """A text completion, or one chunk of a streamed one (same object type, as OpenAI)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None
    system_fingerprint: None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inference-safeguard"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
