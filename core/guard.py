"""`InferenceGuard`: the public facade of almost-surely-safe generation."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Generator, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.config import GuardConfig
from core.decoder import Decoder, Response
from core.errors import RefusalOverBudgetWarning, UnsafeGenerationError
from core.lm import CausalLM, EncodedPrompt
from core.results import GuardResult
from core.scorers import Scorer
from core.search import BlockSearch, ModelsEvaluator


class InferenceGuard(Decoder):
    """Safe decoding by block-wise search over the safety-augmented objective.

    Candidates are scored `R(x, y)` while within budget and `-n + z` once over it;
    blocks whose candidates are all over budget are resampled with the offending
    tokens penalised; the chosen response is checked by the real cost model and,
    if over budget, refused, returned flagged, or raised (`config.on_unsafe`).

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer.
        cost: cost model C(x, y); required.
        reward: reward model R(x, y); without one, candidates are ranked by their
            mean token log-likelihood.
        critic: latent critic; not supported by this version (critic mode).
        config: default `GuardConfig`; per-call keyword overrides apply on top.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cost: Scorer | None = None,
        reward: Scorer | None = None,
        critic: None = None,
        config: GuardConfig | None = None,
    ) -> None:
        if critic is not None:
            raise NotImplementedError(
                "critic mode is not available in this version of InferenceGuard; "
                "pass critic=None to search in 'models' mode with the cost and reward models"
            )
        super().__init__(CausalLM(model, tokenizer), cost, reward, config)
        self.search = BlockSearch(self.lm, ModelsEvaluator(cost, reward), scoring="augmented")

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        *,
        cost: Scorer | None = None,
        reward: Scorer | None = None,
        critic: None = None,
        config: GuardConfig | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        device_map: str | dict[str, Any] | None = None,
        trust_remote_code: bool = False,
    ) -> InferenceGuard:
        """Load the base model by hub name or local path and wrap it.

        See `CausalLM.from_pretrained` for `device`, `dtype`, `device_map` and
        `trust_remote_code` (off by default).
        """
        lm = CausalLM.from_pretrained(
            model_id,
            device=device,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
        )
        return cls(lm.model, lm.tokenizer, cost=cost, reward=reward, critic=critic, config=config)

    # ------------------------------------------------------------------ decoding
    def _decode(
        self, prompts: list[EncodedPrompt], config: GuardConfig, seeds: list[int]
    ) -> list[Response]:
        return [Response.of(search) for search in self.search.search(prompts, config, seeds)]

    def _stream(
        self, encoded: EncodedPrompt, config: GuardConfig
    ) -> Generator[str, None, GuardResult]:
        """Text deltas as the search commits them; see `GuardConfig.stream_commit`.

        Text is emitted only once it can no longer change and the cost model accepts
        it. When the search ends in a refusal after some text was emitted, the stream
        just ends, and its result has `refused=True` and `finish_reason="safety"`.
        """
        started = time.perf_counter()
        run = self.search.run(
            [encoded], config, self._seeds([encoded], config), commit=config.stream_commit
        )
        emitted, accepted_tokens = "", 0
        while True:
            try:
                [prefix] = next(run)
            except StopIteration as finished:
                searches = finished.value
                break
            if prefix is None or len(prefix) <= accepted_tokens:
                continue
            text = _settled_text(self.lm.decode([prefix])[0], config.stop)
            if len(text) <= len(emitted) or not text.startswith(emitted):
                continue
            if float(self.cost([encoded.text], [text])[0]) > config.budget:
                continue
            yield text[len(emitted) :]
            emitted, accepted_tokens = text, len(prefix)
        [result] = self._finalize(
            [encoded], [Response.of(searches[0])], config, time.perf_counter() - started
        )
        self.last_result = result
        if result.text.startswith(emitted) and len(result.text) > len(emitted):
            yield result.text[len(emitted) :]
        return result

    # --------------------------------------------------------------- enforcement
    def _enforce(
        self, prompts: list[EncodedPrompt], results: list[GuardResult], config: GuardConfig
    ) -> list[GuardResult]:
        """Apply `on_unsafe` to over-budget results.

        Refusing returns `refusal_text`, flagged `refused=True`. If the cost model rejects
        the refusal text itself, a `RefusalOverBudgetWarning` says so: the refusal is
        still returned (and flagged), since the user chose it.
        """
        unsafe = [r for r in results if not r.safe]
        if not unsafe or config.on_unsafe == "return":
            return results
        if config.on_unsafe == "raise":
            first = unsafe[0]
            raise UnsafeGenerationError(
                f"{len(unsafe)} of {len(results)} responses stayed over the safety budget "
                f"(first: cost {first.cost:.4g} > budget {config.budget:.4g}) after "
                f"{first.stats.resample_rounds} resample rounds; raise num_candidates or "
                "resample_rounds, or use on_unsafe='refuse' to get a refusal instead",
                result=first,
                results=results,
            )
        refused = [i for i, r in enumerate(results) if not r.safe]
        refusal_costs = self.cost(
            [prompts[i].text for i in refused], [config.refusal_text] * len(refused)
        ).tolist()
        refusal_ids = self.lm.tokenizer(config.refusal_text, add_special_tokens=False)["input_ids"]
        if any(cost > config.budget for cost in refusal_costs):
            warnings.warn(
                f"the refusal text {config.refusal_text!r} is itself over the budget "
                f"({max(refusal_costs):.4g} > {config.budget:.4g}) under the cost model; "
                "set refusal_text to a text the cost model accepts",
                RefusalOverBudgetWarning,
                stacklevel=4,
            )
        return [
            result
            if result.safe
            else dataclasses.replace(
                result,
                text=config.refusal_text,
                token_ids=list(refusal_ids),
                refused=True,
                finish_reason="safety",
                stats=dataclasses.replace(result.stats, completion_tokens=len(refusal_ids)),
            )
            for result in results
        ]


def _settled_text(text: str, stops: Sequence[str]) -> str:
    """`text` without what may still change: a trailing partial character or the start
    of a stop string."""
    text = text.rstrip("\ufffd")
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                text = text[:-size]
                break
    return text
