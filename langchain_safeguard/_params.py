"""Settings that `ChatSafeguard` and `SafeguardLLM` share: the decoder, how to load it,
LangChain's standard parameters, every `GuardConfig` field as a default override, and the
LangChain hooks that report them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, ClassVar, Literal, Self

import torch
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages.ai import UsageMetadata
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import RunnableConfig, ensure_config
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from inference_safeguard import (
    GuardConfig,
    GuardResult,
    InferenceGuard,
    InvalidPromptError,
    MissingCostModelError,
)
from inference_safeguard.calibration import RewardCalibration
from inference_safeguard.config import CALL_SHAPE_FIELDS, reject_bool_number
from inference_safeguard.decoder import Decoder
from inference_safeguard.engine import GuardEngine, shared_engine
from inference_safeguard.identity import digest
from inference_safeguard.scorers import Scorer
from inference_safeguard.session import SafetySession, SafetySessions
from inference_safeguard.tools import read_tool_call
from langchain_safeguard._loading import ModelSource, load_model

CONFIG_FIELDS: tuple[str, ...] = tuple(
    name for name in GuardConfig.model_fields if name not in CALL_SHAPE_FIELDS
)
"""`GuardConfig` fields: each is also a field of the models and a per-call keyword."""

MODEL_CONFIG = ConfigDict(
    extra="forbid",
    arbitrary_types_allowed=True,
    protected_namespaces=(),
    use_attribute_docstrings=True,
)
"""Pydantic settings of the model classes; they set it again themselves, since pydantic
lets the LangChain base class (extra="ignore") override a mixin's config."""

_BUILD_LOCK = threading.Lock()
_LOADING_FIELDS = (
    "cost",
    "costs",
    "reward",
    "critic",
    "device",
    "dtype",
    "device_map",
    "model_kwargs",
    "tokenizer_kwargs",
)
# Keywords LangChain itself passes down to `_generate`/`_stream`, not meant for the model.
_LANGCHAIN_KWARGS = frozenset({"stream", "ls_structured_output_format", "structured_output_format"})
# What LangChain's message conversion raises on input it cannot read.
_UNREADABLE_INPUT = (KeyError, TypeError, AttributeError, ValidationError, json.JSONDecodeError)


class SafeguardParams(BaseModel):
    """The decoder and its settings; mixed into the LangChain model classes.

    Every `GuardConfig` field left at None takes its value from the decoder's own
    config (`GuardConfig()` defaults for a model loaded by name); a set field
    overrides it for every call, and a call's keywords override both.
    """

    model_config = MODEL_CONFIG

    call_keywords: ClassVar[tuple[str, ...]] = ()
    """The call-shape fields (`config.CALL_SHAPE_FIELDS`) the class takes as per-call
    keywords: they describe one call (its tools, its output format), so they are no
    settings of the model object, and are passed to the decoder only where given."""

    guard: Decoder | GuardEngine | None = Field(default=None, exclude=True)
    """A built decoder (e.g. `InferenceGuard`), or a `GuardEngine` serving one, to use
    instead of loading `model`."""
    use_engine: bool = True
    """Decode calls through the decoder's `GuardEngine` (one per decoder, shared by every
    model object on it: see `engine.shared_engine`), so that concurrent calls join one
    batched search instead of running a search each. Streams read the decoder directly,
    so that a stream decodes only as it is read. Off, every call runs its own search in
    its caller's thread; a decoder that no engine serves (ARGS) is called directly
    either way."""
    model: str | None = None
    """Base model's hub name or path, loaded on first use; with `guard`, only its reported name."""
    cost: Scorer | None = Field(default=None, exclude=True)
    """Cost model C(x, y) (e.g. `KeywordCost`, `ClassifierScorer`); this or `costs` is
    required with `model`."""
    costs: dict[str, tuple[Scorer, float]] | None = Field(default=None, exclude=True)
    """Several named constraints `{name: (cost scorer, budget)}` instead of `cost`."""
    reward: Scorer | None = Field(default=None, exclude=True)
    """Reward model R(x, y); without one, candidates rank by mean token log-likelihood."""
    critic: Any = Field(default=None, exclude=True)
    """Latent critic (a `LatentCritic` or its directory) for InferenceGuard's critic mode."""
    device: str | None = None
    """Device to load `model` on (default: CUDA when available, else CPU)."""
    dtype: str | torch.dtype | None = None
    """Torch dtype (or its name) to load `model` in (default: bfloat16 on CUDA, else float32)."""
    device_map: str | dict[str, Any] | None = None
    """Transformers device map ("auto", or module name -> device) to shard `model`."""
    model_kwargs: dict[str, Any] | None = None
    """More options of the model's `from_pretrained` (quantization_config, revision, ...)."""
    tokenizer_kwargs: dict[str, Any] | None = None
    """More options of the tokenizer's `from_pretrained` (gguf_file and revision come too)."""
    trust_remote_code: bool = False
    """Run code shipped with the `model` checkpoint; leave off unless you trust its author."""
    allow_special_tokens_in_content: bool = False
    """Let special-token text in prompts (`</s>`, `<|im_start|>`) become control tokens of
    `model`; off, users cannot forge turns. Only for prompts you render yourself."""

    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens in a response: LangChain's name for `max_new_tokens`."""
    timeout: float | None = Field(default=None, ge=0)
    """Standard LangChain parameter, accepted; local decoding has no request to time out."""
    max_retries: int | None = Field(default=None, ge=0)
    """Standard LangChain parameter, accepted; local decoding has no failure to retry."""
    streaming: bool = False
    """Whether `invoke` decodes through the stream (firing `on_llm_new_token`)."""

    session_budgets: dict[str, float] | None = None
    """Total safety budget per constraint name of each session (conversation, agent run):
    a call whose `RunnableConfig` names a session (`configurable[session_key]`, as
    `RunnableWithMessageHistory` does) is held to and charged to that session's remaining
    budget (see `inference_safeguard.session`). None: no sessions."""
    session_key: str = "session_id"
    """The `configurable` key (copied into the run's metadata) that names the session."""
    session_on_spent: Literal["refuse", "raise"] = "refuse"
    """A spent session's next call: return the refusal text without generating, or raise
    `SessionBudgetSpentError`."""

    budget: float | None = None
    """Safety budget d: a response is safe iff its cost C(x, y) <= budget."""
    budgets: dict[str, float] | None = None
    """Budgets of named constraints (`costs=`), by name, overriding the decoder's own."""
    num_candidates: int | None = None
    """N: candidate blocks sampled and scored per search step (a multiple of beam_width)."""
    beam_width: int | None = None
    """K: beams kept after each search step."""
    block_size: int | None = None
    """Tokens per candidate block (scored at block ends)."""
    max_new_tokens: int | None = None
    """Most tokens in a response (same as `max_tokens`)."""
    resample_rounds: int | None = None
    """M: resamples of a block whose candidates are all over budget."""
    unsafe_penalty: float | None = None
    """n: an over-budget candidate scores -n + z, below any safe one."""
    unsafe_logit_penalty: float | None = None
    """Subtracted, when resampling, from the logits of tokens seen in unsafe candidates."""
    safety_discount: float | None = None
    """gamma_c of the safety state update, in (0, 1]."""
    temperature: float | None = None
    """Sampling temperature; 0 decodes greedily (None: the model's generation_config's)."""
    top_p: float | None = None
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    top_k: int | None = None
    """Sample from the k likeliest tokens; 0 disables it."""
    min_p: float | None = None
    """Drop tokens less likely than min_p times the likeliest one; 0 disables it."""
    repetition_penalty: float | None = None
    """Penalty of tokens already in the prompt or response (as transformers'); 1: off."""
    scorer: Literal["auto", "models", "critic"] | None = None
    """How candidates are scored: the cost and reward models, or the latent critic."""
    cost_probe: bool | None = None
    """Critic mode: steer the search by the critic's cost probe (final check: cost model)."""
    critic_risk_weight: float | None = None
    """Critic mode: lambda of a candidate's value r_hat - lambda * sd_R * (1 - p_safe)."""
    reward_calibration: RewardCalibration | None = None
    """InfAlign's calibrated rewards: a candidate's reward quantile among its prompt's."""
    calibration_exponent: float | None = None
    """t of reward_calibration='exponential', in (0, 100]."""
    on_unsafe: Literal["refuse", "return", "raise"] | None = None
    """Over-budget final response: refuse (default), return flagged, or raise."""
    refusal_text: str | None = None
    """Text returned instead of an over-budget response when refusing."""
    stop: list[str] | None = None
    """Stop strings: a response ends before the first one it contains (one string: one stop)."""
    stream_commit: Literal["agreement", "block"] | None = None
    """What a stream commits each step: the beams' agreed prefix, or the best block."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Variables of the chat template, e.g. {"enable_thinking": False}."""
    seed: int | None = None
    """Seed of each prompt's sampler; None draws a fresh one per call."""

    _loaded_guard: Decoder | None = PrivateAttr(default=None)
    _engine: GuardEngine | None = PrivateAttr(default=None)
    _sessions: SafetySessions | None = PrivateAttr(default=None)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string_is_one_sequence(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator(*CONFIG_FIELDS, "max_tokens", mode="before")
    @classmethod
    def _config_numbers_are_not_bools(cls, value: Any, info: ValidationInfo) -> Any:
        # Checked before this field's own coercion would turn True into 1.
        if info.field_name is None:  # pydantic names the field for every field validator
            raise TypeError("_config_numbers_are_not_bools runs as a field validator only")
        name = "max_new_tokens" if info.field_name == "max_tokens" else info.field_name
        return reject_bool_number(name, value)

    @model_validator(mode="after")
    def _check_decoder_and_config(self) -> Self:
        if self.guard is None:
            if not self.model:
                raise ValueError(
                    f"{type(self).__name__} needs a decoder: pass guard=InferenceGuard(...), "
                    "or model='<hub name or local path>' with cost=..."
                )
            if self.cost is None and self.costs is None:
                raise MissingCostModelError.of(f"{type(self).__name__}(model={self.model!r})")
        else:
            if isinstance(self.guard, GuardEngine) and not self.use_engine:
                raise ValueError(
                    "use_engine=False calls the decoder directly, but guard= is a GuardEngine; "
                    "pass its decoder (engine.guard) instead"
                )
            given = [name for name in _LOADING_FIELDS if getattr(self, name) is not None]
            given += [
                name
                for name in ("trust_remote_code", "allow_special_tokens_in_content")
                if getattr(self, name)
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)} configure a model loaded by name, but guard= is "
                    "already built; give them to the InferenceGuard instead"
                )
        if (
            self.max_tokens is not None
            and self.max_new_tokens is not None
            and self.max_tokens != self.max_new_tokens
        ):
            raise ValueError(
                f"max_tokens ({self.max_tokens}) and max_new_tokens ({self.max_new_tokens}) "
                "are two names for one setting; pass one of them"
            )
        self.call_config(self.config_overrides())  # invalid settings fail here, not mid-chain
        return self

    @classmethod
    def from_model_id(
        cls,
        model_id: str,
        *,
        cost: Scorer | None = None,
        costs: Mapping[str, tuple[Scorer, float]] | None = None,
        reward: Scorer | None = None,
        critic: Any = None,
        device: str | None = None,
        dtype: str | None = None,
        device_map: str | dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Self:
        """Load `model_id` (hub name or local path) now and wrap it.

        Args:
            model_id: the base model.
            cost: cost model C(x, y), the one constraint; this or `costs` is required.
            costs: several named constraints `{name: (cost scorer, budget)}` instead.
            reward: reward model R(x, y), or None.
            critic: latent critic (or its directory) for critic mode, or None.
            device, dtype, device_map, trust_remote_code, model_kwargs, tokenizer_kwargs:
                how to load the model (see `InferenceGuard.from_pretrained`).
            **kwargs: other fields: `GuardConfig` fields, `max_tokens`, `stop`, ...
        """
        model = cls(
            model=model_id,
            cost=cost,
            costs=None if costs is None else dict(costs),
            reward=reward,
            critic=critic,
            device=device,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            model_kwargs=model_kwargs,
            tokenizer_kwargs=tokenizer_kwargs,
            **kwargs,
        )
        model.load_guard()
        return model

    # ---------------------------------------------------------------- the decoder
    def load_guard(self) -> Decoder:
        """The decoder calls run on; a model given by name is loaded now if it is not yet
        (its weights once per process for equal loading options). With an engine given
        as `guard`, the decoder it serves."""
        if isinstance(self.guard, GuardEngine):
            return self.guard.guard
        if self.guard is not None:
            return self.guard
        if self._loaded_guard is None:
            with _BUILD_LOCK:  # the calls of a batch may arrive together from several threads
                if self._loaded_guard is None:
                    self._loaded_guard = self._build_guard()
        return self._loaded_guard

    @property
    def engine(self) -> GuardEngine | None:
        """The engine that calls decode through, or None when they call the decoder
        directly (see `use_engine`); a model given by name is loaded here."""
        if isinstance(self.guard, GuardEngine):
            return self.guard
        guard = self.load_guard()
        if not self.use_engine:
            return None
        engine = self._engine
        if engine is None or engine.guard is not guard:
            engine = self._engine = shared_engine(guard)
        return engine

    def _runner(self) -> Decoder | GuardEngine:
        """What a call that is not a stream decodes with: the engine, else the decoder."""
        return self.engine or self.load_guard()

    def _build_guard(self) -> Decoder:
        assert self.model is not None  # checked at construction
        lm = load_model(
            ModelSource.of(
                self.model,
                device=self.device,
                dtype=self.dtype,
                device_map=self.device_map,
                trust_remote_code=self.trust_remote_code,
                model_kwargs=self.model_kwargs,
                tokenizer_kwargs=self.tokenizer_kwargs,
            )
        )
        return InferenceGuard(
            lm.model,
            lm.tokenizer,
            cost=self.cost,
            costs=self.costs,
            reward=self.reward,
            critic=self.critic,
            allow_special_tokens_in_content=self.allow_special_tokens_in_content,
        )

    @property
    def model_name(self) -> str:
        """The base model's name: `model`, else the name the decoder's model was loaded by."""
        if self.model:
            return self.model
        return self.load_guard().lm.name  # `guard` is set, checked at construction

    # ----------------------------------------------------------------- sessions
    @property
    def sessions(self) -> SafetySessions | None:
        """The sessions of `session_budgets` by id (None without them); save them with
        `to_dict`, restore one with `put(SafetySession.from_dict(...))`."""
        if self.session_budgets is None:
            return None
        if self._sessions is None:
            with _BUILD_LOCK:
                if self._sessions is None:
                    self._sessions = SafetySessions(
                        self.session_budgets, on_spent=self.session_on_spent
                    )
        return self._sessions

    def with_session(self, config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` of a call, with `session=` the session its `RunnableConfig` names
        (`configurable[session_key]`) unless the call passed one itself."""
        sessions = self.sessions
        if sessions is None or kwargs.get("session") is not None:
            return kwargs
        session_id = ensure_config(config).get("configurable", {}).get(self.session_key)
        if session_id is None:
            return kwargs
        return {**kwargs, "session": sessions.get(str(session_id))}

    @staticmethod
    def session_of(kwargs: dict[str, Any]) -> SafetySession | None:
        """The session a call is charged to (`session=`), taken out of `kwargs`, or None."""
        given = kwargs.pop("session", None)
        if given is not None and not isinstance(given, SafetySession):
            raise TypeError(
                f"session must be an inference_safeguard.SafetySession, got {type(given).__name__}"
            )
        return given

    # ----------------------------------------------------------------- settings
    def config_overrides(
        self, stop: str | list[str] | None = None, kwargs: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """`GuardConfig` overrides of one call: this model's set fields, then the call's
        `stop` and keywords (GuardConfig fields, `max_tokens`, the `call_keywords` that are
        not None, and `model`, which may only name this model). A `stop` given as one
        string is one stop sequence.

        Raises:
            TypeError: a keyword that is none of those.
            ValueError: a `model` keyword that names another model.
        """
        overrides = {
            name: getattr(self, name) for name in CONFIG_FIELDS if getattr(self, name) is not None
        }
        if self.max_tokens is not None:
            overrides["max_new_tokens"] = self.max_tokens
        for name, value in (kwargs or {}).items():
            if name in CONFIG_FIELDS:
                overrides[name] = value
            elif name in self.call_keywords:
                if value is not None:
                    overrides[name] = value
            elif name == "max_tokens":
                if value is not None:
                    overrides["max_new_tokens"] = value
            elif name == "model":
                self._check_model_keyword(value)
            elif name not in _LANGCHAIN_KWARGS:
                raise TypeError(
                    f"{type(self).__name__} got an unexpected keyword {name!r}; a call takes "
                    f"max_tokens, stop, {''.join(k + ', ' for k in self.call_keywords)}and "
                    f"the GuardConfig fields ({', '.join(CONFIG_FIELDS)})"
                )
        if stop is not None:
            overrides["stop"] = stop_sequences(stop)
        return overrides

    def call_config(self, overrides: Mapping[str, Any]) -> GuardConfig:
        """The validated config a call with `overrides` runs under (before a model given
        by name is loaded: `GuardConfig()`'s, its sampling fields still unresolved)."""
        if self.guard is None and self._loaded_guard is None:
            return GuardConfig().with_overrides(**overrides)
        return self.load_guard().call_config(overrides)

    def _check_model_keyword(self, requested: str | None) -> None:
        """A per-call `model=` may only name this model."""
        if requested is not None and requested != self.model_name:
            raise ValueError(
                f"{type(self).__name__} generates with {self.model_name!r} and cannot switch "
                f"to model={requested!r} per call; build another {type(self).__name__} for it"
            )

    def safeguard_params(self) -> dict[str, Any]:
        """Identifying parameters: the model, the decoder and its scorers, every setting in
        force, and `fingerprint`, a digest of all that decides the decoder's answers (the
        weights of the model, scorers and critic, the keywords, the config; see
        `inference_safeguard.identity`). LangChain keys its LLM cache by these, so one
        setup never gets another's cached answer. A model given by name is loaded here.
        """
        guard = self.load_guard()
        config = self.call_config(self.config_overrides())
        return {
            "model_name": self.model_name,
            "decoder": type(guard).__name__,
            "cost": type(guard.cost).__name__
            if guard.cost is not None
            else {c.name: type(c.scorer).__name__ for c in guard.constraints.items},
            "reward": type(guard.reward).__name__ if guard.reward is not None else None,
            **config.model_dump(mode="json"),
            "fingerprint": digest(guard.identity(config)),
        }

    async def _aload_guard(self) -> None:
        """Load a model given by name in a worker thread, off the event loop."""
        if self.guard is None and self._loaded_guard is None:
            await asyncio.to_thread(self.load_guard)

    # ----------------------------------------------------------- LangChain hooks
    async def astream(
        self, input: Any, config: Any = None, *, stop: list[str] | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """LangChain's `astream`, with a model given by name loaded off the event loop
        first (LangChain reads the identifying parameters before streaming). Closing
        this stream closes LangChain's at once, which stops the search."""
        await self._aload_guard()
        # The LangChain model class that this is mixed into comes next in the MRO.
        chunks = super().astream(input, config, stop=stop, **kwargs)  # type: ignore[misc]
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    def _convert_input(self, model_input: Any) -> PromptValue:
        """LangChain's input conversion, with message dicts checked first: a malformed
        assistant tool call or a message LangChain cannot read raises `InvalidPromptError`
        (saying what is wrong) instead of an error from inside LangChain."""
        if isinstance(model_input, Sequence) and not isinstance(model_input, str):
            check_message_dicts(model_input)
        try:
            # The LangChain model class that this is mixed into comes next in the MRO.
            return super()._convert_input(model_input)  # type: ignore[misc]
        except _UNREADABLE_INPUT as error:
            raise InvalidPromptError(
                f"the input messages could not be read ({type(error).__name__}: {error}); pass "
                "LangChain messages, (role, content) pairs or {'role', 'content'} dicts"
            ) from error

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.safeguard_params()

    def _get_ls_params(self, stop: str | list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        # The LangChain model class that this is mixed into comes next in the MRO.
        params: LangSmithParams = super()._get_ls_params(stop=stop, **kwargs)  # type: ignore[misc]
        params["ls_provider"] = "safeguard"
        if stop is not None:
            params["ls_stop"] = stop_sequences(stop)
        if "ls_max_tokens" not in params and self.max_new_tokens is not None:
            params["ls_max_tokens"] = self.max_new_tokens
        return params


def check_message_dicts(messages: Sequence[Any]) -> None:
    """Check the assistant tool calls of messages given as OpenAI-style dicts.

    Raises:
        InvalidPromptError: `tool_calls` is not a list, or a call is not a dict, has no
            function name, or has arguments that are not a JSON object.
    """
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("tool_calls") is None:
            continue
        calls = message["tool_calls"]
        if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
            raise InvalidPromptError(
                f"message {index}: tool_calls must be a list of tool call dicts, got "
                f"{type(calls).__name__}"
            )
        for number, call in enumerate(calls):
            read_tool_call(call, f"message {index}, tool call {number}")


def stop_sequences(stop: str | Sequence[str]) -> list[str]:
    """Stop sequences as a list: a single string is one sequence, not one per character."""
    return [stop] if isinstance(stop, str) else list(stop)


def usage_of(result: GuardResult) -> UsageMetadata:
    """LangChain usage metadata of a result (tokens of the returned text)."""
    prompt, completion = result.stats.prompt_tokens, result.stats.completion_tokens
    return UsageMetadata(
        input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion
    )


def reasoning_kwargs_of(result: GuardResult) -> dict[str, Any]:
    """`additional_kwargs` of a message for a result's reasoning: `reasoning_content`
    (the key langchain-core reads into a "reasoning" content block of
    `message.content_blocks`), or nothing when the response has no reasoning."""
    return {} if result.reasoning is None else {"reasoning_content": result.reasoning}


def response_metadata_of(result: GuardResult, model_name: str) -> dict[str, Any]:
    """`model_name`, `finish_reason`, the `safety` record (DESIGN.md section 3), and the
    search's `stats`."""
    return {
        "model_name": model_name,
        "finish_reason": result.finish_reason,
        "safety": result.safety_record(),
        "stats": dataclasses.asdict(result.stats),
    }
