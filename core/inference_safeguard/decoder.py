"""`Decoder`: the interface every decoder shares (InferenceGuard and the baselines).

A decoder turns prompts into `GuardResult`s. This base class owns what is common:
prompt validation, per-call config overrides, seeds, the final safety record, and
the sync/async/streaming entry points, and their cancellation (a flag the search
checks between tokens, set by closing a stream or cancelling an async call).
Subclasses implement `_decode`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Generator, Mapping, Sequence
from typing import Any

import torch

from inference_safeguard.cancellation import run_in_worker
from inference_safeguard.config import GuardConfig
from inference_safeguard.constraints import Constraints, CostsInput, worst
from inference_safeguard.errors import InvalidPromptError
from inference_safeguard.identity import (
    describe,
    scorer_identity,
    tokenizer_fingerprint,
)
from inference_safeguard.lm import EncodedPrompt, LanguageModel, PromptInput
from inference_safeguard.results import (
    ConstraintOutcome,
    FinishReason,
    GenerationStats,
    GuardResult,
)
from inference_safeguard.scorers import Scorer
from inference_safeguard.search import PromptSearch
from inference_safeguard.session import SafetySession
from inference_safeguard.streaming import AsyncGuardStream, GuardStream
from inference_safeguard.tools import (
    ToolSpec,
    as_tool_specs,
    call_is_required,
    choose_tools,
    with_system_instruction,
)

ToolsInput = Sequence[ToolSpec | Mapping[str, Any]] | None


@dataclasses.dataclass(frozen=True)
class Response:
    """A decoded response before its safety record is attached."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    reward: float | None = None
    prefix_cost: tuple[float, ...] = ()
    """Per constraint, the highest cost its cost model gave a block-end prefix of the
    response in the search; -inf (or no entries at all) when none was scored (negative
    costs are kept: nothing is clamped to 0)."""
    cost_checked: bool = False
    """Whether `prefix_cost` already covers the response's own text (no need to score it)."""
    blocks: int = 0
    candidates_scored: int = 0
    resample_rounds: int = 0

    @classmethod
    def of(cls, search: PromptSearch) -> Response:
        """The best finished response of a block search."""
        best = search.best()
        return cls(
            token_ids=best.token_ids,
            text=best.text,
            finish_reason=best.finish_reason,
            reward=best.reward,
            prefix_cost=best.cost,
            cost_checked=best.cost_checked,
            blocks=search.blocks,
            candidates_scored=search.candidates_scored,
            resample_rounds=search.resample_rounds,
        )


class Decoder(ABC):
    """Base of all decoders: generate, generate_batch, stream and their async forms.

    Args:
        lm: the base model.
        cost: cost model C(x, y), the one constraint (named "cost", budget
            `config.budget`); every decoder reports the cost of what it returns.
        reward: reward model R(x, y), or None.
        config: defaults for every call; each call may override fields by keyword.
        costs: instead of `cost`, several named constraints `{name: (scorer, budget)}`
            (see `inference_safeguard.constraints`).

    Attributes:
        constraints: the decoder's constraints, in order.
        cost: the cost scorer when there is one constraint, else None.
    """

    def __init__(
        self,
        lm: LanguageModel,
        cost: Scorer | None,
        reward: Scorer | None = None,
        config: GuardConfig | None = None,
        *,
        costs: CostsInput | None = None,
    ) -> None:
        self.constraints = Constraints.of(type(self).__name__, cost, costs)
        if reward is not None and not isinstance(reward, Scorer):
            raise TypeError(
                "reward must be an inference_safeguard.scorers.Scorer (e.g. ClassifierScorer, "
                f"or CallableScorer(fn) around a function), got {type(reward).__name__}"
            )
        if config is not None and not isinstance(config, GuardConfig):
            raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}")
        self.lm = lm
        self.cost = self.constraints.single
        self.reward = reward
        # Sampling fields left unset take the model's generation_config values, once.
        self.config = self.constraints.configure(
            (config or GuardConfig()).with_sampling_defaults(lm.sampling_defaults)
        )
        self.last_result: GuardResult | None = None

    # ----------------------------------------------------------------- public API
    def generate(
        self,
        prompt: PromptInput,
        *,
        tools: ToolsInput = None,
        session: SafetySession | None = None,
        **overrides: Any,
    ) -> GuardResult:
        """Generate one response.

        Args:
            prompt: plain text (used as is) or a chat message list (chat template applied).
            tools: tools the model may call (`ToolSpec`s or OpenAI-style dicts); parse the
                response with `inference_safeguard.tools.parse_tool_calls`.
            session: a `SafetySession` whose remaining budget this call is held to (and its
                own, whichever is smaller) and charged with; once it is spent, the call
                refuses or raises without generating (see `inference_safeguard.session`).
            **overrides: `GuardConfig` fields for this call only.
        """
        return self.generate_batch([prompt], tools=tools, session=session, **overrides)[0]

    def generate_batch(
        self,
        prompts: Sequence[PromptInput],
        *,
        tools: ToolsInput = None,
        session: SafetySession | None = None,
        **overrides: Any,
    ) -> list[GuardResult]:
        """Generate one response per prompt, all prompts decoded together.

        With a `session`, the prompts are answered one after another, in order, each held
        to what the one before left of the session (so they are not decoded together):
        the same as `generate(prompt, session=session)` for each prompt in turn.
        """
        if session is not None:
            return session.run_each(
                self,
                len(prompts),
                overrides,
                lambda i, budgeted: self._generate_batch([prompts[i]], tools, budgeted, None)[0],
            )
        return self._generate_batch(prompts, tools, overrides, cancel=None)

    def _generate_batch(
        self,
        prompts: Sequence[PromptInput],
        tools: ToolsInput,
        overrides: Mapping[str, Any],
        cancel: threading.Event | None,
    ) -> list[GuardResult]:
        config = self.call_config(overrides)
        encoded = self.encode_prompts(prompts, config, tools)
        return self._generate_encoded(encoded, config, cancel)

    def stream(
        self,
        prompt: PromptInput,
        *,
        tools: ToolsInput = None,
        session: SafetySession | None = None,
        **overrides: Any,
    ) -> GuardStream:
        """The response as text deltas that can no longer change; `.result` at the end.

        The prompt and settings are checked at once, before the first delta. The
        search runs only while a delta is asked for; `stream.close()` (or a `with`
        block) stops it within one decoded token and frees its memory. This default
        yields the whole response at once; decoders that can commit text earlier
        override `_stream`. With a `session` (see `generate`), the response is charged
        before any of it is shown, so it comes as one delta.
        """
        if session is not None:
            cancel = threading.Event()
            return GuardStream(self._charged(prompt, tools, session, overrides, cancel), cancel)
        config = self.call_config(overrides)
        [encoded] = self.encode_prompts([prompt], config, tools)
        cancel = threading.Event()
        return GuardStream(self._stream(encoded, config, cancel), cancel)

    def _charged(
        self,
        prompt: PromptInput,
        tools: ToolsInput,
        session: SafetySession,
        overrides: Mapping[str, Any],
        cancel: threading.Event,
    ) -> Generator[str, None, GuardResult]:
        """The whole response of a call held to and charged to `session`, as one delta."""
        result = session.run(
            self,
            overrides,
            lambda budgeted: self._generate_batch([prompt], tools, budgeted, cancel)[0],
        )
        if result.text:
            yield result.text
        return result

    def _stream(
        self, prompt: EncodedPrompt, config: GuardConfig, cancel: threading.Event | None
    ) -> Generator[str, None, GuardResult]:
        """Yield the deltas and return the result; stop with `GenerationCancelledError`
        soon after `cancel` is set."""
        [result] = self._generate_encoded([prompt], config, cancel)
        if result.text:
            yield result.text
        return result

    def _generate_encoded(
        self,
        prompts: list[EncodedPrompt],
        config: GuardConfig,
        cancel: threading.Event | None = None,
    ) -> list[GuardResult]:
        started = time.perf_counter()
        responses = self._decode(prompts, config, self._seeds(prompts, config), cancel)
        results = self._finalize(prompts, responses, config, time.perf_counter() - started)
        self.last_result = results[-1]
        return results

    async def agenerate(
        self,
        prompt: PromptInput,
        *,
        tools: ToolsInput = None,
        session: SafetySession | None = None,
        **overrides: Any,
    ) -> GuardResult:
        """`generate` in a worker thread, so the event loop keeps running.

        Cancelling the awaiting task (`task.cancel()`, `asyncio.wait_for` timing out)
        stops the search within one decoded token; the cancellation completes once it
        has stopped (a cancelled call charges nothing to `session`).
        """
        [result] = await self.agenerate_batch([prompt], tools=tools, session=session, **overrides)
        return result

    async def agenerate_batch(
        self,
        prompts: Sequence[PromptInput],
        *,
        tools: ToolsInput = None,
        session: SafetySession | None = None,
        **overrides: Any,
    ) -> list[GuardResult]:
        """`generate_batch` in a worker thread; cancellable like `agenerate`."""
        cancel = threading.Event()
        if session is None:
            work = functools.partial(self._generate_batch, prompts, tools, overrides, cancel)
            return await run_in_worker(work, cancel.set)

        def charged() -> list[GuardResult]:
            return session.run_each(
                self,
                len(prompts),
                overrides,
                lambda i, budgeted: self._generate_batch([prompts[i]], tools, budgeted, cancel)[0],
            )

        return await run_in_worker(charged, cancel.set)

    def astream(
        self, prompt: PromptInput, *, tools: ToolsInput = None, **overrides: Any
    ) -> AsyncGuardStream:
        """`stream` for async code: `async for delta in decoder.astream(...)`.

        The prompt and settings are checked at once. Each delta is computed in a worker
        thread only while it is awaited; cancelling the awaiting task, `aclose()` or
        dropping the stream stops the search within one decoded token and frees its
        memory. `.result` is set once the stream has ended.
        """
        return AsyncGuardStream(self.stream(prompt, tools=tools, **overrides))

    def call_config(self, overrides: Mapping[str, Any]) -> GuardConfig:
        """The config of a call: this decoder's, with `overrides` (GuardConfig fields)
        applied; a sampling field set back to None takes the model's default again.
        `budgets` names only the constraints whose budget the call changes.

        Raises:
            ConstraintError: `budgets` names a constraint this decoder does not have, or
                `budget` is set for a decoder with several constraints.
        """
        overrides = self.constraints.call_overrides(self.config, overrides)
        config = self.config.with_overrides(**overrides).with_sampling_defaults(
            self.lm.sampling_defaults
        )
        return self.constraints.resolve(config)

    def identity(self, config: GuardConfig | None = None) -> dict[str, Any]:
        """Everything that decides what this decoder returns under `config` (default: its
        own): its class, the base model's and tokenizer's fingerprints, the scorers, every
        config field, and the decoder's own settings (see `inference_safeguard.identity`).
        `inference_safeguard.identity.digest` of it keys a cache of responses."""
        return {
            "decoder": f"{type(self).__module__}.{type(self).__qualname__}",
            "model": self.lm.fingerprint(),
            "tokenizer": tokenizer_fingerprint(self.lm.tokenizer),
            "allow_special_tokens_in_content": self.lm.allow_special_tokens_in_content,
            "cost": scorer_identity(self.cost)
            if self.cost is not None
            else {c.name: scorer_identity(c.scorer) for c in self.constraints.items},
            "reward": scorer_identity(self.reward),
            "config": (config or self.config).model_dump(mode="json"),
            "settings": describe(self._identity_settings()),
        }

    def _identity_settings(self) -> dict[str, Any]:
        """The decoder's settings, beyond its model, scorers and config, that change what
        it returns."""
        return {}

    # ------------------------------------------------------------------ internals
    def encode_prompts(
        self, prompts: Sequence[PromptInput], config: GuardConfig, tools: ToolsInput = None
    ) -> list[EncodedPrompt]:
        """Validate and tokenize prompts, checking they fit the context window, with the
        tools `config.tool_choice` offers (a chat prompt is told when a call is required)
        and the grammar of `config.response_format` and the tool calls attached.

        Raises:
            InvalidPromptError: a bad prompt, or a tool choice that needs tools but got none.
            OutputFormatError: a response format or tool schema that cannot be enforced.
        """
        specs = as_tool_specs(tools)
        if call_is_required(config.tool_choice) and not specs:
            raise InvalidPromptError(
                f"tool_choice={config.tool_choice!r} requires a tool call, but no tools were "
                "given; pass tools=[...] or leave tool_choice unset"
            )
        try:
            offered, instruction = choose_tools(specs, config.tool_choice)
        except ValueError as error:
            raise InvalidPromptError(str(error)) from None
        if instruction is not None:
            prompts = [with_system_instruction(p, instruction) for p in prompts]
        encoded = self.lm.encode_batch(
            prompts, config.max_new_tokens, offered, config.chat_template_kwargs
        )
        return self.lm.constrain(
            encoded,
            config.response_format,
            offered,
            config.tool_choice,
            config.parallel_tool_calls,
        )

    @staticmethod
    def _seeds(prompts: Sequence[EncodedPrompt], config: GuardConfig) -> list[int]:
        """One sampler seed per prompt.

        With `config.seed`, a prompt's seed is derived from it and the prompt's tokens:
        a prompt decodes the same alone or in any batch, while different prompts of a
        batch draw independent samples. Without, fresh seeds from torch's RNG.
        """
        if config.seed is None:
            return torch.randint(0, 2**62, (len(prompts),)).tolist()
        return [_derived_seed(config.seed, prompt.ids) for prompt in prompts]

    @abstractmethod
    def _decode(
        self,
        prompts: list[EncodedPrompt],
        config: GuardConfig,
        seeds: list[int],
        cancel: threading.Event | None = None,
    ) -> list[Response]:
        """Decode one response per prompt; stop with `GenerationCancelledError` (see
        `cancellation.raise_if_cancelled`) soon after `cancel` is set."""

    def _finalize(
        self,
        prompts: list[EncodedPrompt],
        responses: list[Response],
        config: GuardConfig,
        seconds: float,
    ) -> list[GuardResult]:
        """Score the responses with the real cost models, as finished responses (unless the
        search already scored the very text so) and the reward model (where the search did
        not), and build the results, each constraint verified. Baselines report;
        InferenceGuard enforces."""
        prompt_texts = [p.text for p in prompts]
        texts = [r.text for r in responses]
        # The cost of what was said: the full text's, or a prefix's if that was higher.
        width = len(self.constraints)
        unchecked = [i for i, r in enumerate(responses) if not r.cost_checked]
        costs = [list(r.prefix_cost) or [-math.inf] * width for r in responses]
        if unchecked:
            scored = self.constraints.score(
                [prompt_texts[i] for i in unchecked], [texts[i] for i in unchecked], finished=True
            )
            for i, row in zip(unchecked, scored.tolist(), strict=True):
                costs[i] = [max(new, old) for new, old in zip(row, costs[i], strict=True)]
        rewards: list[float | None] = [r.reward for r in responses]
        missing = [i for i, r in enumerate(rewards) if r is None]
        if self.reward is not None and missing:
            scored = self.reward([prompt_texts[i] for i in missing], [texts[i] for i in missing])
            for i, value in zip(missing, scored.tolist(), strict=True):
                rewards[i] = value
        results = []
        for prompt, response, cost, reward in zip(prompts, responses, costs, rewards, strict=True):
            # The cost and reward above are of the whole response, reasoning included.
            reasoning, answer = self.lm.split_reasoning(response.text, prompt)
            outcomes = self.constraints.outcomes(cost, config)
            least = worst(outcomes)
            result = GuardResult(
                text=answer,
                reasoning=reasoning,
                token_ids=response.token_ids,
                safe=all(o.safe for o in outcomes),
                cost=least.cost,
                reward=reward,
                refused=False,
                finish_reason=response.finish_reason,
                budget=least.budget,
                constraints=outcomes,
                stats=GenerationStats(
                    blocks=response.blocks,
                    candidates_scored=response.candidates_scored,
                    resample_rounds=response.resample_rounds,
                    prompt_tokens=len(prompt.ids),
                    completion_tokens=len(response.token_ids),
                    seconds=seconds,
                ),
            )
            results.append(result)
        return self._enforce(prompts, results, config)

    def _enforce(
        self, prompts: list[EncodedPrompt], results: list[GuardResult], config: GuardConfig
    ) -> list[GuardResult]:
        """What to do with scored results; baselines report them as they are."""
        return results

    def withheld(
        self, config: GuardConfig, budgets: Mapping[str, float], spent: Sequence[str]
    ) -> GuardResult:
        """The result of a call that did not generate because a safety session is spent:
        `config.refusal_text`, `refused=True`, `finish_reason="safety"`; each constraint
        reports a cost of 0 against the budget the call would have had (`budgets`, what
        the session left), and is unsafe where it is `spent`."""
        ids = self.lm.tokenizer(config.refusal_text, add_special_tokens=False)["input_ids"]
        outcomes = tuple(
            ConstraintOutcome(name, 0.0, budgets[name], name not in spent)
            for name in self.constraints.names
        )
        least = worst(outcomes)
        return GuardResult(
            text=config.refusal_text,
            token_ids=list(ids),
            safe=False,
            cost=least.cost,
            reward=None,
            refused=True,
            finish_reason="safety",
            budget=least.budget,
            stats=GenerationStats(completion_tokens=len(ids)),
            constraints=outcomes,
        )


def _derived_seed(seed: int, token_ids: Sequence[int]) -> int:
    """A 62-bit seed from a user seed and a prompt's token ids (stable across runs)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update((seed % 2**64).to_bytes(8, "little"))
    digest.update(b"".join((i % 2**32).to_bytes(4, "little") for i in token_ids))
    return int.from_bytes(digest.digest(), "little") >> 2
