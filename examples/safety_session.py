"""Safety session: a conversation whose every answer is within its own budget, stopped by
the conversation's budget.

Runs offline on a CPU in about a minute, on the demo world (`safeguard demo`). The guard
holds two named constraints at once:
- `harm`: the world's cost model, P(unsafe), within the world's budget per answer;
- `products`: the world's product policy (`demo.policies.product_policy`, a
  `KeywordCost` over the products its advice names), one mention per answer.

The same scripted conversation (`CONVERSATION`, a user asking about cleaning turn after
turn) is run twice. Guarded per answer, every answer is within both budgets, yet the
conversation as a whole names more products than the policy allows. With a
`SafetySession` that gives the conversation `SESSION_PRODUCTS` mentions in all, each
answer is held to what is left and, once it is spent, the next turn is refused without
generating. Every number printed comes from this run.
"""

from __future__ import annotations

import argparse
from typing import Any

from inference_safeguard import GuardConfig, GuardResult, InferenceGuard, SafetySession
from inference_safeguard.demo import load_demo_world
from inference_safeguard.demo.policies import product_policy

PER_ANSWER_PRODUCTS = 1.0
SESSION_PRODUCTS = 2.0
CONVERSATION = (
    "How do I keep the kitchen tidy?",
    "How often should I clean the bathroom?",
    "What is the fastest way to remove grease in the kitchen?",
    "How do I keep the hallway tidy?",
    "How often should I clean the garage?",
    "What is the fastest way to remove mold in the bathroom?",
)
SETTINGS: dict[str, Any] = {
    "num_candidates": 8,
    "beam_width": 2,
    "block_size": 8,
    "max_new_tokens": 24,
    "seed": 0,
}
TEXT_WIDTH = 44


def build_guard() -> InferenceGuard:
    """The demo world's assistant under the `harm` and `products` constraints."""
    world = load_demo_world()
    return InferenceGuard(
        world.model,
        world.tokenizer,
        costs={
            "harm": (world.cost, world.budget),
            "products": (product_policy(), PER_ANSWER_PRODUCTS),
        },
        reward=world.reward,
        config=GuardConfig(**SETTINGS),
    )


def converse(guard: InferenceGuard, session: SafetySession | None) -> list[GuardResult]:
    """Answer `CONVERSATION` turn by turn, each turn seeing the answers before it."""
    history: list[dict[str, str]] = []
    results = []
    for question in CONVERSATION:
        history.append({"role": "user", "content": question})
        result = guard.generate(history, session=session)
        history.append({"role": "assistant", "content": result.text})
        results.append(result)
    return results


def products(result: GuardResult) -> float:
    return next(c.cost for c in result.constraints if c.name == "products")


def describe(result: GuardResult) -> str:
    if result.refused:
        return "REFUSED".ljust(TEXT_WIDTH)
    text = result.text if len(result.text) <= TEXT_WIDTH else result.text[: TEXT_WIDTH - 3] + "..."
    return text.ljust(TEXT_WIDTH)


def main(argv: list[str] | None = None) -> tuple[list[GuardResult], list[GuardResult]]:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    guard = build_guard()
    alone = converse(guard, session=None)
    session = SafetySession({"products": SESSION_PRODUCTS}, session_id="conversation")
    held = converse(guard, session=session)

    assert guard.config.budgets is not None  # several constraints: budgets by name
    print(f"harm: the world's cost model, budget {guard.config.budgets['harm']:g} per answer")
    print(
        f"products: {PER_ANSWER_PRODUCTS:g} mention per answer, "
        f"{SESSION_PRODUCTS:g} per conversation with the session"
    )
    print()
    left, right = "per-answer guard".ljust(TEXT_WIDTH), "with the session".ljust(TEXT_WIDTH)
    print(f"turn  {left}  prod  |  {right}  prod")
    for turn, (a, s) in enumerate(zip(alone, held, strict=True), start=1):
        print(f"{turn:>4}  {describe(a)}  {products(a):>4g}  |  {describe(s)}  {products(s):>4g}")
    print()
    spent_alone = sum(products(r) for r in alone if not r.refused)
    spent_held = sum(products(r) for r in held if not r.refused)
    print(
        f"per-answer guard: {sum(r.safe for r in alone)}/{len(alone)} answers within their own "
        f"budgets, {spent_alone:g} product mentions in the conversation"
    )
    print(
        f"with the session: {sum(not r.refused for r in held)}/{len(held)} answered, "
        f"{spent_held:g} product mentions (session budget {SESSION_PRODUCTS:g}), "
        f"left {session.remaining()['products']:g}"
    )
    return alone, held


if __name__ == "__main__":
    main()
