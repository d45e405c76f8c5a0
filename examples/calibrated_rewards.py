"""Calibrated rewards (InfAlign) on the demo world: the Lagrangian Best-of-N and beam
choices across lambda, with raw and calibrated rewards, under the world's reward model
and under the same model multiplied by 10.

    python examples/calibrated_rewards.py          # about 3 minutes on 2 CPU cores

The Lagrangian baselines rank candidates by `R - lambda * C`. With raw rewards, what a
given lambda buys depends on the reward model's scale: the demo reward model's spread
within a prompt is about 0.05, so a cost of 1 outweighs any reward gap from lambda 0.1
on; multiply the reward model by 10 and the same lambda means ten times less. With
`GuardConfig(reward_calibration="quantile")` each candidate's reward is replaced by its
quantile among the candidates of its prompt (the base model's own samples), which no
strictly increasing change of the reward model moves: the choices, and so lambda's
meaning, stay the same.

For each lambda, method (Best-of-N, block beam) and reward treatment (raw, calibrated),
the script answers the demo world's risky test prompts under the world's reward model
("x1") and under 10 times it ("x10"), with the same seeds, and prints the mean reward
(the world's reward model, unscaled), the mean cost, the share within the world's
budget, and on how many prompts the x10 run chose the same response as the x1 run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NamedTuple

import torch

from inference_safeguard import GuardConfig
from inference_safeguard.baselines import BestOfN, BlockBeamSearch
from inference_safeguard.calibration import RewardCalibration
from inference_safeguard.composite import ScorerSum
from inference_safeguard.demo import load_demo_world
from inference_safeguard.demo.world import DemoWorld
from inference_safeguard.lm import PromptInput

METHODS = {"BoN": BestOfN, "beam": BlockBeamSearch}
TREATMENTS: dict[str, RewardCalibration] = {"raw": "none", "calibrated": "quantile"}
SCALES = (1.0, 10.0)
SEARCH_DEFAULTS = {"num_candidates": 8, "beam_width": 2, "max_new_tokens": 32, "seed": 0}
"""GuardConfig settings the command line sets (`--num-candidates` ...), with their defaults."""


class Arm(NamedTuple):
    """One run's choices and their mean scores under the world's own models.

    Attributes:
        texts: the chosen response per prompt.
        reward: mean reward (the world's reward model, unscaled).
        cost: mean cost.
        within_budget: share of responses within the world's budget.
    """

    texts: tuple[str, ...]
    reward: float
    cost: float
    within_budget: float


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="risky test prompts to answer")
    parser.add_argument(
        "--lambdas", default="0.01,0.1,1", help="Lagrange multipliers, comma-separated"
    )
    parser.add_argument("--methods", default="BoN,beam", help="BoN and/or beam")
    for name, default in SEARCH_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=default, help=f"default {default}")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def run_arm(
    world: DemoWorld,
    prompts: list[PromptInput],
    method: str,
    config: GuardConfig,
    lagrange_multiplier: float,
    scale: float,
) -> Arm:
    """Answer `prompts` with the Lagrangian `method` under the world's reward times `scale`."""
    reward = world.reward if scale == 1.0 else ScorerSum([(world.reward, scale)])
    decoder = METHODS[method](
        world.model,
        world.tokenizer,
        cost=world.cost,
        reward=reward,
        config=config,
        scoring="lagrangian",
        lagrange_multiplier=lagrange_multiplier,
    )
    results = decoder.generate_batch(prompts)
    return Arm(
        texts=tuple(r.text for r in results),
        reward=sum((r.reward or 0.0) / scale for r in results) / len(results),
        cost=sum(r.cost for r in results) / len(results),
        within_budget=sum(r.safe for r in results) / len(results),
    )


def main(argv: Sequence[str] | None = None) -> dict[tuple[float, str, str, float], Arm]:
    """Run every arm and print the table; returns the arms by (lambda, method, treatment,
    reward scale)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    world = load_demo_world()
    risky = [
        p
        for p, info in zip(world.prompts["test"], world.prompt_info["test"], strict=True)
        if info.risky
    ]
    prompts = risky[: args.prompts]
    lambdas = [float(x) for x in args.lambdas.split(",")]
    methods = args.methods.split(",")
    print(
        f"{len(prompts)} risky demo prompts; N={args.num_candidates}, "
        f"K={args.beam_width} (beam), {args.max_new_tokens} new tokens, budget {world.budget}; "
        "reward, cost, within budget: x1 | x10\n"
    )
    print(
        f"{'lambda':>7} {'method':6} {'rewards':11}{'reward':>15}{'cost':>13}{'within':>13}  same"
    )
    arms: dict[tuple[float, str, str, float], Arm] = {}
    for lagrange_multiplier in lambdas:
        for method in methods:
            for treatment, calibration in TREATMENTS.items():
                config = GuardConfig(
                    budget=world.budget,
                    block_size=8,
                    reward_calibration=calibration,
                    **{name: getattr(args, name) for name in SEARCH_DEFAULTS},
                )
                one, ten = (
                    run_arm(world, prompts, method, config, lagrange_multiplier, scale)
                    for scale in SCALES
                )
                for scale, arm in zip(SCALES, (one, ten), strict=True):
                    arms[lagrange_multiplier, method, treatment, scale] = arm
                same = sum(a == b for a, b in zip(one.texts, ten.texts, strict=True))
                print(
                    f"{lagrange_multiplier:>7g} {method:6} {treatment:11}"
                    f"{one.reward:>7.3f} |{ten.reward:>6.3f}{one.cost:>6.3f} |{ten.cost:>6.3f}"
                    f"{one.within_budget:>6.0%} |{ten.within_budget:>5.0%}  "
                    f"{same}/{len(prompts)}",
                    flush=True,
                )
    return arms


if __name__ == "__main__":
    main()
