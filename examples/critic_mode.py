"""Critic mode: train a latent critic for a base model, save it, and let it guide the search.

Runs offline on a CPU in under a minute, on the demo world (`inference_safeguard.demo`): a small
assistant that often answers risky questions unsafely, with its cost and reward
models. Steps:

1. `train_critic`: sample responses to the training prompts, record the base model's
   hidden states at block ends, label them with the cost and reward models, fit the
   critic, save it (`critic.safetensors` + `critic.json`) and print its held-out report;
2. load it by directory into `InferenceGuard(..., critic=DIR)`;
3. answer risky test prompts in models mode and in critic mode, and compare safety,
   reward, time and how many texts the cost model had to score.

With a real model: `safeguard train-critic --model NAME --cost-model PATH
--reward-model PATH --prompts FILE.jsonl --out DIR`, then
`InferenceGuard.from_pretrained(NAME, cost=..., reward=..., critic=DIR)`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from inference_safeguard import GuardConfig, GuardResult, InferenceGuard
from inference_safeguard.demo import load_demo_world
from inference_safeguard.lm import CausalLM
from inference_safeguard.scorers import CallableScorer, Scorer
from inference_safeguard.training import train_critic


def counting(scorer: Scorer) -> tuple[Scorer, list[int]]:
    """`scorer` wrapped to record how many texts each call scored."""
    texts: list[int] = []

    def score(prompts: list[str], responses: list[str]) -> torch.Tensor:
        texts.append(len(responses))
        return scorer(prompts, responses)

    return CallableScorer(score), texts


def main(argv: Sequence[str] | None = None) -> list[GuardResult]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--prompts", type=int, default=8, help="risky test prompts to answer")
    parser.add_argument("--out", type=Path, help="where to save the critic (default: a temp dir)")
    args = parser.parse_args(argv)

    world = load_demo_world()
    out = args.out or Path(tempfile.mkdtemp(prefix="critic-"))
    print(f"1. Training a critic on {len(world.prompts['train'])} prompts ...")
    _, report = train_critic(
        CausalLM(world.model, world.tokenizer),
        world.prompts["train"],
        world.cost,
        world.reward,
        out=out,
        budget=world.budget,
        samples_per_prompt=args.samples_per_prompt,
        progress=False,
    )
    print(
        f"   held out: p_safe Brier {report.p_safe_brier:.3f} (constant predictor "
        f"{report.p_safe_brier_baseline:.3f}), r_hat RMSE {report.r_hat_rmse:.3f} "
        f"(reward sd {report.reward_std:.3f}); saved to {out}"
    )

    risky = [
        prompt
        for prompt, info in zip(world.prompts["test"], world.prompt_info["test"], strict=True)
        if info.risky
    ][: args.prompts]
    cost, texts = counting(world.cost)
    guard = InferenceGuard(
        world.model,
        world.tokenizer,
        cost=cost,
        reward=world.reward,
        critic=out,
        config=GuardConfig(budget=world.budget, seed=0),
    )
    print(f"2. Loaded it with InferenceGuard(..., critic={str(out)!r}).")
    print(f"3. {len(risky)} risky test prompts, budget {world.budget}:")
    critic_results: list[GuardResult] = []
    for mode in ("models", "critic"):
        texts.clear()
        started = time.perf_counter()
        results = guard.generate_batch(risky, scorer=mode)
        seconds = (time.perf_counter() - started) / len(risky)
        safe = sum(r.safe for r in results)
        unsafe_by_oracle = sum(world.oracle("", r.text) for r in results)
        reward = sum(r.reward for r in results) / len(results)
        print(
            f"   {mode:>6} mode: {safe}/{len(results)} within budget, {unsafe_by_oracle} unsafe "
            f"by the oracle, mean reward {reward:.3f}, {seconds:.3f} s/response, "
            f"{sum(texts)} texts scored by the cost model"
        )
        critic_results = results
    return critic_results


if __name__ == "__main__":
    main()
