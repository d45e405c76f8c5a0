"""`SafeguardLLM`: almost-surely-safe decoding (InferenceGuard) as a LlamaIndex LLM."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from typing import Any, Literal

import llama_index.core.instrumentation as instrument
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
)
from llama_index.core.bridge.pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
)
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictInProgressEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection, default_completion_to_prompt
from llama_index.core.program.utils import FlexibleModel, process_streaming_objects
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.types import PydanticProgramMode

from inference_safeguard.calibration import RewardCalibration
from inference_safeguard.config import CALL_SHAPE_FIELDS, GuardConfig, reject_bool_number
from inference_safeguard.constraints import CostsInput
from inference_safeguard.decoder import Decoder
from inference_safeguard.engine import GuardEngine, shared_engine
from inference_safeguard.errors import ChatTemplateError, InvalidPromptError, MissingCostModelError
from inference_safeguard.guard import CriticInput, InferenceGuard
from inference_safeguard.lm import PromptInput
from inference_safeguard.results import GuardResult
from inference_safeguard.scorers import Scorer
from inference_safeguard.session import SafetySession
from inference_safeguard.streaming import AsyncGuardStream, GuardStream
from inference_safeguard.tools import (
    ParsedResponse,
    ToolCallHoldback,
    ToolChoice,
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
from llamaindex_safeguard.structured import (
    Model,
    json_schema_format,
    parse_object,
    with_schema_instruction,
)

dispatcher = instrument.get_dispatcher(__name__)

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
    streaming forms, and async forms that keep the event loop free and deliver stream
    deltas as the search commits them.

    Concurrent calls (`acomplete`/`achat` from many tasks, `complete`/`chat` from many
    threads, and the structured and tool calls built on them) decode together: they go
    through the decoder's `GuardEngine`, shared with every LLM object (LlamaIndex or
    LangChain) on the same decoder, and join one batched search at its next block
    boundary. Streams read the decoder directly, so that a stream decodes only as it is
    read. Pass `guard=GuardEngine(...)` to size the engine yourself, or
    `use_engine=False` to give every call its own search.

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

    Function calling: `chat_with_tools`, `predict_and_call`, `FunctionAgent` and
    `ReActAgent` work through `inference_safeguard.tools`: the chat template renders the
    tools (or a system message describes them) and the response is parsed into
    `ToolCallBlock`s. The call shape LlamaIndex asks for is enforced by grammar during the
    search, not asked of the model: `tool_required=True` or a `tool_choice` that requires a
    call (`"required"`, a tool name) makes the response a call, `allow_parallel_tool_calls=False`
    allows one, and every call's arguments fit its tool's schema. A stream with tools
    passes on only text that cannot turn out to be part of a call; its last chunk carries
    the calls.

    Structured output: `structured_predict`, its async and streaming forms and
    `as_structured_llm` decode under the output class's JSON Schema as a grammar (see
    `llamaindex_safeguard.structured`), so the object validates whatever the model; a
    refusal raises `StructuredOutputRefusedError` rather than being returned in its place.

    Settings: every `GuardConfig` field is also a field here (None: the guard's own
    setting) and a per-call keyword (`llm.complete(prompt, max_new_tokens=32, seed=0)`);
    a call's keywords override the fields, which override the guard's config. The fields
    that shape one call (`response_format`, `tool_choice`, `parallel_tool_calls`) are
    per-call keywords only.

    Bad input raises `inference_safeguard`'s typed errors (`InvalidPromptError`,
    `PromptTooLongError`, `ChatTemplateError`). These are `ValueError`s, and LlamaIndex's
    refine synthesizers
    (the default `compact` response mode, not streaming) log any `ValueError` of an LLM
    and answer "Empty Response"; set `Settings.tokenizer = llm.encode` so that
    LlamaIndex packs prompts in this model's tokens, and prompts fit.

    Args:
        guard: the decoder to generate with (`InferenceGuard`, or a baseline from
            `inference_safeguard.baselines`, which reports safety but never refuses), or
            a `GuardEngine` serving one.
        **kwargs: fields below and those of LlamaIndex's `LLM` (`callback_manager`,
            `system_prompt`, `messages_to_prompt`, `completion_to_prompt`, ...).

    Raises:
        TypeError: `guard` is not an `inference_safeguard` decoder or engine.
        ValueError: `guard` is an engine and `use_engine` is False.
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
    use_engine: bool = Field(
        default=True,
        description="Decode calls other than streams through the decoder's shared "
        "GuardEngine, so that concurrent calls join one batched search; False: every call "
        "runs its own search. A decoder no engine serves (ARGS) is called directly either way.",
    )
    record_safety_in_responses: bool = Field(
        default=True,
        description="Install the SafetyRecordHandler, so that query and chat engine "
        "responses carry metadata['safety'].",
    )

    # Every GuardConfig field, None meaning "the guard's own setting". Set ones apply to
    # every call; a call's keyword arguments override them.
    budget: float | None = Field(default=None, description=_describe("budget"))
    budgets: dict[str, float] | None = Field(default=None, description=_describe("budgets"))
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
    reward_calibration: RewardCalibration | None = Field(
        default=None, description=_describe("reward_calibration")
    )
    calibration_exponent: float | None = Field(
        default=None, description=_describe("calibration_exponent")
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
    _engine: GuardEngine | None = PrivateAttr(default=None)
    _session: SafetySession | None = PrivateAttr(default=None)

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

    def __init__(self, guard: Decoder | GuardEngine, **kwargs: Any) -> None:
        engine = guard if isinstance(guard, GuardEngine) else None
        if engine is not None:
            guard = engine.guard
        if not isinstance(guard, Decoder):
            raise TypeError(
                "guard must be an InferenceGuard (or another core decoder, or a GuardEngine), "
                f"got {type(guard).__name__}; to load a model by name use "
                "SafeguardLLM.from_model_id(model_id, cost=...)"
            )
        if kwargs.get("model_name") is None:
            kwargs["model_name"] = guard.lm.name
        if kwargs.get("context_window") is None:
            kwargs["context_window"] = guard.lm.context_window or DEFAULT_CONTEXT_WINDOW
        super().__init__(**kwargs)
        if engine is not None and not self.use_engine:
            raise ValueError(
                "use_engine=False calls the decoder directly, but guard= is a GuardEngine; "
                "pass its decoder (engine.guard) instead"
            )
        self._guard = guard
        self._engine = engine or (shared_engine(guard) if self.use_engine else None)
        # Invalid settings fail here rather than in the middle of a query.
        self._guard.call_config(self._field_overrides())
        if self.record_safety_in_responses:
            install_safety_record_handler()

    @classmethod
    def from_model_id(
        cls,
        model_id: str,
        *,
        cost: Scorer | None = None,
        costs: CostsInput | None = None,
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
            cost: cost model C(x, y), the one constraint; this or `costs` is required.
            costs: several named constraints `{name: (cost scorer, budget)}` instead.
            reward: reward model R(x, y), or None to rank by likelihood.
            critic: latent critic (or its directory) for critic mode, or None.
            config: default `GuardConfig` of every call.
            device, dtype, device_map, trust_remote_code, allow_special_tokens_in_content,
            model_kwargs, tokenizer_kwargs: see `InferenceGuard.from_pretrained`
                (`device_map` a string or a dict; `model_kwargs` e.g. quantization_config,
                attn_implementation, revision, gguf_file).
            **kwargs: `SafeguardLLM` fields (`callback_manager`, `system_prompt`, ...).
        """
        if cost is None and costs is None:
            raise MissingCostModelError.of("SafeguardLLM.from_model_id")
        guard = InferenceGuard.from_pretrained(
            model_id,
            cost=cost,
            costs=costs,
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
    def engine(self) -> GuardEngine | None:
        """The engine that calls other than streams decode through, or None when they
        call the decoder directly (see `use_engine`)."""
        return self._engine

    @property
    def _runner(self) -> Decoder | GuardEngine:
        return self._engine or self._guard

    # ------------------------------------------------------------------ sessions
    def with_session(self, session: SafetySession) -> SafeguardLLM:
        """A copy of this LLM (same decoder, engine and settings) whose every call is held
        to and charged to `session` (see `inference_safeguard.session`): give it to one
        chat engine, or to a `FunctionAgent`, so that the whole conversation or agent run
        spends one budget. A stream of it yields its text at once, after the charge."""
        if not isinstance(session, SafetySession):
            raise TypeError(
                f"session must be an inference_safeguard.SafetySession, got "
                f"{type(session).__name__}"
            )
        bound = self.model_copy()
        bound._session = session
        return bound

    @property
    def session(self) -> SafetySession | None:
        """The session this LLM's calls are charged to, or None."""
        return self._session

    def _stream(self, prompt: PromptInput, **kwargs: Any) -> GuardStream:
        """The decoder's stream, charged to the session when there is one."""
        return self._guard.stream(prompt, session=self._session, **kwargs)

    def _astream(self, prompt: PromptInput, **kwargs: Any) -> AsyncGuardStream:
        return self._guard.astream(prompt, session=self._session, **kwargs)

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
        result = self._runner.generate(
            prompt_input, session=self._session, **self._overrides(kwargs)
        )
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
        stream = self._stream(prompt_input, **self._overrides(kwargs))
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
        """`complete` without blocking the event loop."""
        prompt_input = self._completion_prompt(prompt, formatted)
        slot = self._track()
        result = await self._runner.agenerate(
            prompt_input, session=self._session, **self._overrides(kwargs)
        )
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
        stream = await asyncio.to_thread(self._astream, prompt_input, **self._overrides(kwargs))
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
        specs = to_tool_specs(kwargs.pop("tools", None))
        overrides = self._overrides(kwargs)
        tools = self._offered(specs, overrides)
        prompt = self._chat_prompt(messages, tools)
        slot = self._track()
        result = self._runner.generate(
            prompt, tools=specs or None, session=self._session, **overrides
        )
        slot.fill(result.safety_record())
        return _chat_response(result, tools)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream the answer as the search commits it; the last chunk carries the
        parsed tool calls and the safety record."""
        specs = to_tool_specs(kwargs.pop("tools", None))
        overrides = self._overrides(kwargs)
        tools = self._offered(specs, overrides)
        prompt = self._chat_prompt(messages, tools)
        stream = self._stream(prompt, tools=specs or None, **overrides)
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
        """`chat` without blocking the event loop."""
        specs = to_tool_specs(kwargs.pop("tools", None))
        overrides = self._overrides(kwargs)
        tools = self._offered(specs, overrides)
        prompt = self._chat_prompt(messages, tools)
        slot = self._track()
        result = await self._runner.agenerate(
            prompt, tools=specs or None, session=self._session, **overrides
        )
        slot.fill(result.safety_record())
        return _chat_response(result, tools)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """`stream_chat` with the search in a worker thread; deltas arrive as they are
        committed."""
        specs = to_tool_specs(kwargs.pop("tools", None))
        overrides = self._overrides(kwargs)
        tools = self._offered(specs, overrides)
        prompt = self._chat_prompt(messages, tools)
        # The prompt is checked (and tokenized) as the stream starts: off the event loop.
        stream = await asyncio.to_thread(self._astream, prompt, tools=specs or None, **overrides)
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
        tool_choice: ToolChoice = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The `chat` arguments of a tool call: the conversation, the tools, and the call
        shape the decoder enforces by grammar.

        `tool_required` (or a `tool_choice` that requires a call: `"required"`, a tool
        name) makes the response a call, whatever the model would have written;
        `allow_parallel_tool_calls=False` allows at most one. An explicit `tool_choice`
        other than `"auto"` wins over `tool_required`.
        """
        messages = list(chat_history or [])
        if user_msg is not None:
            if isinstance(user_msg, str):
                user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
            messages.append(user_msg)
        if tool_required and tool_choice in (None, "auto"):
            tool_choice = "required"
        # An unset choice is left out, so that the guard config's own applies.
        choice = {} if tool_choice is None else {"tool_choice": tool_choice}
        return {
            "messages": messages,
            "tools": tools,
            **choice,
            "parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

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

    # ---------------------------------------------------------- structured output
    @dispatcher.span
    def structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """An object of `output_cls`, decoded under the class's JSON Schema as a grammar
        (see `llamaindex_safeguard.structured`), so that the response is one whatever the
        model; `llm_kwargs` are `GuardConfig` overrides. A `pydantic_program_mode` other
        than the default takes LlamaIndex's program of that mode instead.

        Raises:
            StructuredOutputRefusedError: the search refused (over the safety budget).
            StructuredOutputError: the JSON did not close within `max_new_tokens`, or a
                validator of the class rejected it.
        """
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        self._structured_start(output_cls, prompt, prompt_args)
        messages, kwargs = self._structured_call(output_cls, prompt, llm_kwargs, prompt_args)
        output = parse_object(self.chat(messages, **kwargs), output_cls)
        dispatcher.event(LLMStructuredPredictEndEvent(output=output))
        return output

    @dispatcher.span
    async def astructured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """`structured_predict` without blocking the event loop."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        self._structured_start(output_cls, prompt, prompt_args)
        messages, kwargs = self._structured_call(output_cls, prompt, llm_kwargs, prompt_args)
        output = parse_object(await self.achat(messages, **kwargs), output_cls)
        dispatcher.event(LLMStructuredPredictEndEvent(output=output))
        return output

    @dispatcher.span
    def stream_structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Generator[Model | FlexibleModel, None, None]:
        """`structured_predict` as the search commits the JSON: partial objects (fields
        not yet written are None), then the object itself.

        The partial objects are provisional: a response the search refuses in the end
        ends the stream with `StructuredOutputRefusedError` instead of an object.
        """
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            yield from super().stream_structured_predict(
                output_cls, prompt, llm_kwargs, **prompt_args
            )
            return
        self._structured_start(output_cls, prompt, prompt_args)
        messages, kwargs = self._structured_call(output_cls, prompt, llm_kwargs, prompt_args)
        partial = _PartialObjects(self, output_cls)
        for chunk in self.stream_chat(messages, **kwargs):
            yield partial.push(chunk)
        dispatcher.event(LLMStructuredPredictEndEvent(output=partial.last))

    @dispatcher.span
    async def astream_structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> AsyncGenerator[Model | FlexibleModel, None]:
        """`stream_structured_predict` with the search in a worker thread."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astream_structured_predict(
                output_cls, prompt, llm_kwargs, **prompt_args
            )
        self._structured_start(output_cls, prompt, prompt_args)
        messages, kwargs = self._structured_call(output_cls, prompt, llm_kwargs, prompt_args)
        stream = await self.astream_chat(messages, **kwargs)
        partial = _PartialObjects(self, output_cls)

        async def objects() -> AsyncGenerator[Model | FlexibleModel, None]:
            async for chunk in stream:
                yield partial.push(chunk)
            dispatcher.event(LLMStructuredPredictEndEvent(output=partial.last))

        return objects()

    def _structured_start(
        self, output_cls: type[Model], prompt: BasePromptTemplate, prompt_args: dict[str, Any]
    ) -> None:
        """The start event LlamaIndex's own structured prediction sends, for its
        instrumentation handlers."""
        dispatcher.event(
            LLMStructuredPredictStartEvent(
                output_cls=output_cls, template=prompt, template_args=prompt_args
            )
        )

    def _structured_call(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None,
        prompt_args: dict[str, Any],
    ) -> tuple[list[ChatMessage], dict[str, Any]]:
        """The chat messages (with the schema in the system message) and keywords (the
        schema as the response format) of a structured prediction."""
        messages = self._extend_messages(prompt.format_messages(llm=self, **prompt_args))
        kwargs = {**(llm_kwargs or {}), "response_format": json_schema_format(output_cls)}
        return with_schema_instruction(messages, output_cls), kwargs

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
        """A call's `GuardConfig` overrides: the fields set on this LLM, then its keywords
        (which may also shape the call: `response_format`, `tool_choice`,
        `parallel_tool_calls`)."""
        unknown = sorted(set(kwargs) - set(GuardConfig.model_fields))
        if unknown:
            raise TypeError(
                f"SafeguardLLM got unexpected keyword arguments {unknown}; per-call options "
                f"are GuardConfig fields: {', '.join(GuardConfig.model_fields)}"
            )
        return {**self._field_overrides(), **kwargs}

    def _offered(self, specs: list[ToolSpec], overrides: dict[str, Any]) -> list[ToolSpec]:
        """The tools the decoder offers under the call's `tool_choice`: the only ones a
        response's calls are read against, so that a call of a tool not offered stays
        text.

        Raises:
            InvalidPromptError: a `tool_choice` that names no given tool.
        """
        tool_choice = self._guard.call_config(overrides).tool_choice
        try:
            return choose_tools(specs, tool_choice)[0]
        except ValueError as error:
            raise InvalidPromptError(str(error)) from None


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


class _PartialObjects:
    """Objects from the chunks of a structured stream: a partial object per chunk (read
    the way LlamaIndex's programs read partial JSON), and the checked object at the end."""

    def __init__(self, llm: SafeguardLLM, output_cls: type[Model]) -> None:
        self.llm = llm
        self.output_cls = output_cls
        self.objects: list[Any] | None = None
        self.last: Any = None

    def push(self, chunk: ChatResponse) -> Any:
        """The object of `chunk`: partial, or (on the last chunk, which carries the safety
        record) the object itself.

        Raises:
            StructuredOutputError: the last chunk is a refusal or does not validate.
        """
        if "safety" in chunk.additional_kwargs:
            self.last = parse_object(chunk, self.output_cls)
        else:
            self.last = process_streaming_objects(
                chunk, self.output_cls, cur_objects=self.objects, llm=self.llm
            )
            self.objects = [self.last]
        dispatcher.event(LLMStructuredPredictInProgressEvent(output=self.last))
        return self.last


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
