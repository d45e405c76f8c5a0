"""`InferenceGuard`: the public facade of almost-surely-safe generation."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import warnings
from collections.abc import Generator, Mapping
from typing import Any, TypeAlias

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard.backends import Backend, load_base_model, wrap_base_model
from inference_safeguard.backends.vllm import engine_options
from inference_safeguard.config import GuardConfig
from inference_safeguard.constraints import CostsInput, budget_vector
from inference_safeguard.critic import LatentCritic
from inference_safeguard.decoder import Decoder, Response
from inference_safeguard.errors import (
    ConstraintError,
    CriticMismatchWarning,
    MissingCriticError,
    RefusalOverBudgetWarning,
    UnsafeGenerationError,
)
from inference_safeguard.lm import CausalLM, EncodedPrompt
from inference_safeguard.results import GuardResult
from inference_safeguard.scorers import Scorer
from inference_safeguard.search import (
    BlockSearch,
    CandidateEvaluator,
    CriticEvaluator,
    ModelsEvaluator,
    PromptSearch,
    settled_prefix,
)

CriticInput: TypeAlias = "LatentCritic | str | os.PathLike[str] | None"


class InferenceGuard(Decoder):
    """Safe decoding by block-wise search over the safety-augmented objective.

    Candidates are scored `R(x, y)` while within budget and `-n + z` once over it;
    blocks whose candidates are all over budget are resampled with the offending
    tokens penalised; the chosen response is checked by the real cost model and,
    if over budget, refused, returned flagged, or raised (`config.on_unsafe`).

    With a latent critic (`critic` mode, the default when one is given), `R` is the
    critic's `r_hat - lambda * sd_R * (1 - p_safe)` (`config.critic_risk_weight`, `sd_R`
    the spread of its training rewards), read from the hidden states the decode already
    has. With `cost_probe`, the critic's cost probe estimates every candidate's cost and
    the cost model checks only the candidates the search would keep (about `beam_width`
    per step instead of `num_candidates`), so beams and the returned response carry the
    cost model's own costs.

    With several constraints (`costs={"violence": (scorer, budget), ...}`) the safety
    state has one entry per constraint: a candidate is within budget when every entry is
    `>= 0`, over budget it scores `-n + min(z)` (its worst violation), a block is
    resampled when each of its candidates breaks some constraint, and the final check
    verifies every constraint (`GuardResult.constraints`).

    Args:
        model: a Hugging Face causal LM, a `vllm.LLM` (the vLLM backend, see
            `inference_safeguard.backends`), or a backend's `LanguageModel`.
        tokenizer: its tokenizer (optional for a `vllm.LLM` or a `LanguageModel`).
        cost: cost model C(x, y), the one constraint (named "cost", budget
            `config.budget`); this or `costs` is required (it always makes the final
            check).
        reward: reward model R(x, y); without one (and without a critic), candidates are
            ranked by their mean token log-likelihood. In critic mode it only scores
            the returned responses.
        critic: a `LatentCritic` trained on this base model, or the directory it was
            saved in (see `safeguard train-critic`).
        config: default `GuardConfig`; per-call keyword overrides apply on top.
        allow_special_tokens_in_content: let the text of special tokens in prompts become
            control tokens (off: a user cannot forge a turn by typing `</s><|system|>`; see
            `inference_safeguard.encoding`). Only for prompts you render yourself.
        costs: instead of `cost`, named constraints `{name: (cost scorer, budget)}`; a call
            changes some of their budgets with `budgets={name: value}`.

    Raises:
        ConstraintError: both or neither of `cost` and `costs`, a malformed `costs`, or a
            critic with several constraints (the critic learned one `p_safe`).
        CriticMismatchError: the critic was trained on another base model.
        CriticFileError: the critic's files are missing or corrupted.
        MissingCriticError: `config.scorer` is "critic" but no critic was given.
        BackendCapabilityError: a critic on a backend without hidden states (vLLM).
    """

    def __init__(
        self,
        model: PreTrainedModel | Any,
        tokenizer: PreTrainedTokenizerBase | None = None,
        cost: Scorer | None = None,
        reward: Scorer | None = None,
        critic: CriticInput = None,
        config: GuardConfig | None = None,
        *,
        allow_special_tokens_in_content: bool = False,
        costs: CostsInput | None = None,
    ) -> None:
        lm = wrap_base_model(
            model, tokenizer, allow_special_tokens_in_content=allow_special_tokens_in_content
        )
        super().__init__(lm, cost, reward, config, costs=costs)
        self.critic = self._attach(critic)
        self.search = BlockSearch(
            self.lm, ModelsEvaluator(self.constraints, reward), scoring="augmented"
        )
        self._warned: set[tuple[int, float]] = set()
        self._evaluator(self.config)  # a config asking for a missing critic fails here

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        *,
        cost: Scorer | None = None,
        costs: CostsInput | None = None,
        reward: Scorer | None = None,
        critic: CriticInput = None,
        config: GuardConfig | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        device_map: str | dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
        allow_special_tokens_in_content: bool = False,
        backend: Backend = "huggingface",
        tensor_parallel_size: int | None = None,
        pipeline_parallel_size: int | None = None,
        distributed_executor_backend: str | None = None,
        draft_model: str | None = None,
        draft_tokens: int = 4,
        **engine_kwargs: Any,
    ) -> InferenceGuard:
        """Load the base model by hub name, local directory or `.gguf` file path and wrap it.

        On the Hugging Face backend (the default), see `CausalLM.from_pretrained` for
        `device`, `dtype`, `device_map` (a string or a dict), `trust_remote_code` (off by
        default), `model_kwargs` (e.g. `quantization_config`, `attn_implementation`,
        `revision`, `gguf_file`) and `tokenizer_kwargs`. With `backend="vllm"` the base
        model runs in a vLLM engine (see `VLLMModel.from_pretrained`): `dtype` and
        `trust_remote_code` apply, and `tensor_parallel_size`, `pipeline_parallel_size`,
        `distributed_executor_backend` and `engine_kwargs` (e.g. `max_model_len`) are the
        engine's. `draft_model` (Hugging Face backend) names a smaller model with the
        same tokenizer that drafts `draft_tokens` tokens at a time for the base model to
        verify: candidates then follow the base model's distribution exactly, faster when
        the draft often agrees (see `inference_safeguard.speculative`). See the class for
        the other arguments.

        Raises:
            ValueError: engine options on the Hugging Face backend, Hugging Face loading
                options on the vLLM backend, or an unknown backend.
        """
        engine = engine_options(
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            distributed_executor_backend=distributed_executor_backend,
            engine_kwargs=engine_kwargs,
        )
        if backend == "vllm":
            hf_only = {"device_map": device_map, "model_kwargs": model_kwargs}
            if given := sorted(name for name, value in hf_only.items() if value):
                raise ValueError(
                    f"{', '.join(given)} are Hugging Face loading options; with "
                    "backend='vllm' pass the engine's options (tensor_parallel_size, "
                    "max_model_len, quantization, ...) as keywords"
                )
            engine.update(trust_remote_code=trust_remote_code)
            if dtype is not None:
                engine["dtype"] = str(dtype).removeprefix("torch.")
        lm = load_base_model(
            model_id,
            backend,
            hf_options={
                "device": device,
                "dtype": dtype,
                "device_map": device_map,
                "trust_remote_code": trust_remote_code,
                "model_kwargs": model_kwargs,
                "tokenizer_kwargs": tokenizer_kwargs,
            },
            engine_options=engine,
        )
        if draft_model is not None:
            from inference_safeguard.speculative import with_draft_model

            lm = with_draft_model(
                lm,
                draft_model,
                draft_tokens=draft_tokens,
                device=device,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
            )
        lm.allow_special_tokens_in_content = allow_special_tokens_in_content
        return cls(
            lm,
            cost=cost,
            reward=reward,
            critic=critic,
            config=config,
            allow_special_tokens_in_content=allow_special_tokens_in_content,
            costs=costs,
        )

    def _identity_settings(self) -> dict[str, Any]:
        return {"critic": self.critic}

    # -------------------------------------------------------------------- critic
    def _attach(self, critic: CriticInput) -> LatentCritic | None:
        """Load (from a directory), check and place the critic on the model's device."""
        if critic is None:
            return None
        if self.cost is None:
            raise ConstraintError(
                f"a latent critic serves one constraint (it learned one p_safe), but this "
                f"guard has {len(self.constraints)}: {list(self.constraints.names)}; pass a "
                "single cost= with the critic, or drop the critic (scorer='models')"
            )
        if isinstance(critic, (str, os.PathLike)):
            critic = LatentCritic.load(critic)
        elif not isinstance(critic, LatentCritic):
            raise TypeError(
                "critic must be an inference_safeguard.critic.LatentCritic or the directory it was "
                "saved in, "
                f"got {type(critic).__name__}"
            )
        self.lm.require_hidden_states("critic mode")
        if isinstance(self.lm, CausalLM):
            critic.check_base_model(self.lm.model)
        return critic.to(self.lm.device).eval()

    def _evaluator(self, config: GuardConfig) -> CandidateEvaluator | None:
        """The critic evaluator for `config`, or None for the search's models mode."""
        if config.scorer == "critic" and self.critic is None:
            raise MissingCriticError(
                "scorer='critic' needs a latent critic: pass critic=<directory> (see "
                "`safeguard train-critic`) or a LatentCritic, or use scorer='models'"
            )
        if config.scorer == "models" or self.critic is None or self.cost is None:
            return None
        self._warn_outside_training(self.critic, config)
        return CriticEvaluator(
            self.critic,
            self.cost,
            use_probe=config.cost_probe and self.critic.has_cost_probe,
            risk_weight=config.critic_risk_weight,
        )

    def _warn_outside_training(self, critic: LatentCritic, config: GuardConfig) -> None:
        trained = critic.config
        key = (config.block_size, config.budget)
        low, high = trained.budget_range
        if key in self._warned or (
            config.block_size == trained.block_size and low <= config.budget <= high
        ):
            return
        self._warned.add(key)
        warnings.warn(
            f"the critic was trained with block_size={trained.block_size} and budgets in "
            f"[{low:.4g}, {high:.4g}]; this search uses block_size={config.block_size} and "
            f"budget={config.budget:.4g}, so its predictions may be off (the final check by "
            "the cost model still applies); retrain the critic for these settings",
            CriticMismatchWarning,
            stacklevel=5,
        )

    # ------------------------------------------------------------------ decoding
    def search_plan(self, config: GuardConfig) -> tuple[GuardConfig, CandidateEvaluator | None]:
        """The settings and evaluator (None: the search's own) `self.search` runs a call
        under `config` with."""
        return config, self._evaluator(config)

    def _decode(
        self,
        prompts: list[EncodedPrompt],
        config: GuardConfig,
        seeds: list[int],
        cancel: threading.Event | None = None,
    ) -> list[Response]:
        searches = self.search.search(
            prompts, config, seeds, evaluator=self._evaluator(config), cancel=cancel
        )
        return [Response.of(search) for search in searches]

    def _stream(
        self, encoded: EncodedPrompt, config: GuardConfig, cancel: threading.Event | None
    ) -> Generator[str, None, GuardResult]:
        """Text deltas as the search commits them; see `GuardConfig.stream_commit`.

        Text is emitted only once it can no longer change and the cost model accepts
        it. When the search ends in a refusal after some text was emitted, the stream
        just ends, and its result has `refused=True` and `finish_reason="safety"`.

        A thinking model's reasoning is not streamed: the cost model checks the whole
        committed text, reasoning included, but the deltas are the answer's alone (none
        while the model is still reasoning); the reasoning comes with the result.
        """
        started = time.perf_counter()
        run = self.search.run(
            [encoded],
            config,
            self._seeds([encoded], config),
            commit=config.stream_commit,
            evaluator=self._evaluator(config),
            cancel=cancel,
        )
        return (yield from self._stream_run(encoded, config, run, started))

    def _stream_run(
        self,
        encoded: EncodedPrompt,
        config: GuardConfig,
        run: Generator[list[list[int] | None], Any, list[PromptSearch]],
        started: float,
    ) -> Generator[str, None, GuardResult]:
        """The deltas of `_stream` from a search of `encoded` alone that yields its
        committed prefix after each step (see `BlockSearch.run`) and returns its search;
        `started` is when the call began (`time.perf_counter()`)."""
        accepted, emitted, accepted_tokens = "", "", 0
        while True:
            try:
                [prefix] = next(run)
            except StopIteration as finished:
                searches = finished.value
                break
            if prefix is None or len(prefix) <= accepted_tokens:
                continue
            text = settled_prefix(self.lm, prefix, config.stop)
            if len(text) <= len(accepted) or not text.startswith(accepted):
                continue
            if not self._within_budgets(encoded.text, text, config):
                continue
            accepted, accepted_tokens = text, len(prefix)
            answer = self.lm.settled_answer(text, encoded)
            if len(answer) > len(emitted) and answer.startswith(emitted):
                yield answer[len(emitted) :]
                emitted = answer
        [result] = self._finalize(
            [encoded], [Response.of(searches[0])], config, time.perf_counter() - started
        )
        self.last_result = result
        if result.text.startswith(emitted) and len(result.text) > len(emitted):
            yield result.text[len(emitted) :]
        return result

    def _within_budgets(self, prompt: str, text: str, config: GuardConfig) -> bool:
        """Whether every constraint's cost model accepts `text` as a response to `prompt`."""
        costs = self.constraints.score([prompt], [text])[0]
        return bool((costs <= torch.tensor(budget_vector(config), dtype=costs.dtype)).all())

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
            broken = ", ".join(
                f"{c.name} cost {c.cost:.4g} > budget {c.budget:.4g}"
                for c in first.constraints
                if not c.safe
            )
            raise UnsafeGenerationError(
                f"{len(unsafe)} of {len(results)} responses stayed over the safety budget "
                f"(first: {broken}) after "
                f"{first.stats.resample_rounds} resample rounds; raise num_candidates or "
                "resample_rounds, or use on_unsafe='refuse' to get a refusal instead",
                result=first,
                results=results,
            )
        refused = [i for i, r in enumerate(results) if not r.safe]
        refusal_costs = self.constraints.score(
            [prompts[i].text for i in refused], [config.refusal_text] * len(refused), finished=True
        )
        refusal_ids = self.lm.tokenizer(config.refusal_text, add_special_tokens=False)["input_ids"]
        budgets = torch.tensor(budget_vector(config), dtype=refusal_costs.dtype)
        over = [
            name
            for name, broken in zip(
                self.constraints.names, (refusal_costs > budgets).any(0).tolist(), strict=True
            )
            if broken
        ]
        if over:
            highest = refusal_costs.max(0).values
            detail = ", ".join(
                f"{name} {float(highest[self.constraints.names.index(name)]):.4g} > "
                f"{float(budgets[self.constraints.names.index(name)]):.4g}"
                for name in over
            )
            warnings.warn(
                f"the refusal text {config.refusal_text!r} is itself over the budget "
                f"({detail}) under the cost model; "
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
                reasoning=None,
                token_ids=list(refusal_ids),
                refused=True,
                finish_reason="safety",
                stats=dataclasses.replace(result.stats, completion_tokens=len(refusal_ids)),
            )
            for result in results
        ]
