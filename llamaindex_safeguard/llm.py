"""`SafeguardLLM`: almost-surely-safe decoding (InferenceGuard) as a LlamaIndex LLM."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from llama_index.core.base.llms.generic_utils import (
    messages_to_prompt as generic_messages_to_prompt,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
)
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection, default_completion_to_prompt

from inference_safeguard.config import CALL_SHAPE_FIELDS, GuardConfig, reject_bool_number
from inference_safeguard.decoder import Decoder
from inference_safeguard.errors import ChatTemplateError, InvalidPromptError, MissingCostModelError
from inference_safeguard.guard import CriticInput, InferenceGuard
from inference_safeguard.lm import PromptInput
from inference_safeguard.results import GuardResult
from inference_safeguard.scorers import Scorer
from inference_safeguard.streaming import AsyncGuardStream, GuardStream
from inference_safeguard.tools import (
    ParsedResponse,
    ToolCallHoldback,
    ToolSpec,
    choose_tools,
    parse_tool_calls,
)
from llamaindex_safeguard.messages import (
    ToolLike,
    assistant_message,
    to_guard_messages,
    to_tool_selections,
    to_tool_specs,
)
from llamaindex_safeguard.records import RecordSlot, install_safety_record_handler, track_call

CONFIG_FIELDS: tuple[str, ...] = tuple(
    name for name in GuardConfig.model_fields if name not in CALL_SHAPE_FIELDS
)
"""`GuardConfig` fields: each is also a field of `SafeguardLLM` and a per-call keyword."""


def _describe(name: str) -> str:
    """The description of `GuardConfig.<name>`, for the field of the same name."""
    description = GuardConfig.model_fields[name].description or ""
    return f"{description} None: the guard's own setting."


class SafeguardLLM(FunctionCallingLLM):
    """A LlamaIndex LLM whose every response comes from a safe-decoding search.

    Wraps an `inference_safeguard` decoder (`InferenceGuard`, or a baseline with the same interface)
    and implements LlamaIndex's whole LLM interface natively: `complete`, `chat`, their
    streaming forms, and async forms that run the search in a worker thread (so the
    event loop stays free) and deliver stream deltas as the search commits them.

    Prompts: `chat` renders messages with the tokenizer's chat template (for a model
    without one, LlamaIndex's `messages_to_prompt` text is completed instead).
    `complete` follows LlamaIndex's contract: for a chat model the prompt becomes a
    single user message, unless `formatted=True` or a `completion_to_prompt` is set,
    which make it a plain completion prompt.

    Every response carries the safety record (`safe, cost, budget, reward, refused,
    resample_rounds`) in `raw["safety"]` and `additional_kwargs["safety"]`, with
    `finish_reason` beside it and token usage in `raw["usage"]`; a stream carries it
    on its last chunk. Query and chat engine responses get it in
    `response.metadata["safety"]` (see `llamaindex_safeguard.records`).

    Function calling: `chat_with_tools`, `predict_and_call`, `FunctionAgent`,
    `ReActAgent` and `structured_predict` work through `inference_safeguard.tools`: the chat
    template renders the tools (or a system message describes them) and the response is parsed
    into `ToolCallBlock`s. A stream with tools passes on only text that cannot turn out
    to be part of a call; its last chunk carries the calls.

    Settings: every `GuardConfig` field is also a field here (None: the guard's own
    setting) and a per-call keyword (`llm.complete(prompt, max_new_tokens=32, seed=0)`);
    a call's keywords override the fields, which override the guard's config.

    Bad input raises `inference_safeguard`'s typed errors (`InvalidPromptError`,
    `PromptTooLongError`, `ChatTemplateError`). These are `ValueError`s, and LlamaIndex's
    refine synthesizers
    (the default `compact` response mode, not streaming) log any `ValueError` of an LLM
    and answer "Empty Response"; set `Settings.tokenizer = llm.encode` so that
    LlamaIndex packs prompts in this model's tokens, and prompts fit.

    Args:
        guard: the decoder to generate with (`InferenceGuard`, or a baseline from
            `inference_safeguard.baselines`, which reports safety but never refuses).
        **kwargs: fields below and those of LlamaIndex's `LLM` (`callback_manager`,
            `system_prompt`, `messages_to_prompt`, `completion_to_prompt`, ...).

    Raises:
        TypeError: `guard` is not an `inference_safeguard` decoder.
        pydantic.ValidationError: an unknown field, or settings `GuardConfig` rejects.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(
        default="",
        description="Name reported in the metadata; the base model's name or path by default.",
    )
    context_window: int = Field(
        default=DEFAULT_CONTEXT_WINDOW,
        gt=0,
        description="Most tokens (prompt and response) the model attends to; read from the "
        "base model's config by default. LlamaIndex packs prompts to fit it.",
    )
    record_safety_in_responses: bool = Field(
        default=True,
        description="Install the SafetyRecordHandler, so that query and chat engine "
        "responses carry metadata['safety'].",
    )

    # Every GuardConfig field, None meaning "the guard's own setting". Set ones apply to
    # every call; a call's keyword arguments override them.
    budget: float | None = Field(default=None, description=_describe("budget"))
    num_candidates: int | None = Field(default=None, description=_describe("num_candidates"))
    beam_width: int | None = Field(default=None, description=_describe("beam_width"))
    block_size: int | None = Field(default=None, description=_describe("block_size"))
    max_new_tokens: int | None = Field(default=None, description=_describe("max_new_tokens"))
    resample_rounds: int | None = Field(default=None, description=_describe("resample_rounds"))
    unsafe_penalty: float | None = Field(default=None, description=_describe("unsafe_penalty"))
    unsafe_logit_penalty: float | None = Field(
        default=None, description=_describe("unsafe_logit_penalty")
    )
    safety_discount: float | None = Field(default=None, description=_describe("safety_discount"))
    temperature: float | None = Field(default=None, description=_describe("temperature"))
    top_p: float | None = Field(default=None, description=_describe("top_p"))
    top_k: int | None = Field(default=None, description=_describe("top_k"))
    min_p: float | None = Field(default=None, description=_describe("min_p"))
    repetition_penalty: float | None = Field(
        default=None, description=_describe("repetition_penalty")
    )
    scorer: Literal["auto", "models", "critic"] | None = Field(
        default=None, description=_describe("scorer")
    )
    cost_probe: bool | None = Field(default=None, description=_describe("cost_probe"))
    critic_risk_weight: float | None = Field(
        default=None, description=_describe("critic_risk_weight")
    )
    on_unsafe: Literal["refuse", "return", "raise"] | None = Field(
        default=None, description=_describe("on_unsafe")
    )
    refusal_text: str | None = Field(default=None, description=_describe("refusal_text"))
    stop: list[str] | None = Field(default=None, description=_describe("stop"))
    stream_commit: Literal["agreement", "block"] | None = Field(
        default=None, description=_describe("stream_commit")
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description=_describe("chat_template_kwargs")
    )
    seed: int | None = Field(default=None, description=_describe("seed"))

    _guard: Decoder = PrivateAttr()

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string_is_one_sequence(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator(*CONFIG_FIELDS, mode="before")
    @classmethod
    def _config_numbers_are_not_bools(cls, value: Any, info: ValidationInfo) -> Any:
        # Checked before this field's own coercion would turn True into 1.
        if info.field_name is None:  # pydantic names the field for every field validator
            raise TypeError("_config_numbers_are_not_bools runs as a field validator only")
        return reject_bool_number(info.field_name, value)

    def __init__(self, guard: Decoder, **kwargs: Any) -> None:
        if not isinstance(guard, Decoder):
            raise TypeError(
                "guard must be an InferenceGuard (or another core decoder), got "
                f"{type(guard).__name__}; to load a model by name use "
                "SafeguardLLM.from_model_id(model_id, cost=...)"
            )
        if kwargs.get("model_name") is None:
            kwargs["model_name"] = guard.lm.name
        if kwargs.get("context_window") is None:
            kwargs["context_window"] = guard.lm.context_window or DEFAULT_CONTEXT_WINDOW
        super().__init__(**kwargs)
        self._guard = guard
        # Invalid settings fail here rather than in the middle of a query.
        self._guard.call_config(self._field_overrides())
        if self.record_safety_in_responses:
            install_safety_record_handler()

    @classmethod
    def from_model_id(
        cls,
        model_id: str,
        *,
        cost: Scorer | None,
        reward: Scorer | None = None,
        critic: CriticInput = None,
        config: GuardConfig | None = None,
        device: str | None = None,
        dtype: str | None = None,
        device_map: str | dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        allow_special_tokens_in_content: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> SafeguardLLM:
        """Load a Hugging Face causal LM by hub name or local path and guard it.

        Args:
            model_id: hub name or local path of the base model.
            cost: cost model C(x, y) (required).
            reward: reward model R(x, y), or None to rank by likelihood.
            critic: latent critic (or its directory) for critic mode, or None.
            config: default `GuardConfig` of every call.
            device, dtype, device_map, trust_remote_code, allow_special_tokens_in_content,
            model_kwargs, tokenizer_kwargs: see `InferenceGuard.from_pretrained`
                (`device_map` a string or a dict; `model_kwargs` e.g. quantization_config,
                attn_implementation, revision, gguf_file).
            **kwargs: `SafeguardLLM` fields (`callback_manager`, `system_prompt`, ...).
        """
        if cost is None:
            raise MissingCostModelError.of("SafeguardLLM.from_model_id")
        guard = InferenceGuard.from_pretrained(
            model_id,
            cost=cost,
            reward=reward,
            critic=critic,
            config=config,
            device=device,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            model_kwargs=model_kwargs,
            tokenizer_kwargs=tokenizer_kwargs,
            allow_special_tokens_in_content=allow_special_tokens_in_content,
        )
        return cls(guard=guard, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "SafeguardLLM"

    @property
    def guard(self) -> Decoder:
        """The decoder behind this LLM."""
        return self._guard

    @property
    def config(self) -> GuardConfig:
        """The config of a call without keyword overrides: the guard's, with the fields
        set on this LLM applied."""
        return self._guard.call_config(self._field_overrides())

    @property
    def metadata(self) -> LLMMetadata:
        """Context window and model name from the base model, `num_output` from the
        `max_new_tokens` of a call (`config`); a chat template makes it a chat and
        function-calling model."""
        chat = self._has_chat_template
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.config.max_new_tokens,
            is_chat_model=chat,
            is_function_calling_model=chat,
            model_name=self.model_name,
        )

    def to_payload(self) -> dict[str, Any]:
        """What callbacks and instrumentation events report: the metadata, the decoder
        and the config of its calls (built here, as newer LlamaIndex releases build theirs:
        older ones have no `to_payload` to extend)."""
        return {
            "class_name": self.class_name(),
            **self.metadata.model_dump(),
            "decoder": type(self._guard).__name__,
            "guard_config": self.config.model_dump(mode="json"),
        }

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` under the base model's tokenizer, without special tokens.

        Set `Settings.tokenizer = llm.encode` so that LlamaIndex sizes chunks and packs
        prompts in this model's tokens instead of tiktoken's.
        """
        return list(self._guard.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ----------------------------------------------------------------- completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Complete `prompt`; keyword arguments are `GuardConfig` overrides."""
        prompt_input = self._completion_prompt(prompt, formatted)
        slot = self._track()
        result = self._guard.generate(prompt_input, **self._overrides(kwargs))
        slot.fill(result.safety_record())
        return CompletionResponse(
            text=result.text, raw=_raw(result), additional_kwargs=_extra(result)
        )

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Stream the completion as the search commits it; the last chunk (empty
        delta) carries the safety record."""
        prompt_input = self._completion_prompt(prompt, formatted)
        stream = self._guard.stream(prompt_input, **self._overrides(kwargs))
        slot = self._track()

        def chunks() -> CompletionResponseGen:
            text = ""
            try:
                for delta in stream:
                    text += delta
                    yield CompletionResponse(text=text, delta=delta)
            finally:
                stream.close()
            result = _finished(stream, slot)
            yield CompletionResponse(
                text=text, delta="", raw=_raw(result), additional_kwargs=_extra(result)
            )

        return chunks()

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """`complete` with the search in a worker thread."""
        prompt_input = self._completion_prompt(prompt, formatted)
        slot = self._track()
        result = await self._guard.agenerate(prompt_input, **self._overrides(kwargs))
        slot.fill(result.safety_record())
        return CompletionResponse(
            text=result.text, raw=_raw(result), additional_kwargs=_extra(result)
        )

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """`stream_complete` with the search in a worker thread; deltas arrive as they
        are committed."""
        prompt_input = self._completion_prompt(prompt, formatted)
        # The prompt is checked (and tokenized) as the stream starts: off the event loop.
        stream = await asyncio.to_thread(
            self._guard.astream, prompt_input, **self._overrides(kwargs)
        )
        slot = self._track()

        async def chunks() -> CompletionResponseAsyncGen:
            text = ""
            try:
                async for delta in stream:
                    text += delta
                    yield CompletionResponse(text=text, delta=delta)
            finally:
                await stream.aclose()
            result = _finished(stream, slot)
            yield CompletionResponse(
                text=text, delta="", raw=_raw(result), additional_kwargs=_extra(result)
            )

        return chunks()

    # ----------------------------------------------------------------------- chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer the conversation; `tools=[...]` offers tools, the other keyword
        arguments are `GuardConfig` overrides."""
        tools = to_tool_specs(kwargs.pop("tools", None))
        prompt = self._chat_prompt(messages, tools)
        slot = self._track()
        result = self._guard.generate(prompt, tools=tools or None, **self._overrides(kwargs))
        slot.fill(result.safety_record())
        return _chat_response(result, tools)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream the answer as the search commits it; the last chunk carries the
        parsed tool calls and the safety record."""
        tools = to_tool_specs(kwargs.pop("tools", None))
        prompt = self._chat_prompt(messages, tools)
        stream = self._guard.stream(prompt, tools=tools or None, **self._overrides(kwargs))
        slot = self._track()

        def chunks() -> ChatResponseGen:
            chat = _ChatStream(tools)
            try:
                for delta in stream:
                    yield chat.push(delta)
            finally:
                stream.close()
            yield chat.finish(_finished(stream, slot))

        return chunks()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """`chat` with the search in a worker thread."""
        tools = to_tool_specs(kwargs.pop("tools", None))
        prompt = self._chat_prompt(messages, tools)
        slot = self._track()
        result = await self._guard.agenerate(prompt, tools=tools or None, **self._overrides(kwargs))
        slot.fill(result.safety_record())
        return _chat_response(result, tools)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """`stream_chat` with the search in a worker thread; deltas arrive as they are
        committed."""
        tools = to_tool_specs(kwargs.pop("tools", None))
        prompt = self._chat_prompt(messages, tools)
        # The prompt is checked (and tokenized) as the stream starts: off the event loop.
        stream = await asyncio.to_thread(
            self._guard.astream, prompt, tools=tools or None, **self._overrides(kwargs)
        )
        slot = self._track()

        async def chunks() -> ChatResponseAsyncGen:
            chat = _ChatStream(tools)
            try:
                async for delta in stream:
                    yield chat.push(delta)
            finally:
                await stream.aclose()
            yield chat.finish(_finished(stream, slot))

        return chunks()

    # ------------------------------------------------------------ function calling
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[ToolLike],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The `chat` arguments of a tool call: the conversation and the offered tools.

        `tool_choice` naming a tool offers only that tool and `"none"` offers none (see
        `inference_safeguard.tools.choose_tools`); a local model cannot be forced to call a tool, so
        `tool_required` is left to the caller's check
        (`get_tool_calls_from_response(error_on_no_tool_call=True)`).
        """
        messages = list(chat_history or [])
        if user_msg is not None:
            if isinstance(user_msg, str):
                user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
            messages.append(user_msg)
        return {
            "messages": messages,
            "tools": choose_tools(to_tool_specs(tools), tool_choice)[0],
            **kwargs,
        }

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[ToolLike],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Keep only the first tool call unless parallel calls are allowed."""
        if not allow_parallel_tool_calls:
            calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
            if len(calls) > 1:
                response.message.blocks = [
                    b
                    for b in response.message.blocks
                    if not isinstance(b, ToolCallBlock) or b is calls[0]
                ]
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The tool calls of a chat response as `ToolSelection`s.

        Raises:
            ValueError: there are none and `error_on_no_tool_call` is True.
        """
        selections = to_tool_selections(response.message)
        if not selections and error_on_no_tool_call:
            text = (response.message.content or "")[:200]
            raise ValueError(
                f"Expected at least one tool call, but the model answered with text: {text!r}"
            )
        return selections

    # ------------------------------------------------------------------ internals
    @property
    def _has_chat_template(self) -> bool:
        return bool(getattr(self._guard.lm.tokenizer, "chat_template", None))

    def _completion_prompt(self, prompt: str, formatted: bool) -> PromptInput:
        if not isinstance(prompt, str):
            raise InvalidPromptError(f"the prompt must be a string, got {type(prompt).__name__}")
        if formatted:
            return prompt
        # LlamaIndex types these fields Optional and reads None as its default.
        completion_to_prompt = self.completion_to_prompt or default_completion_to_prompt
        if completion_to_prompt is not default_completion_to_prompt:
            return completion_to_prompt(prompt)
        if self._has_chat_template:
            return [{"role": "user", "content": prompt}]
        return prompt

    def _chat_prompt(self, messages: Sequence[ChatMessage], tools: list[ToolSpec]) -> PromptInput:
        converted = to_guard_messages(messages)
        if self._has_chat_template:
            return converted
        if tools:
            raise ChatTemplateError(
                f"the tokenizer of {self.model_name!r} has no chat template, so tools cannot "
                "be offered to it; use a chat model, or set tokenizer.chat_template"
            )
        return (self.messages_to_prompt or generic_messages_to_prompt)(messages)

    def _track(self) -> RecordSlot:
        """The record slot of a call starting now (reported to engine responses only if
        `record_safety_in_responses`)."""
        return track_call() if self.record_safety_in_responses else RecordSlot()

    def _field_overrides(self) -> dict[str, Any]:
        return {
            name: getattr(self, name) for name in CONFIG_FIELDS if getattr(self, name) is not None
        }

    def _overrides(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's `GuardConfig` overrides: the fields set on this LLM, then its keywords."""
        unknown = sorted(set(kwargs) - set(CONFIG_FIELDS))
        if unknown:
            raise TypeError(
                f"SafeguardLLM got unexpected keyword arguments {unknown}; per-call options "
                f"are GuardConfig fields: {', '.join(CONFIG_FIELDS)}"
            )
        return {**self._field_overrides(), **kwargs}


def _finished(stream: GuardStream | AsyncGuardStream, slot: RecordSlot) -> GuardResult:
    """The result of a stream that just ended, its record put in `slot`."""
    result = stream.result
    if result is None:  # pragma: no cover - every stream that ends has one
        raise RuntimeError("the decoder finished a stream without a result")
    slot.fill(result.safety_record())
    return result


class _ChatStream:
    """Chat response chunks from committed text deltas.

    Without tools, each delta passes through. With tools, only content that can no
    longer turn out to be part of a tool call is passed on (`ToolCallHoldback`); each
    chunk's message carries the calls parsed so far, and the last one the final parse
    and the safety record.
    """

    def __init__(self, tools: list[ToolSpec]) -> None:
        self.tools = tools
        self.text = ""
        self.holdback = ToolCallHoldback(tools) if tools else None

    def push(self, delta: str) -> ChatResponse:
        """The chunk for one committed delta."""
        self.text += delta
        if self.holdback is None:
            return ChatResponse(
                message=ChatMessage(role=MessageRole.ASSISTANT, content=self.text), delta=delta
            )
        new = self.holdback.feed(delta)
        so_far = ParsedResponse(self.holdback.released, self.holdback.parsed.tool_calls)
        return ChatResponse(message=assistant_message(so_far), delta=new)

    def finish(self, result: GuardResult) -> ChatResponse:
        """The last chunk: the whole message, any content not yet passed on, the record.

        A response refused after some of it was committed ends as the refusal: the tool
        calls in its committed text must not run.
        """
        parsed = _parsed_result(result, self.text, self.tools)
        rest = self.holdback.finish(parsed.content) if self.holdback is not None else ""
        return ChatResponse(
            message=assistant_message(parsed, result.reasoning),
            delta=rest,
            raw=_raw(result, parsed),
            additional_kwargs=_extra(result),
        )


def _parsed_result(result: GuardResult, text: str, tools: list[ToolSpec]) -> ParsedResponse:
    """The response `text` split into content and tool calls; a refusal is all content,
    whatever it looks like, since no call of an over-budget response may run."""
    if result.refused or not tools:
        return ParsedResponse(result.text if result.refused else text, [])
    return parse_tool_calls(text, tools)


def _chat_response(result: GuardResult, tools: list[ToolSpec]) -> ChatResponse:
    parsed = _parsed_result(result, result.text, tools)
    return ChatResponse(
        message=assistant_message(parsed, result.reasoning),
        raw=_raw(result, parsed),
        additional_kwargs=_extra(result),
    )


def _raw(result: GuardResult, parsed: ParsedResponse | None = None) -> dict[str, Any]:
    """`raw` of a response: the decoded text, the safety record, usage and stats."""
    raw: dict[str, Any] = {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "safety": result.safety_record(),
        "usage": {
            "prompt_tokens": result.stats.prompt_tokens,
            "completion_tokens": result.stats.completion_tokens,
            "total_tokens": result.stats.prompt_tokens + result.stats.completion_tokens,
        },
        "stats": dataclasses.asdict(result.stats),
    }
    if result.reasoning is not None:
        raw["reasoning"] = result.reasoning
    if parsed is not None and parsed.invalid_tool_calls:
        raw["invalid_tool_calls"] = [dataclasses.asdict(c) for c in parsed.invalid_tool_calls]
    return raw


def _extra(result: GuardResult) -> dict[str, Any]:
    """`additional_kwargs` of a response: the safety record and the finish reason."""
    return {"safety": result.safety_record(), "finish_reason": result.finish_reason}
