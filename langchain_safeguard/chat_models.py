"""`ChatSafeguard`: a LangChain chat model that generates with InferenceGuard."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
    Callbacks,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
)
from langchain_core.utils.function_calling import convert_to_openai_tool

from inference_safeguard import GuardConfig, GuardResult, UnsafeGenerationError
from inference_safeguard.config import CALL_SHAPE_FIELDS
from inference_safeguard.decoder import Decoder
from inference_safeguard.engine import GuardEngine
from inference_safeguard.tools import (
    ParsedResponse,
    ToolCallHoldback,
    ToolChoice,
    ToolSpec,
    parse_tool_calls,
    with_system_instruction,
)
from langchain_safeguard._batching import BatchPlan, active_plan, planned
from langchain_safeguard._messages import (
    invalid_tool_calls_of,
    to_chat_messages,
    tool_call_chunks_of,
    tool_calls_of,
)
from langchain_safeguard._params import (
    MODEL_CONFIG,
    SafeguardParams,
    reasoning_kwargs_of,
    response_metadata_of,
    usage_of,
)
from langchain_safeguard._sessions import abatch_on_sessions, batch_on_sessions
from langchain_safeguard._structured import (
    format_instruction,
    json_schema_format,
    structured_parser,
)
from langchain_safeguard._tools import ToolLike, offered_tools, to_openai_tools, to_tool_specs


@dataclass(frozen=True)
class _Call:
    """One prompt's call, ready for the decoder.

    Attributes:
        guard: the decoder (streams read it directly).
        runner: what the other calls decode with: the decoder's engine, or the decoder.
        prompt: chat messages as the core takes them (with the response format's
            instruction, if it has one).
        tools: the tools bound; the decoder offers those `tool_choice` picks.
        offered: the tools offered, the only ones whose calls are parsed.
        overrides: `GuardConfig` overrides of the call (its tool choice and response
            format included).
        config: the config they give.
        key: equal for calls that decode the same way (see `BatchPlan`).
    """

    guard: Decoder
    runner: Decoder | GuardEngine
    prompt: list[dict[str, Any]]
    tools: list[ToolSpec]
    offered: list[ToolSpec]
    overrides: dict[str, Any]
    config: GuardConfig
    key: str = field(default="", compare=False)


class ChatSafeguard(SafeguardParams, BaseChatModel):
    """Chat model on a local Hugging Face LLM with almost-surely-safe decoding.

    Every response comes from InferenceGuard's block-wise search (arXiv 2502.01208)
    and is checked by the cost model: a response over the safety budget is refused
    (`on_unsafe="refuse"`, the default: the message is the refusal text), returned
    flagged (`"return"`), or raised as `UnsafeGenerationError` (`"raise"`), which
    reaches LangChain's error callbacks. Tool-call text is held to the budget like
    any other text.

    Setup:
        ```bash
        pip install "inference-safeguard[langchain]"
        ```

    Instantiate with a model name or path (weights load on first use, once per
    process), or around a built `InferenceGuard`:
        ```python
        from inference_safeguard.scorers import KeywordCost
        from langchain_safeguard import ChatSafeguard

        model = ChatSafeguard(
            model="Qwen/Qwen2.5-1.5B-Instruct",
            cost=KeywordCost(["bomb", "detonator"]),
            budget=0.0, num_candidates=16, beam_width=4, max_tokens=128,
        )
        model = ChatSafeguard(guard=guard)  # guard = InferenceGuard(...)
        ```

    Invoke, stream, batch:
        ```python
        message = model.invoke("How do I get rid of a wasp nest?")
        message.response_metadata["safety"]
        # {'safe': True, 'cost': 0.0, 'budget': 0.0, 'reward': None,
        #  'refused': False, 'resample_rounds': 0}
        message.usage_metadata  # {'input_tokens': ..., 'output_tokens': ..., ...}

        for chunk in model.stream("..."):  # committed, cost-checked text only
            print(chunk.content, end="")

        model.batch(["first", "second"])  # all inputs decoded in one search
        ```

    Streaming emits text only once the search has committed it and the cost model
    accepts it (`stream_commit`), so chunks can arrive in bursts; the last chunk has
    `chunk_position="last"` and carries `usage_metadata` and `response_metadata`.
    Inside `batch()`, each input's response arrives as one chunk.

    Concurrent calls (`ainvoke` from many tasks, `invoke` from many threads) decode
    together: they go through the decoder's `GuardEngine`, shared with every model
    object on the same decoder, and join one batched search at its next block
    boundary. Pass `guard=GuardEngine(...)` to size the engine yourself, or
    `use_engine=False` to give every call its own search.

    Tools and structured output:
        ```python
        model.bind_tools([get_weather, get_time]).invoke("Weather in Paris?").tool_calls
        model.with_structured_output(Person).invoke("Alice is 31.")
        ```
    The tokenizer's chat template renders the tools (or, if it cannot, a system
    message describes them) and tool calls are parsed from the text. Decoding is
    grammar-constrained: a call the model writes is held to its tool's JSON Schema, a
    required `tool_choice` forces a call, and a `response_format` (or
    `with_structured_output`) forces JSON of the schema, so even a small model answers
    in the shape asked for, given the tokens (a response that reaches `max_tokens` ends
    mid-shape, with `finish_reason="length"`). The search and the safety budget work as
    ever inside the grammar: a forced call over budget is still refused.

    Per-call keywords: `stop`, `max_tokens`, any `GuardConfig` field, e.g.
    `model.invoke(prompt, budget=1.0, seed=0)`, and the call-shape fields
    `tool_choice`, `parallel_tool_calls` (with bound tools) and `response_format`
    (`{"type": "json_object"}`, `{"type": "json_schema", ...}`, `{"type": "regex",
    ...}`, `{"type": "grammar", ...}`; see `GuardConfig.response_format`).
    """

    model_config = MODEL_CONFIG
    call_keywords: ClassVar[tuple[str, ...]] = CALL_SHAPE_FIELDS

    # ------------------------------------------------------------ LangChain hooks
    @property
    def _llm_type(self) -> str:
        return "safeguard-chat"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        session = self.session_of(kwargs)
        call = self._prepare(messages, stop, kwargs)
        result = None if session is not None else self._planned(call)
        if result is None:
            result = call.runner.generate(
                call.prompt, tools=call.tools, session=session, **call.overrides
            )
        return ChatResult(generations=[ChatGeneration(message=self._message(result, call))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await self._aload_guard()
        session = self.session_of(kwargs)
        call = self._prepare(messages, stop, kwargs)
        result = None if session is not None else await self._aplanned(call)
        if result is None:
            result = await call.runner.agenerate(
                call.prompt, tools=call.tools, session=session, **call.overrides
            )
        return ChatResult(generations=[ChatGeneration(message=self._message(result, call))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # A session's call is charged once it is over, so its text comes at once.
        session = self.session_of(kwargs)
        call = self._prepare(messages, stop, kwargs)
        result = (
            self._planned(call)
            if session is None
            else call.runner.generate(
                call.prompt, tools=call.tools, session=session, **call.overrides
            )
        )
        if result is not None:
            for chunk in self._result_chunks(result, call, ToolCallHoldback()):
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
            return
        holdback = ToolCallHoldback(call.offered) if call.offered else None
        # Leaving the stream early (LangChain closes this generator) stops the search.
        with call.guard.stream(call.prompt, tools=call.tools, **call.overrides) as stream:
            for delta in stream:
                text = holdback.feed(delta) if holdback is not None else delta
                if text:
                    chunk = _text_chunk(text)
                    if run_manager:
                        run_manager.on_llm_new_token(text, chunk=chunk)
                    yield chunk
        assert stream.result is not None  # set by every finished stream
        for chunk in self._result_chunks(stream.result, call, holdback):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        await self._aload_guard()
        session = self.session_of(kwargs)
        call = self._prepare(messages, stop, kwargs)
        if session is None:
            result = await self._aplanned(call)
        else:
            result = await call.runner.agenerate(
                call.prompt, tools=call.tools, session=session, **call.overrides
            )
        if result is not None:
            for chunk in self._result_chunks(result, call, ToolCallHoldback()):
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
            return
        holdback = ToolCallHoldback(call.offered) if call.offered else None
        async with call.guard.astream(call.prompt, tools=call.tools, **call.overrides) as stream:
            async for delta in stream:
                text = holdback.feed(delta) if holdback is not None else delta
                if text:
                    chunk = _text_chunk(text)
                    if run_manager:
                        await run_manager.on_llm_new_token(text, chunk=chunk)
                    yield chunk
        assert stream.result is not None
        for chunk in self._result_chunks(stream.result, call, holdback):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # ------------------------------------------------------------------ batching
    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """LangChain's `invoke`; a session named in `config` (see `session_budgets`) is
        charged with the call."""
        return super().invoke(input, config, stop=stop, **self.with_session(config, kwargs))

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """`invoke` for async code."""
        return await super().ainvoke(input, config, stop=stop, **self.with_session(config, kwargs))

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        """LangChain's `stream`; a session's call yields its text once it is charged."""
        return super().stream(input, config, stop=stop, **self.with_session(config, kwargs))

    def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        """`stream` for async code."""
        return super().astream(input, config, stop=stop, **self.with_session(config, kwargs))

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Answer every input, decoding all of them in one batched search.

        LangChain still runs (and traces) one call per input; the first call decodes
        every input and the others pick up their responses (see `_batching`). An input
        that fails on its own (e.g. a prompt too long) fails alone.

        Inputs on safety sessions (see `session_budgets`) are decoded once each: the
        inputs on one session one after another, in input order, each charged before the
        next starts; inputs on different sessions side by side (they decode together in
        the engine); inputs on no session in one search, as above.
        """
        outputs = batch_on_sessions(self, inputs, config, kwargs, return_exceptions)
        if outputs is not None:
            return outputs
        with planned(self._plan_inputs(inputs, kwargs)):
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """`batch` without blocking the event loop: one batched search in a worker thread
        (inputs on safety sessions as `batch` says)."""
        await self._aload_guard()
        outputs = await abatch_on_sessions(self, inputs, config, kwargs, return_exceptions)
        if outputs is not None:
            return outputs
        with planned(self._plan_inputs(inputs, kwargs)):
            return await super().abatch(
                inputs, config, return_exceptions=return_exceptions, **kwargs
            )

    def generate(
        self,
        messages: list[list[BaseMessage]],
        stop: list[str] | None = None,
        callbacks: Callbacks = None,
        *,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        run_name: str | None = None,
        run_id: uuid.UUID | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """LangChain's `generate`, with all message lists decoded in one search."""
        with planned(self._plan_messages(messages, stop, kwargs)):
            return super().generate(
                messages,
                stop,
                callbacks,
                tags=tags,
                metadata=metadata,
                run_name=run_name,
                run_id=run_id,
                **kwargs,
            )

    async def agenerate(
        self,
        messages: list[list[BaseMessage]],
        stop: list[str] | None = None,
        callbacks: Callbacks = None,
        *,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        run_name: str | None = None,
        run_id: uuid.UUID | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """LangChain's `agenerate`, with all message lists decoded in one search."""
        await self._aload_guard()
        with planned(self._plan_messages(messages, stop, kwargs)):
            return await super().agenerate(
                messages,
                stop,
                callbacks,
                tags=tags,
                metadata=metadata,
                run_name=run_name,
                run_id=run_id,
                **kwargs,
            )

    # --------------------------------------------------------------------- tools
    def bind_tools(
        self,
        tools: Sequence[ToolLike],
        *,
        tool_choice: ToolChoice = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer tools to the model; its tool calls come back in `AIMessage.tool_calls`.

        Every call the model writes is held by grammar to its tool's JSON Schema (no
        argument the schema does not list), so the arguments parse and validate.

        Args:
            tools: dicts (OpenAI format or JSON Schema), pydantic models, TypedDicts,
                functions or LangChain tools.
            tool_choice: `"auto"` (default: the model answers in text or calls),
                `"none"` (no tools offered), `"any"`/`"required"`/`True` (a call is
                forced by grammar: the response is a call and nothing else), or a tool
                name / `{"type": "function", "function": {"name": ...}}` (a call of
                that tool is forced; only it is offered).
            parallel_tool_calls: False allows at most one call per response (by
                grammar); None or True allows several.
            strict: True marks every tool strict, as OpenAI's `function.strict`: every
                property is required, and a schema keyword the grammar cannot enforce
                is an error instead of being ignored. False marks none; None keeps what
                each tool says.
            **kwargs: other keywords bound to every call (e.g. `budget`).

        Raises:
            ValueError: a `tool_choice` that names a tool not bound, or that requires a
                call without tools. (Tools sharing a name, or a schema the grammar
                cannot enforce, fail when called.)
        """
        formatted = to_openai_tools(tools, strict=strict)
        offered_tools([ToolSpec.from_openai(tool) for tool in formatted], tool_choice)
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """A runnable that answers with an instance of `schema` (or a dict).

        The output is constrained by grammar while it is sampled, so a response that
        runs to its end parses and validates against the schema.

        Args:
            schema: a pydantic model (parsed into an instance), a TypedDict, or a JSON
                Schema / OpenAI tool dict (parsed into a dict).
            method: `"function_calling"`: the schema is offered as the one tool and one
                call of it is forced (`tool_choice=<its name>`,
                `parallel_tool_calls=False`); `"json_schema"`: the
                response is JSON of the schema (`response_format` json_schema; the
                system message shows the model the schema, whose field descriptions
                the grammar cannot convey); `"json_mode"`: the response is a JSON object
                (`response_format` json_object; `schema` optional, used only to parse,
                so the prompt must say which keys to use).
            include_raw: return `{"raw": AIMessage, "parsed": ..., "parsing_error": ...}`
                instead of raising on a parsing error; `raw` carries the safety record.
            strict: True holds the output to the schema under OpenAI's strict rules:
                every property required, and a schema keyword the grammar cannot enforce
                is an error instead of being ignored. (Properties the schema does not
                list are never allowed, strict or not.)

        A response that is no answer never comes back as if it were one: parsing raises
        `OutputParserException` (with `include_raw=True`: `parsed` is None,
        `parsing_error` says why and `raw` is the message) when the response was
        refused for going over the safety budget (`on_unsafe="refuse"`; `raw` is the
        refusal with its safety record), or when it reached `max_tokens` before the
        JSON was complete (`finish_reason="length"`; raise `max_tokens`). With
        `on_unsafe="return"` an over-budget answer is parsed and returned (flagged in
        `raw`'s safety record); with `"raise"` the model raises `UnsafeGenerationError`.

        Raises:
            ValueError: an unknown `method`, no `schema` for a method that needs one, or
                other keyword arguments.
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {kwargs}")
        output_format: dict[str, Any] = {"kwargs": {"method": method}, "schema": schema}
        llm: Runnable[LanguageModelInput, AIMessage]
        if method == "json_mode":
            llm = self.bind(
                response_format={"type": "json_object"},
                **({"ls_structured_output_format": output_format} if schema is not None else {}),
            )
            parser = structured_parser(schema)
        elif method in ("function_calling", "json_schema"):
            if schema is None:
                raise ValueError(f"with_structured_output(method={method!r}) needs a schema")
            output_format["kwargs"]["strict"] = strict
            if method == "function_calling":
                tool_name = convert_to_openai_tool(schema)["function"]["name"]
                llm = self.bind_tools(
                    [schema],
                    tool_choice=tool_name,
                    parallel_tool_calls=False,  # one object: the response ends after one call
                    strict=strict,
                    ls_structured_output_format=output_format,
                )
                parser = structured_parser(schema, tool_name=tool_name)
            else:
                llm = self.bind(
                    response_format=json_schema_format(schema, strict),
                    ls_structured_output_format=output_format,
                )
                parser = structured_parser(schema)
        else:
            raise ValueError(
                f"method must be 'function_calling', 'json_schema' or 'json_mode', got {method!r}"
            )
        if not include_raw:
            return llm | RunnableLambda(parser)
        parse_raw = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | RunnableLambda(parser), parsing_error=lambda _: None
        )
        no_parse = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse_raw.with_fallbacks(
            [no_parse], exception_key="parsing_error"
        )

    # ------------------------------------------------------------------ internals
    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Call:
        """Everything one call needs; raises on bad input before any decoding.

        The call's `tool_choice`, `parallel_tool_calls` and `response_format` go to the
        decoder as overrides: it picks the tools to offer, tells the model when a call is
        required, and builds the grammar that forces the call or the format.
        """
        kwargs = dict(kwargs)
        tools = to_tool_specs(kwargs.pop("tools", None) or [])
        overrides = self.config_overrides(stop, kwargs)
        config = self.call_config(overrides)
        offered = offered_tools(tools, config.tool_choice)
        prompt = to_chat_messages(messages)
        instruction = format_instruction(config.response_format)
        if instruction is not None:
            prompt = with_system_instruction(prompt, instruction)
        key = json.dumps(
            [prompt, [t.to_openai() for t in tools], overrides], sort_keys=True, default=repr
        )
        return _Call(
            self.load_guard(), self._runner(), prompt, tools, offered, overrides, config, key
        )

    def _plan_inputs(
        self, inputs: Sequence[LanguageModelInput], kwargs: dict[str, Any]
    ) -> BatchPlan | None:
        try:
            messages = [self._convert_input(value).to_messages() for value in inputs]
        except Exception:  # each input then fails (or not) on its own
            return None
        rest = {k: v for k, v in kwargs.items() if k != "stop"}
        return self._plan_messages(messages, kwargs.get("stop"), rest)

    def _plan_messages(
        self,
        messages: Sequence[list[BaseMessage]],
        stop: list[str] | None,
        kwargs: dict[str, Any],
    ) -> BatchPlan | None:
        """A plan to decode `messages` in one search, or None if they cannot share one."""
        if len(messages) < 2:
            return None
        try:
            calls = [self._prepare(m, stop, kwargs) for m in messages]
        except Exception:
            return None
        first = calls[0]
        if any(c.tools != first.tools or c.overrides != first.overrides for c in calls):
            return None
        # Enforcement per input: one over-budget response must not fail the batch.
        overrides = dict(first.overrides)
        if first.config.on_unsafe == "raise":
            overrides["on_unsafe"] = "return"

        def run() -> list[GuardResult]:
            return first.runner.generate_batch(
                [c.prompt for c in calls], tools=first.tools, **overrides
            )

        return BatchPlan(self, [c.key for c in calls], run)

    def _planned(self, call: _Call) -> GuardResult | None:
        """The call's result from the active batch plan, if it is in one."""
        plan = active_plan()
        index = plan.claim(self, call.key) if plan is not None else None
        if plan is None or index is None:
            return None
        result = plan.result(index)
        return None if result is None else _enforce(result, call)

    async def _aplanned(self, call: _Call) -> GuardResult | None:
        plan = active_plan()
        index = plan.claim(self, call.key) if plan is not None else None
        if plan is None or index is None:
            return None
        result = await plan.aresult(index)
        return None if result is None else _enforce(result, call)

    def _parsed(self, result: GuardResult, call: _Call) -> ParsedResponse:
        """The response's text and tool calls: only calls of the offered tools count, and
        only the first under `parallel_tool_calls=False` (which the grammar enforces for
        a constrained model; this holds for any decoder)."""
        if not call.offered or result.refused:
            return ParsedResponse(content=result.text, tool_calls=[])
        parsed = parse_tool_calls(result.text, call.offered)
        if not call.config.parallel_tool_calls and len(parsed.tool_calls) > 1:
            parsed = ParsedResponse(
                parsed.content, parsed.tool_calls[:1], parsed.invalid_tool_calls
            )
        return parsed

    def _message(self, result: GuardResult, call: _Call) -> AIMessage:
        parsed = self._parsed(result, call)
        return AIMessage(
            content=parsed.content,
            additional_kwargs=reasoning_kwargs_of(result),
            tool_calls=tool_calls_of(parsed),
            invalid_tool_calls=invalid_tool_calls_of(parsed),
            usage_metadata=usage_of(result),
            response_metadata=response_metadata_of(result, self.model_name),
        )

    def _result_chunks(
        self,
        result: GuardResult,
        call: _Call,
        holdback: ToolCallHoldback | None,
    ) -> Iterator[ChatGenerationChunk]:
        """The chunks that end a stream: the content `holdback` kept back (all of it for a
        fresh one; none without one, the decoder's deltas being final), then the last
        chunk with the tool calls, usage and metadata."""
        parsed = self._parsed(result, call)
        rest = holdback.finish(parsed.content) if holdback is not None else ""
        if rest:
            yield _text_chunk(rest)
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                additional_kwargs=reasoning_kwargs_of(result),
                chunk_position="last",
                tool_call_chunks=tool_call_chunks_of(parsed),
                usage_metadata=usage_of(result),
                response_metadata=response_metadata_of(result, self.model_name),
            )
        )


def _text_chunk(text: str) -> ChatGenerationChunk:
    return ChatGenerationChunk(message=AIMessageChunk(content=text))


def _enforce(result: GuardResult, call: _Call) -> GuardResult:
    """`on_unsafe="raise"` for one result of a batch decoded with `on_unsafe="return"`."""
    if call.config.on_unsafe == "raise" and not result.safe:
        raise UnsafeGenerationError(
            f"the response stayed over the safety budget (cost {result.cost:.4g} > budget "
            f"{result.budget:.4g}) after {result.stats.resample_rounds} resample rounds; raise "
            "num_candidates or resample_rounds, or use on_unsafe='refuse' to get a refusal",
            result=result,
            results=[result],
        )
    return result
