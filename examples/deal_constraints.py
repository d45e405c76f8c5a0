"""DeAL-style programmatic constraints on the demo world: a required phrase and a length
range, enforced by the search, measured against plain sampling.

    python examples/deal_constraints.py            # about a minute on 2 CPU cores

The demo world's assistant (shipped with the package, offline) answers household
questions in a few advice sentences and sometimes closes with "I hope this helps". The
task asks every answer to (a) contain that phrase and (b) be between `--min-words` and
`--max-words` words long. Written as programs over the text
(`inference_safeguard.programmatic`):

- cost: the world's safety cost (P(unsafe), a `ClassifierScorer`) plus
  `LengthCost(max_length=..., min_length=...)`, summed (`ScorerSum`), with the world's
  budget 0.5: a prefix over the maximum costs at least 1 and is over budget at once, so
  the search prunes it, as it prunes unsafe text;
- reward: `KeywordReward([PHRASE])` plus a tenth of the world's helpfulness reward, so
  the search prefers candidates that have already said the phrase;
- the finished check: the length cost's `score_complete` (too short), which a prefix
  cannot be charged for; `RequiredKeywordsCost([PHRASE])` measures the phrase.

The guard holds its refusal to the same cost model as an answer (an over-budget
refusal raises `RefusalOverBudgetWarning`), so the script refuses with `REFUSAL`, a
polite refusal inside the length range, rather than the default one-liner, which is
shorter than `--min-words`. A refused answer counts as meeting no constraint.

Plain sampling and the guard answer the same test prompts with the same seeds; the
script prints the rate of answers that meet each constraint and both, and how many are
unsafe by the world's oracle, and returns the rates.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from inference_safeguard import GuardConfig, GuardResult, InferenceGuard
from inference_safeguard.baselines import SamplingDecoder
from inference_safeguard.composite import ScorerSum
from inference_safeguard.demo import load_demo_world
from inference_safeguard.programmatic import KeywordReward, LengthCost, RequiredKeywordsCost

PHRASE = "I hope this helps"
REFUSAL = (
    "I'm sorry, but I can't give a safe answer to that one. "
    "Please ask me about something else around the house."
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=24, help="test prompts to answer")
    parser.add_argument("--min-words", type=int, default=12)
    parser.add_argument("--max-words", type=int, default=30)
    parser.add_argument("--num-candidates", type=int, default=16)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    refusal_words = len(REFUSAL.split())
    if not args.min_words <= refusal_words <= args.max_words:
        parser.error(
            f"the refusal has {refusal_words} words; choose --min-words and --max-words "
            "around it, or the guard's refusals would break the length constraint"
        )
    return args


def satisfaction(
    results: list[GuardResult], length: LengthCost, required: RequiredKeywordsCost
) -> dict[str, float]:
    """Share of answers that meet the length range, have the phrase, and both; a refusal
    meets neither."""
    texts = [r.text for r in results]
    prompts = [""] * len(texts)
    answered = torch.tensor([not r.refused for r in results])
    length_ok = (length.score_complete(prompts, texts) == 0) & answered
    phrase_ok = (required.score_complete(prompts, texts) == 0) & answered
    return {
        "length": length_ok.double().mean().item(),
        "phrase": phrase_ok.double().mean().item(),
        "both": (length_ok & phrase_ok).double().mean().item(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Answer the prompts both ways and print the satisfaction rates; returns them."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    world = load_demo_world()
    prompts = world.prompts["test"][: args.prompts]
    length = LengthCost(max_length=args.max_words, min_length=args.min_words)
    required = RequiredKeywordsCost([PHRASE])
    cost = ScorerSum([world.cost, length])
    reward = ScorerSum([KeywordReward([PHRASE]), (world.reward, 0.1)])
    config = GuardConfig(
        budget=world.budget,
        num_candidates=args.num_candidates,
        beam_width=args.beam_width,
        block_size=8,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        refusal_text=REFUSAL,
    )
    sampler = SamplingDecoder(world.model, world.tokenizer, cost=cost, config=config)
    guard = InferenceGuard(world.model, world.tokenizer, cost=cost, reward=reward, config=config)
    arms = {
        "plain sampling": sampler.generate_batch(prompts),
        "guard": guard.generate_batch(prompts),
    }
    rates = {}
    print(
        f"{len(prompts)} demo prompts; constraints: {args.min_words}-{args.max_words} words "
        f"and the phrase {PHRASE!r}\n"
    )
    print(f"{'':16}{'length ok':>10}{'phrase':>10}{'both':>10}{'unsafe':>10}{'refused':>10}")
    for name, results in arms.items():
        rates[name] = satisfaction(results, length, required)
        rates[name]["unsafe"] = sum(world.oracle("", r.text) for r in results) / len(results)
        rates[name]["refused"] = sum(r.refused for r in results) / len(results)
        row = rates[name]
        print(
            f"{name:16}{row['length']:>10.0%}{row['phrase']:>10.0%}{row['both']:>10.0%}"
            f"{row['unsafe']:>10.0%}{row['refused']:>10.0%}"
        )
    print(f"\nguard, first answer: {arms['guard'][0].text.strip()!r}")
    return rates


if __name__ == "__main__":
    main()
