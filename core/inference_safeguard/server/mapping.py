"""From OpenAI requests to the core's calls, and from `GuardResult`s to OpenAI responses.

A request becomes a prompt (text, or a message list for the chat template), the tools it
offers, and `GuardConfig` overrides: `max_tokens` (or `max_completion_tokens`) is
`max_new_tokens`, at most the server's; `temperature`, `top_p`, `seed`, `stop`, `response_format`,
`tool_choice` and `parallel_tool_calls` keep their names. The overrides are checked
against the server's config here, so that a bad value is a 400 naming the request's
field before any work starts.

A result's finish reason becomes OpenAI's: a refusal (`"safety"`) is `"content_filter"`,
OpenAI's value for withheld content, and a response whose text parses into tool calls
ends with `"tool_calls"`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from inference_safeguard.config import GuardConfig
from inference_safeguard.errors import UnsafeGenerationError
from inference_safeguard.lm import PromptInput
from inference_safeguard.results import GuardResult
from inference_safeguard.server.errors import (
    APIError,
    bad_request,
    core_error,
    engine_error,
    validation_error,
)
from inference_safeguard.server.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    FunctionCall,
    OpenAIFinishReason,
    SafetyRecord,
    ToolCallOut,
    Usage,
)
from inference_safeguard.tools import (
    ParsedResponse,
    ToolSpec,
    as_tool_specs,
    choose_tools,
    name_tool_results,
    parse_tool_calls,
)

_SAMPLING = ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty")
"""Request fields that are `GuardConfig` fields of the same name."""


@dataclass(frozen=True)
class Call:
    """One request, as the core takes it.

    Attributes:
        prompt: the text or message list to generate from.
        overrides: `GuardConfig` fields for this call.
        tools: the tools as OpenAI dicts, or None.
        offered: the tools `tool_choice` leaves on offer: the calls to parse out.
        single_call: keep only the first tool call (`parallel_tool_calls: false`).
        include_usage: a stream ends with a usage chunk.
        prompt_param: the request field that holds the prompt, for errors.
    """

    prompt: PromptInput
    overrides: dict[str, Any]
    prompt_param: str
    tools: list[dict[str, Any]] | None = None
    offered: list[ToolSpec] = field(default_factory=list)
    single_call: bool = False
    include_usage: bool = False

    def error(self, error: Exception) -> APIError | None:
        """The 400 for an error the core raised over this call's input, the 429, 503 or
        504 for one of the engine's limits, or None."""
        grammar = "tools" if self.tools and "response_format" not in self.overrides else None
        return core_error(
            error, prompt_param=self.prompt_param, format_param=grammar or "response_format"
        ) or engine_error(error)


def chat_call(request: ChatCompletionRequest, config: GuardConfig) -> Call:
    """The call of a chat completion request, checked against the server's `config`."""
    if request.logprobs or request.top_logprobs:
        raise bad_request("logprobs are not available from this server", param="logprobs")
    overrides, names = _overrides(request, config)
    if request.max_completion_tokens is not None:
        overrides["max_new_tokens"] = _at_most(request.max_completion_tokens, config)
        names["max_new_tokens"] = "max_completion_tokens"
    for name in ("response_format", "tool_choice", "parallel_tool_calls"):
        value = getattr(request, name)
        if value is not None:
            overrides[name] = value
            names[name] = name
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []] or None
    try:
        specs = as_tool_specs(tools)
    except (TypeError, ValueError) as error:
        raise bad_request(str(error), param="tools") from None
    try:
        offered, _ = choose_tools(specs, request.tool_choice)
    except ValueError as error:
        raise bad_request(str(error), param="tool_choice") from None
    if request.tool_choice not in (None, "auto", "none") and not specs:
        raise bad_request(
            f"tool_choice {request.tool_choice!r} asks for a tool call, but the request has "
            "no tools; add tools or leave tool_choice out",
            param="tool_choice",
        )
    _check_config(config, overrides, names)
    return Call(
        prompt=name_tool_results([_message(m, i) for i, m in enumerate(request.messages)]),
        overrides=overrides,
        prompt_param="messages",
        tools=tools,
        offered=offered,
        single_call=request.parallel_tool_calls is False,
        include_usage=_include_usage(request),
    )


def completion_call(request: CompletionRequest, config: GuardConfig) -> Call:
    """The call of a text completion request, checked against the server's `config`."""
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request(
                f"this server completes one prompt per request, got {len(prompt)}; send "
                "one request per prompt",
                param="prompt",
            )
        [prompt] = prompt
    unsupported = {
        "echo": request.echo,
        "suffix": request.suffix,
        "logprobs": request.logprobs,
        "best_of": request.best_of not in (None, 1),
    }
    for name, value in unsupported.items():
        if value:
            raise bad_request(f"{name} is not supported by this server", param=name)
    overrides, names = _overrides(request, config)
    _check_config(config, overrides, names)
    return Call(
        prompt=prompt,
        overrides=overrides,
        prompt_param="prompt",
        include_usage=_include_usage(request),
    )


def _overrides(
    request: ChatCompletionRequest | CompletionRequest, config: GuardConfig
) -> tuple[dict[str, Any], dict[str, str]]:
    """The `GuardConfig` overrides of the fields both endpoints share."""
    if request.n not in (None, 1):
        raise bad_request(
            f"n={request.n}: this server returns one choice per request; send n requests "
            "(each with its own seed) instead",
            param="n",
        )
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) not in (None, 0):
            raise bad_request(
                f"{name} is not supported; use repetition_penalty (> 1 discourages repeats)",
                param=name,
            )
    if request.logit_bias:
        raise bad_request("logit_bias is not supported by this server", param="logit_bias")
    overrides: dict[str, Any] = {}
    names: dict[str, str] = {}
    for name in _SAMPLING:
        value = getattr(request, name)
        if value is not None:
            overrides[name], names[name] = value, name
    if request.max_tokens is not None:
        overrides["max_new_tokens"] = _at_most(request.max_tokens, config)
        names["max_new_tokens"] = "max_tokens"
    if request.stop is not None:
        overrides["stop"], names["stop"] = request.stop, "stop"
    if request.safety_budget is not None:
        if not request.safety_budget <= config.budget:
            raise bad_request(
                f"safety_budget {request.safety_budget} is above the server's budget "
                f"{config.budget}; a request may only tighten the budget",
                param="safety_budget",
            )
        overrides["budget"], names["budget"] = request.safety_budget, "safety_budget"
    return overrides, names


def _at_most(max_tokens: int, config: GuardConfig) -> int:
    """A request's token limit, capped at the server's `max_new_tokens`: a request costs
    about `num_candidates` times its tokens, so the server's setting bounds what one
    request may cost. The response ends with `length` there, as at any limit."""
    return min(max_tokens, config.max_new_tokens)


def _check_config(config: GuardConfig, overrides: dict[str, Any], names: dict[str, str]) -> None:
    try:
        config.with_overrides(**overrides)
    except ValidationError as error:
        raise validation_error(error, names) from None


def _include_usage(request: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    """A message as the chat template takes it: text content, `system` for `developer`."""
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    converted: dict[str, Any] = {
        "role": "system" if message.role == "developer" else message.role,
        "content": content or "",
    }
    if message.tool_calls:
        converted["tool_calls"] = message.tool_calls
    if message.role == "tool":
        if message.tool_call_id is not None:
            converted["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            converted["name"] = message.name
    elif content is None and not message.tool_calls:
        raise bad_request(f"messages.{index}: content is missing", param="messages")
    return converted


# ------------------------------------------------------------------------- results
def withheld(error: UnsafeGenerationError) -> GuardResult:
    """What a server configured with `on_unsafe="raise"` answers: the over-budget result
    with its text withheld and finished for safety; its record says `safe: false`."""
    return dataclasses.replace(
        error.result, text="", reasoning=None, token_ids=[], finish_reason="safety"
    )


def safety_record(result: GuardResult) -> SafetyRecord:
    record = result.safety_record()
    constraints = {
        name: {**entry, "cost": _finite_or_none(entry["cost"])}
        for name, entry in record["constraints"].items()
    }
    return SafetyRecord.model_validate(
        {**record, "cost": _finite_or_none(record["cost"]), "constraints": constraints}
    )


def _finite_or_none(value: Any) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def usage(result: GuardResult) -> Usage:
    prompt, completion = result.stats.prompt_tokens, result.stats.completion_tokens
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def parsed(result: GuardResult, call: Call) -> ParsedResponse:
    """The response's text and tool calls (none for a refusal or without tools)."""
    if not call.offered or result.refused:
        return ParsedResponse(content=result.text, tool_calls=[])
    response = parse_tool_calls(result.text, call.offered)
    if call.single_call and len(response.tool_calls) > 1:
        response = ParsedResponse(
            response.content, response.tool_calls[:1], response.invalid_tool_calls
        )
    return response


def finish_reason(result: GuardResult, response: ParsedResponse) -> OpenAIFinishReason:
    if result.finish_reason == "safety":
        return "content_filter"
    if response.tool_calls:
        return "tool_calls"
    return result.finish_reason


def tool_calls(response: ParsedResponse) -> list[ToolCallOut] | None:
    if not response.tool_calls:
        return None
    return [
        ToolCallOut(
            id=call.id,
            function=FunctionCall(
                name=call.name, arguments=json.dumps(call.arguments, ensure_ascii=False)
            ),
        )
        for call in response.tool_calls
    ]


def assistant_message(result: GuardResult, response: ParsedResponse) -> AssistantMessage:
    calls = tool_calls(response)
    return AssistantMessage(
        content=response.content if response.content or not calls else None,
        tool_calls=calls,
        reasoning_content=result.reasoning,
    )


def check_model(requested: str, served: str) -> None:
    """Refuse a request for a model this server does not serve (404, as OpenAI does)."""
    if requested != served:
        raise APIError(
            404,
            f"the model {requested!r} does not exist on this server; it serves {served!r}",
            param="model",
            code="model_not_found",
        )
