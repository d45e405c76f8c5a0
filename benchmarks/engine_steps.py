"""What one search step costs as requests share it: one command, one run.

The engine batches the requests in flight into one `RunningSearch`, so a request's
latency is its number of steps times what a step costs with everyone else's rows in it.
This script runs the search the engine runs, without the engine's threads or HTTP:
1, 4, 16 and 64 requests (`--requests`) join one `RunningSearch` together and step it
to the end, and the table splits a step's wall time into

- **forward**: the model forwards of the block (`CausalLM._feed`, one per token);
- **sampling**: the token draws (`PromptSamplers.sample`);
- **scoring**: the candidates' texts, stop strings and cost (`BlockSearch._score`);
- **selection**: the top beams per prompt and the finished responses
  (`BlockSearch._select`);
- **rest**: everything else (fan-out and pruning of the KV cache, the per-token
  bookkeeping of `decode_block`, the search's Python);

then times the forward alone, one decode token at 4 to 256 rows over a 40-token cache,
which is the floor of what a step can cost at that many rows. Each figure is the
minimum over `--repeats` runs (the machine may be shared: the minimum is the run least
disturbed by other work), and ratios are against one request (4 rows) in the same run.

Model and settings as `serve_load.py`: a random-weight Llama with the 768-token test
tokenizer, `--shape tiny` (hidden 256, 4 layers) or `--shape test` (hidden 64,
2 layers), `KeywordCost` on two words, N=4, K=2, block 8, 32 new tokens, one torch
thread (`--threads`). Nothing is downloaded.

Usage:
    python benchmarks/engine_steps.py                        # both shapes
    python benchmarks/engine_steps.py --shape test --json-out steps.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from serve_load import QUESTIONS, SHAPES  # the load benchmark's shapes and requests

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.lm import CausalLM
from inference_safeguard.sampling import PromptSamplers
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.search import BlockSearch, RunningSearch
from inference_safeguard.testing import build_tiny_llama, build_tiny_tokenizer

PHASES: tuple[tuple[type, str, str], ...] = (
    (CausalLM, "_feed", "forward"),
    (PromptSamplers, "sample", "sampling"),
    (BlockSearch, "_score", "scoring"),
    (BlockSearch, "_select", "selection"),
)
FORWARD_ROWS = (4, 16, 64, 256)
CACHE_TOKENS = 40


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    requests = sorted({int(n) for n in args.requests.split(",")})
    shapes = list(SHAPES) if args.shape == "both" else [args.shape]
    report: dict[str, Any] = {
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "shapes": {},
    }
    tokenizer = build_tiny_tokenizer()
    for shape in shapes:
        model = build_tiny_llama(tokenizer, max_position_embeddings=1024, **SHAPES[shape])
        guard = InferenceGuard(
            model.eval(),
            tokenizer,
            cost=KeywordCost(["bomb", "poison"]),
            config=GuardConfig(num_candidates=4, beam_width=2, block_size=8, max_new_tokens=32),
        )
        steps = [_step_costs(guard, n, args.repeats) for n in requests]
        forwards = [_forward_cost(guard.lm, rows, args.repeats) for rows in FORWARD_ROWS]
        report["shapes"][shape] = {"steps": steps, "forward": forwards}
        print(_tables(shape, steps, forwards), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    parser.add_argument("--requests", default="1,4,16,64", help="requests in one search")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (min taken)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--json-out", help="write the figures as JSON here")
    return parser


@contextlib.contextmanager
def _phase_timers(totals: dict[str, float]) -> Iterator[None]:
    """Add each phase's wall seconds to `totals` while the block runs."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in PHASES]

    def timed(method: Callable[..., Any], label: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - began

        return run

    try:
        for (owner, name, method), (_, _, label) in zip(originals, PHASES, strict=True):
            setattr(owner, name, timed(method, label))
        yield
    finally:
        for owner, name, method in originals:
            setattr(owner, name, method)


def _step_costs(guard: InferenceGuard, requests: int, repeats: int) -> dict[str, Any]:
    """Milliseconds per step of `requests` requests searched together, by phase: the
    run (of `repeats`) with the least total time."""
    best: dict[str, Any] | None = None
    config = guard.search_plan(guard.config)[0]
    for repeat in range(repeats):
        chats = [
            [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({repeat})"}]
            for i in range(requests)
        ]
        prompts = guard.encode_prompts(chats, guard.config, None)
        running = RunningSearch(guard.search, config)
        running.add(prompts, [guard.config] * requests, guard._seeds(prompts, guard.config))
        totals = dict.fromkeys([label for _, _, label in PHASES], 0.0)
        steps = 0
        began = time.perf_counter()
        with _phase_timers(totals):
            while running.live:
                running.step()
                steps += 1
        seconds = time.perf_counter() - began
        if best is None or seconds / steps < best["step_ms"] / 1e3:
            phases = {label: 1e3 * total / steps for label, total in totals.items()}
            phases["rest"] = 1e3 * seconds / steps - sum(phases.values())
            best = {"requests": requests, "rows": requests * config.num_candidates}
            best |= {"steps": steps, "step_ms": 1e3 * seconds / steps, "phases_ms": phases}
    assert best is not None
    return best


def _forward_cost(lm: CausalLM, rows: int, repeats: int) -> dict[str, Any]:
    """Milliseconds of one decode forward at `rows` rows over a `CACHE_TOKENS`-token
    cache (prompts of different lengths, so that rows carry padding as in a search)."""
    fastest = float("inf")
    for _ in range(repeats):
        state = lm.prefill([[5 + row % 50] * (CACHE_TOKENS - row % 8) for row in range(rows)])
        tokens = torch.full((rows,), 7, dtype=torch.long)
        real = torch.ones(rows, dtype=torch.bool)
        lm._feed(state, tokens, real)  # untimed: the first decode forward warms up
        for _ in range(8):
            began = time.perf_counter()
            lm._feed(state, tokens, real)
            fastest = min(fastest, time.perf_counter() - began)
    return {"rows": rows, "forward_ms": 1e3 * fastest}


def _tables(shape: str, steps: list[dict[str, Any]], forwards: list[dict[str, Any]]) -> str:
    labels = [label for _, _, label in PHASES] + ["rest"]
    lone = steps[0]["step_ms"]
    lines = [
        f"\n{shape}: one step (8 tokens), ms",
        "| requests | rows | step | vs 1 request | " + " | ".join(labels) + " |",
        "|---" * (4 + len(labels)) + "|",
    ]
    for step in steps:
        phases = " | ".join(f"{step['phases_ms'][label]:.1f}" for label in labels)
        lines.append(
            f"| {step['requests']} | {step['rows']} | {step['step_ms']:.1f} | "
            f"{step['step_ms'] / lone:.2f}x | {phases} |"
        )
    first = forwards[0]["forward_ms"]
    lines += ["", f"{shape}: one decode forward, {CACHE_TOKENS}-token cache"]
    lines += ["| rows | ms | vs 4 rows |", "|---|---|---|"]
    lines += [
        f"| {f['rows']} | {f['forward_ms']:.2f} | {f['forward_ms'] / first:.2f}x |"
        for f in forwards
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
