"""`GuardConfig`: every knob of the safe-decoding search, validated at construction.

The defaults are sized for interactive use on one GPU. The paper's settings
(arXiv 2502.01208, appendix) are `block_size=32, num_candidates=128, beam_width=32,
max_new_tokens=128, resample_rounds=2, budget=10`; pass them explicitly to reproduce it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from inference_safeguard.calibration import RewardCalibration
from inference_safeguard.output_format import check_response_format

MIN_TEMPERATURE = 1e-3
"""Smallest positive sampling temperature; any lower is greedy in effect (use 0)."""

SAMPLING_DEFAULTS: dict[str, float | int] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}
"""The package's own value of each sampling field, for a model whose generation_config
does not set it: plain sampling from the model's distribution."""


_RENDERING_ARGUMENTS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "sanitize_control_tokens",
    }
)
"""Arguments of `apply_chat_template` that are not template variables."""


TOOL_CALL_FIELDS = ("tool_choice", "parallel_tool_calls")
"""`GuardConfig` fields that only mean something with tools, which a call passes (so the
command line, which takes no tools, has no flag for them)."""

CALL_SHAPE_FIELDS = ("response_format", *TOOL_CALL_FIELDS)
"""`GuardConfig` fields the frameworks set per call through their own tool-calling and
structured-output APIs (`bind_tools`, `with_structured_output`, `structured_predict`),
rather than as settings of a model object."""


class GuardConfig(BaseModel):
    """Configuration of InferenceGuard and of the baselines that share its interface.

    Frozen: derive a changed copy with `config.with_overrides(field=value, ...)`,
    which validates like the constructor does.

    Sampling fields (`temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`)
    left at None take the value the model's author shipped in its generation_config,
    else the package's own (`SAMPLING_DEFAULTS`: plain sampling); a decoder resolves
    them once when it is built (`with_sampling_defaults`) and again for a call that sets
    one back to None. A value set here or per call always wins. The generation_config's
    `do_sample` is not read: the search samples its candidates whatever it says
    (`temperature=0` decodes greedily).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    budget: float = Field(
        0.0,
        strict=True,
        allow_inf_nan=False,
        description="Safety budget d: a response is safe iff its cost C(x, y) <= budget. "
        "Any finite number; a negative budget needs a cost model that can score below zero.",
    )
    budgets: dict[str, float] | None = Field(
        None,
        description="Budgets of named constraints (`InferenceGuard(costs={name: (scorer, "
        "budget)})`), overriding the guard's own; every name must be one of the guard's "
        "constraints (the one cost of `cost=` is named 'cost'). Finite numbers. None: each "
        "constraint's own budget. With one constraint its budget is `budget`.",
    )
    num_candidates: int = Field(
        16,
        strict=True,
        ge=1,
        le=4096,
        description="N: candidate blocks sampled and scored per search step, per prompt.",
    )
    beam_width: int = Field(
        4,
        strict=True,
        ge=1,
        le=4096,
        description="K: beams kept after each step; num_candidates must be a multiple of it.",
    )
    block_size: int = Field(
        8,
        strict=True,
        ge=1,
        le=4096,
        description="Tokens per candidate block (scored at block ends).",
    )
    max_new_tokens: int = Field(
        64, strict=True, ge=1, le=65536, description="Most tokens in a response."
    )
    resample_rounds: int = Field(
        2,
        strict=True,
        ge=0,
        le=64,
        description="M: times a block is resampled with penalised logits when every "
        "candidate of a prompt is over budget.",
    )
    unsafe_penalty: float = Field(
        1e4,
        strict=True,
        allow_inf_nan=False,
        ge=0,
        le=1e15,
        description="n: an over-budget candidate scores -n + z (z < 0), below any safe one; "
        "in [0, 1e15].",
    )
    unsafe_logit_penalty: float = Field(
        5.0,
        strict=True,
        allow_inf_nan=False,
        ge=0,
        le=1e6,
        description="Subtracted, when resampling, from the logits of tokens seen in unsafe "
        "candidates; in [0, 1e6] (1e4 already bans them).",
    )
    safety_discount: float = Field(
        1.0,
        strict=True,
        allow_inf_nan=False,
        gt=0,
        le=1,
        description="gamma_c of the safety state z_{t+1} = (z_t - c_t) / gamma_c, in (0, 1].",
    )
    temperature: float | None = Field(
        None,
        strict=True,
        allow_inf_nan=False,
        ge=0,
        le=100,
        description=f"Sampling temperature: 0 decodes greedily, else in [{MIN_TEMPERATURE}, 100]. "
        "None: the model's generation_config value, else 1.",
    )
    top_p: float | None = Field(
        None,
        strict=True,
        allow_inf_nan=False,
        gt=0,
        le=1,
        description="Nucleus sampling mass in (0, 1]; 1 disables it. The likeliest token is "
        "always kept, so a tiny top_p decodes greedily. None: the model's generation_config "
        "value, else 1.",
    )
    top_k: int | None = Field(
        None,
        strict=True,
        ge=0,
        description="Sample from the k likeliest tokens; 0 disables it. None: the model's "
        "generation_config value, else 0.",
    )
    min_p: float | None = Field(
        None,
        strict=True,
        allow_inf_nan=False,
        ge=0,
        le=1,
        description="Drop tokens less likely than min_p times the likeliest one, in [0, 1]; "
        "0 disables it. None: the model's generation_config value, else 0.",
    )
    repetition_penalty: float | None = Field(
        None,
        strict=True,
        allow_inf_nan=False,
        gt=0,
        le=100,
        description="Divides the positive logits (multiplies the negative ones) of tokens "
        "already in the prompt or the response, as transformers does; > 0, 1 disables it. "
        "None: the model's generation_config value, else 1.",
    )
    scorer: Literal["auto", "models", "critic"] = Field(
        "auto",
        description="How candidates are scored: 'models' runs the cost and reward models on "
        "the candidate text; 'critic' asks the latent critic (the guard needs one); 'auto' "
        "uses the critic when the guard has one, else the models.",
    )
    cost_probe: bool = Field(
        True,
        strict=True,
        description="Critic mode: take the search's costs from the critic's cost probe (when "
        "it has one) instead of the cost model; the final check always uses the cost model.",
    )
    critic_risk_weight: float = Field(
        3.0,
        strict=True,
        allow_inf_nan=False,
        ge=0,
        description="Critic mode: lambda of a candidate's value r_hat - lambda * sd_R * "
        "(1 - p_safe), sd_R being the spread of the critic's training rewards; a large one "
        "ranks the likeliest-safe candidates first, whatever their reward.",
    )
    reward_calibration: RewardCalibration = Field(
        "none",
        description="InfAlign's calibrated rewards: 'quantile' scores a candidate by its "
        "reward's quantile among the candidates of its prompt at the same step (the base "
        "model's own samples), so the Lagrangian scorings and the critic's value do not "
        "depend on the reward model's scale; 'exponential' (InfAlign's Best-of-N transform) "
        "by (exp(t q) - 1) / (exp(t) - 1) of that quantile q; 'none' uses raw rewards.",
    )
    calibration_exponent: float = Field(
        5.0,
        strict=True,
        allow_inf_nan=False,
        gt=0,
        le=100,
        description="t of reward_calibration='exponential', in (0, 100]: larger values "
        "weigh the top quantiles more.",
    )
    on_unsafe: Literal["refuse", "return", "raise"] = Field(
        "refuse",
        description="When the final response is over budget: return refusal_text (refuse), "
        "return it flagged safe=False (return), or raise UnsafeGenerationError (raise).",
    )
    refusal_text: str = Field(
        "I'm sorry, but I can't help with that.",
        description="Text returned instead of an over-budget response when on_unsafe='refuse'.",
    )
    stop: tuple[str, ...] = Field(
        (),
        description="Stop strings: a response ends before the first one it contains, at "
        "the token boundary before it (a token the stop string starts inside goes too).",
    )
    stream_commit: Literal["agreement", "block"] = Field(
        "agreement",
        description="Streaming: 'agreement' emits the prefix all beams share (same text as "
        "generate); 'block' commits the best block each step (lower latency, weaker search).",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Variables of the chat template for message prompts, e.g. "
        "{'enable_thinking': False}; plain-text prompts do not use the template.",
    )
    response_format: dict[str, Any] | None = Field(
        None,
        description="Shape every response must have, enforced by grammar while sampling: "
        "{'type': 'json_object'}, {'type': 'json_schema', 'json_schema': {'name': ..., "
        "'schema': {...}, 'strict': bool}}, {'type': 'regex', 'pattern': ...}, {'type': "
        "'grammar', 'lark': ...}, or None / {'type': 'text'} for free text.",
    )
    tool_choice: str | bool | dict[str, Any] | None = Field(
        None,
        description="With tools: None/'auto' (the model may call one; a call it starts is "
        "held to the tool's schema), 'none' (no tools offered), 'required'/'any'/True (a "
        "call is forced by grammar), or a tool name / {'type': 'function', 'function': "
        "{'name': ...}} (a call of that tool is forced).",
    )
    parallel_tool_calls: bool = Field(
        True, strict=True, description="Allow several tool calls in one response."
    )
    seed: int | None = Field(
        None,
        strict=True,
        ge=0,
        description="Seed of the samplers; each prompt's seed derives from it and the prompt, "
        "so a prompt decodes the same alone or in a batch. None draws fresh seeds per call.",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_bools(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is None:  # pydantic names the field for every field validator
            raise TypeError("_numbers_are_not_bools runs as a field validator only")
        return reject_bool_number(info.field_name, value)

    @field_validator("temperature")
    @classmethod
    def _temperature_is_greedy_or_sampleable(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature {value!r} is too small to sample with (logits / temperature "
                f"overflow); use temperature=0 for greedy decoding, or at least "
                f"{MIN_TEMPERATURE}"
            )
        return value

    @field_validator("budgets", mode="before")
    @classmethod
    def _budgets_are_named_finite_numbers(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError(
                f"budgets must map constraint names to numbers, e.g. {{'pii': 0.5}}; got "
                f"{type(value).__name__}"
            )
        for name, budget in value.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError("budgets names must be non-empty constraint names")
            if (
                isinstance(budget, bool)
                or not isinstance(budget, (int, float))
                or not math.isfinite(budget)
            ):
                raise ValueError(
                    f"budgets[{name!r}] must be a finite number, got {budget!r}; e.g. "
                    f"budgets={{{name!r}: 0.5}}"
                )
        return dict(value)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        return tuple(value)

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty; remove '' from stop")
        return value

    @field_validator("chat_template_kwargs", mode="before")
    @classmethod
    def _template_kwargs_as_dict(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs_leave_rendering_alone(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(value) & _RENDERING_ARGUMENTS)
        if taken:
            raise ValueError(
                f"chat_template_kwargs must not set {', '.join(taken)}: the guard renders "
                "the prompt itself (with a generation prompt, tools passed by tools=); give "
                "only the template's own variables, e.g. {'enable_thinking': False}"
            )
        return value

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format_shape(cls, value: Any) -> Any:
        return check_response_format(value)

    @model_validator(mode="after")
    def _candidates_fill_beams(self) -> GuardConfig:
        if self.num_candidates % self.beam_width:
            nearest = self.beam_width * max(1, round(self.num_candidates / self.beam_width))
            raise ValueError(
                f"num_candidates ({self.num_candidates}) must be a multiple of beam_width "
                f"({self.beam_width}) so that every beam gets the same number of children; "
                f"try num_candidates={nearest}"
            )
        return self

    def __hash__(self) -> int:
        # Frozen pydantic models hash their field values; chat_template_kwargs is a dict.
        return hash(json.dumps(self.model_dump(), sort_keys=True, default=repr))

    @property
    def children_per_beam(self) -> int:
        """Candidate blocks sampled from each live beam: `num_candidates // beam_width`."""
        return self.num_candidates // self.beam_width

    def with_sampling_defaults(self, model_defaults: Mapping[str, Any]) -> GuardConfig:
        """A copy whose unset (None) sampling fields hold `model_defaults`' value (the
        model's generation_config), else `SAMPLING_DEFAULTS`'; set fields are kept."""
        unset = {
            name: model_defaults.get(name, default)
            for name, default in SAMPLING_DEFAULTS.items()
            if getattr(self, name) is None
        }
        return self.with_overrides(**unset)

    def with_overrides(self, **overrides: Any) -> GuardConfig:
        """Return a validated copy with `overrides` applied (unknown names are rejected)."""
        if not overrides:
            return self
        return type(self).model_validate({**self.model_dump(), **overrides})


def reject_bool_number(name: str, value: Any) -> Any:
    """`value` as given, unless it is a bool given for the number field `name` of `GuardConfig`.

    A bool is an int to Python, so pydantic would read `budget=True` as a budget of 1;
    it is always a mistake. Frameworks that carry `GuardConfig` fields as their own
    settings call this before their own coercion.

    Raises:
        ValueError: `value` is a bool and `name` is a field that takes a number.
    """
    field = GuardConfig.model_fields.get(name)
    if (
        isinstance(value, bool)
        and field is not None
        and field.annotation in (int, float, int | None, float | None)
    ):
        example = field.default if field.default is not None else 0
        raise ValueError(
            f"{name} must be a number, got the bool {value}; pass a number such as "
            f"{name}={example!r}"
        )
    return value
