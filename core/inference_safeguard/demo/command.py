"""`safeguard demo`: base sampling and InferenceGuard side by side on the demo world.

A few test prompts with both responses, their cost and verdicts, then the summary table
of a small evaluation on the test split. `--rebuild` retrains the world first.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path

from transformers.utils import logging as hf_logging

from inference_safeguard.baselines import SamplingDecoder
from inference_safeguard.cli_options import CommandLineError, non_negative_int
from inference_safeguard.demo.build import ASSETS, build_demo_world
from inference_safeguard.demo.world import DemoWorld, load_demo_world
from inference_safeguard.evaluation.methods import MethodOptions
from inference_safeguard.evaluation.report import check_report_extras, print_table
from inference_safeguard.evaluation.run import evaluate
from inference_safeguard.results import GuardResult

SUMMARY_METHODS = ("base", "bon-augmented", "inferenceguard", "inferenceguard-critic")
WIDTH = 88


def add_demo_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `safeguard demo`."""
    parser = subparsers.add_parser(
        "demo",
        help="show InferenceGuard on the offline demo world",
        description="Show base sampling and InferenceGuard side by side on test prompts of "
        "the demo world, then a summary table. Runs offline on a CPU.",
    )
    parser.add_argument(
        "--examples",
        type=non_negative_int,
        default=4,
        metavar="N",
        help="test prompts shown side by side (default: 4)",
    )
    parser.add_argument(
        "--limit",
        type=non_negative_int,
        default=16,
        metavar="N",
        help="test prompts in the summary table (default: 16; 0 skips it)",
    )
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="retrain the demo world from scratch first (minutes on a CPU)",
    )
    parser.add_argument(
        "--world",
        type=Path,
        default=ASSETS,
        metavar="DIR",
        help="where the world's files are (default: the packaged world)",
    )
    parser.set_defaults(run=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Carry out `safeguard demo`."""
    started = time.perf_counter()
    check_report_extras()
    if args.rebuild:
        manifest = build_demo_world(args.world)
        print(f"Rebuilt the demo world in {manifest['seconds']} s ({args.world}).\n")
    hf_logging.disable_progress_bar()  # the world's models load in milliseconds
    world = load_demo_world(args.world)
    if "test" not in world.prompts:
        raise CommandLineError(
            f"the demo world in {args.world} has no test split (its splits: "
            f"{', '.join(world.prompts) or 'none'}); rebuild it with `safeguard demo --rebuild`"
        )
    _introduce(world)
    if args.examples > 0:
        _side_by_side(world, args.examples)
    if args.limit > 0:
        prompts = world.prompts["test"][: args.limit]
        print(f"\nSummary on {len(prompts)} test prompts (same N, K, block size and seed):")
        report = evaluate(
            [m for m in SUMMARY_METHODS if world.critic is not None or "critic" not in m],
            prompts,
            model=world.model,
            tokenizer=world.tokenizer,
            cost=world.cost,
            reward=world.reward,
            oracle=world.oracle,
            config=world.guard().config,
            options=MethodOptions(critic=world.critic),
            progress=False,
        )
        print_table(report)
        print(
            "All methods on the whole test split: safeguard eval --split test --out results --plot"
        )
    print(f"\nDone in {time.perf_counter() - started:.0f} s.")
    return 0


def _introduce(world: DemoWorld) -> None:
    sizes = world.manifest.get("parameters", {})
    test = world.prompt_info["test"]
    print(
        textwrap.fill(
            "Safeguard demo. The assistant is a small Llama "
            f"({sizes.get('base', 0) / 1e6:.1f}M parameters) trained offline on a synthetic "
            "corpus in which it often answers risky questions with hazardous instructions. "
            f"Cost model: P(unsafe) of the text, budget {world.budget}. Reward model: "
            "helpfulness. Oracle: a fixed hazard lexicon, independent of both models. "
            f"Test split: {len(test)} unseen prompts, {sum(p.risky for p in test)} of them risky.",
            WIDTH,
        )
    )


def _side_by_side(world: DemoWorld, count: int) -> None:
    info = world.prompt_info["test"]
    order = sorted(range(len(info)), key=lambda i: not info[i].risky)[:count]
    prompts = [world.prompts["test"][i] for i in order]
    config = world.guard().config.with_overrides(seed=0)
    base = SamplingDecoder(
        world.model, world.tokenizer, cost=world.cost, reward=world.reward, config=config
    ).generate_batch(prompts)
    guarded = world.guard().generate_batch(prompts, seed=0)
    for i, plain, safe in zip(order, base, guarded, strict=True):
        kind = "risky" if info[i].risky else "benign"
        print(f"\nPrompt ({info[i].topic}, {kind}): {info[i].text}")
        for name, result in (("base sampling", plain), ("InferenceGuard", safe)):
            print(_describe(name, result, world.oracle(info[i].text, result.text)))


def _describe(name: str, result: GuardResult, oracle_unsafe: bool) -> str:
    verdict = "refused" if result.refused else ("within budget" if result.safe else "OVER BUDGET")
    head = (
        f"  {name:<15} cost {result.cost:.2f}, {verdict}, "
        f"oracle: {'UNSAFE' if oracle_unsafe else 'safe'}, reward {result.reward:.2f}"
    )
    body = textwrap.fill(result.text, WIDTH, initial_indent="    ", subsequent_indent="    ")
    return f"{head}\n{body}"
