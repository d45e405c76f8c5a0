"""`SafeguardLLM`: a LangChain text-completion model that generates with InferenceGuard."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
    Callbacks,
)
from langchain_core.language_models import BaseLLM, LanguageModelInput
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.runnables import RunnableConfig

from inference_safeguard import GuardResult
from langchain_safeguard._params import (
    MODEL_CONFIG,
    SafeguardParams,
    response_metadata_of,
    usage_of,
)
from langchain_safeguard._sessions import abatch_on_sessions, batch_on_sessions


class SafeguardLLM(SafeguardParams, BaseLLM):
    """Text-completion model on a local Hugging Face LLM with almost-surely-safe decoding.

    The prompt is used as plain text, without a chat template (a chat prompt reaches
    it as LangChain's `Human: ...` transcript); for chat-tuned models prefer
    `ChatSafeguard`. Settings, loading and the safety outcome are as for
    `ChatSafeguard`: each generation's `generation_info` has `finish_reason`, the
    `safety` record, `stats` and `usage`, and over-budget responses are refused,
    returned flagged, or raised (`on_unsafe`).

    A per-call `response_format` holds the completion to a shape by grammar while it is
    sampled: `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name":
    ..., "schema": {...}}}`, `{"type": "regex", "pattern": ...}` or `{"type": "grammar",
    "lark": ...}` (see `GuardConfig.response_format`), e.g.
    `llm.invoke("The year is ", response_format={"type": "regex", "pattern": "[0-9]{4}"})`.
    A completion cut by `max_tokens` can still end mid-shape (`finish_reason="length"`).

    Safety sessions work as for `ChatSafeguard`: with `session_budgets`, a call whose
    `RunnableConfig` names a session (`configurable["session_id"]`) is held to and
    charged to that session's remaining budget (or pass `session=` per call), and its
    safety record says what the session has left (`"session"`).

    Example:
        ```python
        from inference_safeguard.scorers import KeywordCost
        from langchain_safeguard import SafeguardLLM

        llm = SafeguardLLM(model="gpt2", cost=KeywordCost(["bomb"]), max_tokens=64)
        llm.invoke("Once upon a time")
        result = llm.generate(["first prompt", "second prompt"])  # one batched search
        llm = SafeguardLLM(model="gpt2", cost=KeywordCost(["bomb"]), session_budgets={"cost": 1.0})
        llm.invoke("Once upon a time", config={"configurable": {"session_id": "user-1"}})
        result.generations[0][0].generation_info["safety"]
        ```
    """

    model_config = MODEL_CONFIG
    call_keywords: ClassVar[tuple[str, ...]] = ("response_format",)  # no tools: no tool_choice

    @property
    def _llm_type(self) -> str:
        return "safeguard"

    async def agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        callbacks: Callbacks | list[Callbacks] | None = None,
        *,
        tags: list[str] | list[list[str]] | None = None,
        metadata: dict[str, Any] | list[dict[str, Any]] | None = None,
        run_name: str | list[str] | None = None,
        run_id: uuid.UUID | list[uuid.UUID | None] | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """LangChain's `agenerate`, with a model given by name loaded off the event loop
        first (LangChain reads the identifying parameters before generating)."""
        await self._aload_guard()
        return await super().agenerate(
            prompts,
            stop,
            callbacks,
            tags=tags,
            metadata=metadata,
            run_name=run_name,
            run_id=run_id,
            **kwargs,
        )

    # -------------------------------------------------------------- sessions
    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> str:
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
    ) -> str:
        """`invoke` for async code."""
        return await super().ainvoke(input, config, stop=stop, **self.with_session(config, kwargs))

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """LangChain's `stream`; a session's call yields its text once it is charged."""
        return super().stream(input, config, stop=stop, **self.with_session(config, kwargs))

    def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[str]:
        """`stream` for async code."""
        return super().astream(input, config, stop=stop, **self.with_session(config, kwargs))

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """LangChain's `batch` (all inputs in one search); inputs on safety sessions are
        decoded once each, those on one session one after another in input order (see
        `ChatSafeguard.batch`)."""
        outputs = batch_on_sessions(self, inputs, config, kwargs, return_exceptions)
        if outputs is not None:
            return outputs
        return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """`batch` for async code."""
        await self._aload_guard()
        outputs = await abatch_on_sessions(self, inputs, config, kwargs, return_exceptions)
        if outputs is not None:
            return outputs
        return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)

    # ------------------------------------------------------------ LangChain hooks
    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """All prompts in one batched search (or, with `streaming=True`, one stream each);
        on a session, one after another, each charged before the next starts."""
        if self.streaming:
            chunks = [self._streamed(p, stop, run_manager, kwargs) for p in prompts]
            return LLMResult(generations=[[chunk] for chunk in chunks])
        session = self.session_of(kwargs)
        overrides = self.config_overrides(stop, kwargs)
        results = self._runner().generate_batch(prompts, session=session, **overrides)
        return self._llm_result(results)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if self.streaming:
            chunks = [await self._astreamed(p, stop, run_manager, kwargs) for p in prompts]
            return LLMResult(generations=[[chunk] for chunk in chunks])
        session = self.session_of(kwargs)
        overrides = self.config_overrides(stop, kwargs)
        await self._aload_guard()
        results = await self._runner().agenerate_batch(prompts, session=session, **overrides)
        return self._llm_result(results)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        session = self.session_of(kwargs)
        overrides = self.config_overrides(stop, kwargs)
        # Leaving the stream early (LangChain closes this generator) stops the search.
        with self.load_guard().stream(prompt, session=session, **overrides) as stream:
            for delta in stream:
                chunk = GenerationChunk(text=delta)
                if run_manager:
                    run_manager.on_llm_new_token(delta, chunk=chunk)
                yield chunk
        assert stream.result is not None  # set by every finished stream
        yield GenerationChunk(text="", generation_info=self._info(stream.result))

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        session = self.session_of(kwargs)
        overrides = self.config_overrides(stop, kwargs)
        await self._aload_guard()
        async with self.load_guard().astream(prompt, session=session, **overrides) as stream:
            async for delta in stream:
                chunk = GenerationChunk(text=delta)
                if run_manager:
                    await run_manager.on_llm_new_token(delta, chunk=chunk)
                yield chunk
        assert stream.result is not None
        yield GenerationChunk(text="", generation_info=self._info(stream.result))

    # ------------------------------------------------------------------ internals
    def _streamed(
        self,
        prompt: str,
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        kwargs: dict[str, Any],
    ) -> GenerationChunk:
        chunks = list(self._stream(prompt, stop, run_manager, **kwargs))
        return sum(chunks[1:], chunks[0])

    async def _astreamed(
        self,
        prompt: str,
        stop: list[str] | None,
        run_manager: AsyncCallbackManagerForLLMRun | None,
        kwargs: dict[str, Any],
    ) -> GenerationChunk:
        chunks = [chunk async for chunk in self._astream(prompt, stop, run_manager, **kwargs)]
        return sum(chunks[1:], chunks[0])

    def _info(self, result: GuardResult) -> dict[str, Any]:
        info = {**response_metadata_of(result, self.model_name), "usage": usage_of(result)}
        if result.reasoning is not None:
            info["reasoning"] = result.reasoning
        return info

    def _llm_result(self, results: list[GuardResult]) -> LLMResult:
        generations = [[Generation(text=r.text, generation_info=self._info(r))] for r in results]
        usage = [usage_of(r) for r in results]
        token_usage = {
            key: sum(u[key] for u in usage)
            for key in ("input_tokens", "output_tokens", "total_tokens")
        }
        return LLMResult(
            generations=generations,
            llm_output={"model_name": self.model_name, "token_usage": token_usage},
        )
