"""`SafeguardLLM`: a LangChain text-completion model that generates with InferenceGuard."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.language_models.base import LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from core import GuardResult
from core.scorers import Scorer
from langchain_safeguard._params import (
    MODEL_CONFIG,
    SafeguardParams,
    response_metadata_of,
    usage_of,
)


class SafeguardLLM(SafeguardParams, BaseLLM):
    """Text-completion model on a local Hugging Face LLM with almost-surely-safe decoding.

    The prompt is used as plain text, without a chat template (a chat prompt reaches
    it as LangChain's `Human: ...` transcript); for chat-tuned models prefer
    `ChatSafeguard`. Settings, loading and the safety outcome are as for
    `ChatSafeguard`: each generation's `generation_info` has `finish_reason`, the
    `safety` record, `stats` and `usage`, and over-budget responses are refused,
    returned flagged, or raised (`on_unsafe`).

    Example:
        ```python
        from core.scorers import KeywordCost
        from langchain_safeguard import SafeguardLLM

        llm = SafeguardLLM(model="gpt2", cost=KeywordCost(["bomb"]), max_tokens=64)
        llm.invoke("Once upon a time")
        result = llm.generate(["first prompt", "second prompt"])  # one batched search
        result.generations[0][0].generation_info["safety"]
        ```
    """

    model_config = MODEL_CONFIG

    @classmethod
    def from_model_id(
        cls,
        model_id: str,
        *,
        cost: Scorer,
        reward: Scorer | None = None,
        critic: Any = None,
        device: str | None = None,
        dtype: str | None = None,
        device_map: str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> SafeguardLLM:
        """Load `model_id` (hub name or local path) now and wrap it; see
        `ChatSafeguard.from_model_id`."""
        llm = cls(
            model=model_id,
            cost=cost,
            reward=reward,
            critic=critic,
            device=device,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
        llm.load_guard()
        return llm

    @property
    def _llm_type(self) -> str:
        return "safeguard"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.safeguard_params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "safeguard"
        if "ls_max_tokens" not in params and self.max_new_tokens is not None:
            params["ls_max_tokens"] = self.max_new_tokens
        return params

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """All prompts in one batched search (or, with `streaming=True`, one stream each)."""
        if self.streaming:
            chunks = [self._streamed(p, stop, run_manager, kwargs) for p in prompts]
            return LLMResult(generations=[[chunk] for chunk in chunks])
        kwargs = dict(kwargs)
        self.check_model_keyword(kwargs)
        overrides = self.config_overrides(stop, kwargs)
        results = self.load_guard().generate_batch(prompts, **overrides)
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
        kwargs = dict(kwargs)
        self.check_model_keyword(kwargs)
        overrides = self.config_overrides(stop, kwargs)
        guard = await asyncio.to_thread(self.load_guard)
        results = await guard.agenerate_batch(prompts, **overrides)
        return self._llm_result(results)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        kwargs = dict(kwargs)
        self.check_model_keyword(kwargs)
        overrides = self.config_overrides(stop, kwargs)
        guard = copy.copy(self.load_guard())  # its own `last_result`
        for delta in guard.stream(prompt, **overrides):
            chunk = GenerationChunk(text=delta)
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        assert guard.last_result is not None  # set by every finished stream
        yield GenerationChunk(text="", generation_info=self._info(guard.last_result))

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        kwargs = dict(kwargs)
        self.check_model_keyword(kwargs)
        overrides = self.config_overrides(stop, kwargs)
        guard = copy.copy(await asyncio.to_thread(self.load_guard))
        async for delta in guard.astream(prompt, **overrides):
            chunk = GenerationChunk(text=delta)
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        assert guard.last_result is not None
        yield GenerationChunk(text="", generation_info=self._info(guard.last_result))

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
        return {**response_metadata_of(result, self.model_name), "usage": usage_of(result)}

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
