"""`ChatSafeguard`: a LangChain chat model that generates with InferenceGuard."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
    Callbacks,
)
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
)
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.json import parse_json_markdown
from langchain_core.utils.pydantic import is_basemodel_subclass

from inference_safeguard import GuardConfig, GuardResult, UnsafeGenerationError
from inference_safeguard.decoder import Decoder
from inference_safeguard.tools import (
    ParsedResponse,
    ToolCallHoldback,
    ToolChoice,
    ToolSpec,
    parse_tool_calls,
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
from langchain_safeguard._tools import (
    ToolLike,
    apply_tool_choice,
    to_openai_tools,
    to_tool_specs,
    with_system_instruction,
)

_JSON_ONLY = "Answer with a single JSON object and nothing else."


@dataclass(frozen=True)
class _Call:
    """One prompt's call, ready for the decoder.

    Attributes:
        guard: the decoder.
        prompt: chat messages as the core takes them (tool choice applied).
        tools: the tools offered (and parsed).
        overrides: `GuardConfig` overrides of the call.
        config: the config they give.
        single_tool_call: keep only the first tool call (`parallel_tool_calls=False`).
        key: equal for calls that decode the same way (see `BatchPlan`).
    """

    guard: Decoder
    prompt: list[dict[str, Any]]
    tools: list[ToolSpec]
    overrides: dict[str, Any]
    config: GuardConfig
    single_tool_call: bool = False
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

    Tools and structured output:
        ```python
        model.bind_tools([get_weather, get_time]).invoke("Weather in Paris?").tool_calls
        model.with_structured_output(Person).invoke("Alice is 31.")
        ```
    The tokenizer's chat template renders the tools (or, if it cannot, a system
    message describes them) and tool calls are parsed from the text. Without
    constrained decoding, `tool_choice` is an instruction to the model, not a
    guarantee; an instruction-tuned model with tool support follows it.

    Per-call keywords: `stop`, `max_tokens`, and any `GuardConfig` field, e.g.
    `model.invoke(prompt, budget=1.0, seed=0)`.
    """

    model_config = MODEL_CONFIG

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
        call = self._prepare(messages, stop, kwargs)
        result = self._planned(call)
        if result is None:
            result = call.guard.generate(call.prompt, tools=call.tools, **call.overrides)
        return ChatResult(generations=[ChatGeneration(message=self._message(result, call))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await self._aload_guard()
        call = self._prepare(messages, stop, kwargs)
        result = await self._aplanned(call)
        if result is None:
            result = await call.guard.agenerate(call.prompt, tools=call.tools, **call.overrides)
        return ChatResult(generations=[ChatGeneration(message=self._message(result, call))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call = self._prepare(messages, stop, kwargs)
        result = self._planned(call)
        if result is not None:
            for chunk in self._result_chunks(result, call, ToolCallHoldback()):
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
            return
        holdback = ToolCallHoldback(call.tools) if call.tools else None
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
        call = self._prepare(messages, stop, kwargs)
        result = await self._aplanned(call)
        if result is not None:
            for chunk in self._result_chunks(result, call, ToolCallHoldback()):
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
            return
        holdback = ToolCallHoldback(call.tools) if call.tools else None
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
        """
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
        """`batch` without blocking the event loop: one batched search in a worker thread."""
        await self._aload_guard()
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
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer tools to the model; its tool calls come back in `AIMessage.tool_calls`.

        Args:
            tools: dicts (OpenAI format or JSON Schema), pydantic models, TypedDicts,
                functions or LangChain tools.
            tool_choice: `"auto"` (default), `"none"`, `"any"`/`"required"`/`True`
                (ask for a call), or a tool name (offer and ask for only that tool). A
                request, not a guarantee: decoding is not constrained.
            parallel_tool_calls: False keeps only the first tool call of a response.
            **kwargs: other keywords bound to every call (e.g. `budget`).
        """
        formatted = to_openai_tools(tools)
        # A bad tool choice fails here; tools sharing a name fail when called.
        apply_tool_choice([], [ToolSpec.from_openai(tool) for tool in formatted], tool_choice)
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

        Args:
            schema: a pydantic model (parsed into an instance), a TypedDict, or a JSON
                Schema / OpenAI tool dict (parsed into a dict).
            method: `"function_calling"`: the schema is offered as the one tool and the
                model is asked to call it; `"json_schema"`: the same, but a response
                that is plain JSON instead of a call is accepted too; `"json_mode"`:
                the model is asked for a JSON object (`schema` optional, used only to
                parse).
            include_raw: return `{"raw": AIMessage, "parsed": ..., "parsing_error": ...}`
                instead of raising on a parsing error; `raw` carries the safety record.
            strict: accepted for compatibility; output is checked by parsing, since
                decoding is not constrained.

        A refused response (over budget) does not parse: with `include_raw=True` its
        `raw` message shows the refusal and its safety record.
        """
        del strict
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {kwargs}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        output_format = {"kwargs": {"method": method}, "schema": schema}
        llm: Runnable[LanguageModelInput, AIMessage]
        parser: Runnable[Any, Any]
        if method == "json_mode":
            llm = self.bind(
                response_format={"type": "json_object"},
                **({"ls_structured_output_format": output_format} if schema is not None else {}),
            )
            parser = (
                PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
            )
        elif method in ("function_calling", "json_schema"):
            if schema is None:
                raise ValueError(f"with_structured_output(method={method!r}) needs a schema")
            tool_name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools(
                [schema], tool_choice=tool_name, ls_structured_output_format=output_format
            )
            if method == "json_schema":
                parser = RunnableLambda(_tool_or_json_parser(schema, tool_name, is_pydantic))
            elif is_pydantic:
                parser = PydanticToolsParser(tools=[schema], first_tool_only=True)
            else:
                parser = JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True)
        else:
            raise ValueError(
                f"method must be 'function_calling', 'json_schema' or 'json_mode', got {method!r}"
            )
        if not include_raw:
            return llm | parser
        parse_raw = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        )
        no_parse = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse_raw.with_fallbacks(
            [no_parse], exception_key="parsing_error"
        )

    # ------------------------------------------------------------------ internals
    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Call:
        """Everything one call needs; raises on bad input before any decoding."""
        kwargs = dict(kwargs)
        tools = to_tool_specs(kwargs.pop("tools", None) or [])
        tool_choice = kwargs.pop("tool_choice", None)
        parallel = kwargs.pop("parallel_tool_calls", None)
        response_format = kwargs.pop("response_format", None)
        prompt, tools = apply_tool_choice(to_chat_messages(messages), tools, tool_choice)
        if response_format is not None:
            prompt = _apply_response_format(prompt, response_format)
        overrides = self.config_overrides(stop, kwargs)
        config = self.call_config(overrides)
        single = parallel is False
        key = json.dumps(
            [prompt, [t.to_openai() for t in tools], overrides, single],
            sort_keys=True,
            default=repr,
        )
        return _Call(self.load_guard(), prompt, tools, overrides, config, single, key)

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
            return first.guard.generate_batch(
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
        if not call.tools or result.refused:
            return ParsedResponse(content=result.text, tool_calls=[])
        parsed = parse_tool_calls(result.text, call.tools)
        if call.single_tool_call and len(parsed.tool_calls) > 1:
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


def _apply_response_format(
    messages: list[dict[str, Any]], response_format: Any
) -> list[dict[str, Any]]:
    """Ask for JSON (`{"type": "json_object"}`); `{"type": "text"}` changes nothing."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return messages
    if kind == "json_object":
        return with_system_instruction(messages, _JSON_ONLY)
    raise ValueError(
        f"response_format {response_format!r} is not supported; use {{'type': 'json_object'}}, "
        "or with_structured_output(schema, method='json_schema') for a schema"
    )


def _tool_or_json_parser(
    schema: Any, tool_name: str, is_pydantic: bool
) -> Callable[[AIMessage], Any]:
    """Parse the arguments of the first call of `tool_name`, else the message's JSON text."""

    def parse(message: AIMessage) -> Any:
        data = next((c["args"] for c in message.tool_calls if c["name"] == tool_name), None)
        if data is None:
            try:
                data = parse_json_markdown(message.text)
            except ValueError as error:
                raise OutputParserException(
                    f"the response is neither a call of {tool_name} nor JSON: {error}",
                    llm_output=message.text,
                ) from error
        if not is_pydantic:
            return data
        validate = getattr(schema, "model_validate", None) or schema.parse_obj
        try:
            return validate(data)
        except Exception as error:
            raise OutputParserException(
                f"the response does not fit {schema.__name__}: {error}",
                llm_output=message.text,
            ) from error

    return parse
