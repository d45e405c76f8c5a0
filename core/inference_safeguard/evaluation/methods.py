"""The decoders an evaluation compares, built by name from one model, cost, reward and config.

Every method gets the same `GuardConfig`, so N (`num_candidates`), K (`beam_width`),
block size and `max_new_tokens` are equal across the table; settings that only some
methods have are `MethodOptions`. Adding a method is one entry in `METHODS`.
The "-calibrated" Lagrangian rows score quantile-calibrated rewards
(`GuardConfig.reward_calibration`, "quantile" unless the shared config names one), so
their multiplier weighs cost against reward quantiles rather than raw reward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard.baselines import ARGS, BestOfN, BlockBeamSearch, SamplingDecoder
from inference_safeguard.config import GuardConfig
from inference_safeguard.constraints import CostsInput
from inference_safeguard.critic import LatentCritic
from inference_safeguard.decoder import Decoder
from inference_safeguard.guard import InferenceGuard
from inference_safeguard.scorers import Scorer
from inference_safeguard.search import Scoring


@dataclass(frozen=True)
class MethodOptions:
    """Settings of individual methods that `GuardConfig` does not hold.

    Attributes:
        lagrange_multiplier: lambda of the Lagrangian scorings, `R - lambda * C`.
        args_num_tokens: candidate tokens per step of ARGS (its k).
        args_reward_weight: ARGS's weight w on the reward.
        args_cost_weight: weight on the cost of "args-cost" (plain "args" uses 0). Large
            by default: a greedy decoder is usually confident in the token that
            completes an unsafe phrase, and a small weight never outvotes it.
        critic: the latent critic of "inferenceguard-critic".
    """

    lagrange_multiplier: float = 1.0
    args_num_tokens: int = 10
    args_reward_weight: float = 1.0
    args_cost_weight: float = 10.0
    critic: LatentCritic | None = None

    def __post_init__(self) -> None:
        if self.args_num_tokens < 1:
            raise ValueError(f"args_num_tokens must be >= 1, got {self.args_num_tokens}")
        weights = {
            "lagrange_multiplier": self.lagrange_multiplier,
            "args_reward_weight": self.args_reward_weight,
            "args_cost_weight": self.args_cost_weight,
        }
        for name, value in weights.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


class DecoderParts(TypedDict):
    """What every decoder is built from, as keyword arguments."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cost: Scorer | None
    costs: CostsInput | None
    reward: Scorer | None
    config: GuardConfig


Builder = Callable[[DecoderParts, MethodOptions], Decoder]


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        label: its name in tables and plots.
        build: makes its decoder from the shared parts and the options.
        needs_reward: whether it cannot run without a reward model.
        needs_critic: whether it cannot run without a latent critic.
    """

    label: str
    build: Builder
    needs_reward: bool = False
    needs_critic: bool = False


def _best_of_n(scoring: Scoring, *, calibrated: bool = False) -> Builder:
    return lambda parts, options: BestOfN(
        **(_calibrated(parts) if calibrated else parts),
        scoring=scoring,
        lagrange_multiplier=options.lagrange_multiplier,
    )


def _beam(scoring: Scoring, *, calibrated: bool = False) -> Builder:
    return lambda parts, options: BlockBeamSearch(
        **(_calibrated(parts) if calibrated else parts),
        scoring=scoring,
        lagrange_multiplier=options.lagrange_multiplier,
    )


def _calibrated(parts: DecoderParts) -> DecoderParts:
    """`parts` whose config calibrates rewards: its own `reward_calibration`, or
    "quantile" where that is "none"."""
    config = parts["config"]
    if config.reward_calibration != "none":
        return parts
    return DecoderParts(
        **(parts | {"config": config.with_overrides(reward_calibration="quantile")})
    )


def _args(*, with_cost: bool) -> Builder:
    return lambda parts, options: ARGS(
        **parts,
        num_tokens=options.args_num_tokens,
        reward_weight=options.args_reward_weight,
        cost_weight=options.args_cost_weight if with_cost else 0.0,
    )


METHODS: dict[str, Method] = {
    "base": Method("Base (sampling)", lambda parts, _: SamplingDecoder(**parts)),
    "bon-reward": Method("BoN (reward)", _best_of_n("reward")),
    "bon-lagrangian": Method("BoN (Lagrangian)", _best_of_n("lagrangian")),
    "bon-lagrangian-calibrated": Method(
        "BoN (Lagrangian, calibrated)", _best_of_n("lagrangian", calibrated=True)
    ),
    "bon-augmented": Method("BoN (augmented)", _best_of_n("augmented")),
    "beam-reward": Method("Beam (reward)", _beam("reward")),
    "beam-lagrangian": Method("Beam (Lagrangian)", _beam("lagrangian")),
    "beam-lagrangian-calibrated": Method(
        "Beam (Lagrangian, calibrated)", _beam("lagrangian", calibrated=True)
    ),
    "beam-augmented": Method("Beam (augmented)", _beam("augmented")),
    "args": Method("ARGS", _args(with_cost=False), needs_reward=True),
    "args-cost": Method("ARGS (cost)", _args(with_cost=True), needs_reward=True),
    "inferenceguard": Method("InferenceGuard", lambda parts, _: InferenceGuard(**parts)),
    "inferenceguard-critic": Method(
        "InferenceGuard + critic",
        lambda parts, options: InferenceGuard(
            **(parts | {"config": parts["config"].with_overrides(scorer="critic")}),
            critic=options.critic,
        ),
        needs_critic=True,
    ),
}
"""Every method `safeguard eval` knows, by the name it is selected with, in table order."""


def runnable_methods(*, has_reward: bool, has_critic: bool = False) -> list[str]:
    """Names of the registered methods that can run with the models at hand."""
    return [
        name
        for name, method in METHODS.items()
        if (has_reward or not method.needs_reward) and (has_critic or not method.needs_critic)
    ]


def get_method(name: str, *, has_reward: bool, has_critic: bool = False) -> Method:
    """The registered method `name`, checked to be runnable.

    Raises:
        ValueError: an unknown name, or a method that needs a missing reward model or critic.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    method = METHODS[name]
    for needed, missing, what in (
        (method.needs_reward, not has_reward, "a reward model"),
        (method.needs_critic, not has_critic, "a latent critic"),
    ):
        if needed and missing:
            runnable = runnable_methods(has_reward=has_reward, has_critic=has_critic)
            raise ValueError(
                f"method {name!r} needs {what}; give one, or leave {name!r} out "
                f"(runnable now: {', '.join(runnable)})"
            )
    return method


def build_decoder(
    name: str,
    *,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cost: Scorer | None,
    reward: Scorer | None = None,
    config: GuardConfig,
    options: MethodOptions | None = None,
    costs: CostsInput | None = None,
) -> Decoder:
    """Build the decoder of method `name` (see `METHODS`), with the one `cost` or the
    named constraints `costs`.

    Raises:
        ValueError: see `get_method`.
    """
    options = options or MethodOptions()
    method = get_method(name, has_reward=reward is not None, has_critic=options.critic is not None)
    parts = DecoderParts(
        model=model, tokenizer=tokenizer, cost=cost, costs=costs, reward=reward, config=config
    )
    return method.build(parts, options)
