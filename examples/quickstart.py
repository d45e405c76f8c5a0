"""Quickstart: InferenceGuard keeps every response within a keyword budget; plain sampling does not.

Runs offline in seconds on a CPU. The model is a tiny Llama with random weights and
its tokenizer is trained on the spot (both from `inference_safeguard.testing`), so the text is
gibberish: the point is the mechanism, not the prose. Steps:

1. sample the model plainly and pick the words it emits most often;
2. declare those words unsafe: `KeywordCost(words)` with budget 0, so a response that
   says any of them even once is over budget;
3. over ten seeds, generate with plain sampling
   (`inference_safeguard.baselines.SamplingDecoder`) and with `InferenceGuard`, and count
   the responses over budget.

Every number printed comes from this run. With a real model, load it with
`InferenceGuard.from_pretrained("model-id-or-path", cost=..., config=...)` instead.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import torch

from inference_safeguard import GuardConfig, GuardResult, InferenceGuard
from inference_safeguard.baselines import SamplingDecoder
from inference_safeguard.scorers import CallableScorer, KeywordCost
from inference_safeguard.testing import build_tiny_llama, build_tiny_tokenizer

PROMPT = "Tell me about the dog and the garden."
SEEDS = range(10)
CALIBRATION_SAMPLES = 100
CALIBRATION_SEED = 1234
"""Seeds the keyword search draws from; disjoint from `SEEDS`, which the comparison uses."""
COVERAGE = 0.9
"""Keywords are added until this share of the calibration samples says at least one."""
MAX_NEW_TOKENS = 32
EXAMPLES = 3
TEXT_WIDTH = 60


def frequent_words(sampler: SamplingDecoder) -> tuple[list[str], float]:
    """The fewest most-common words that together occur in `COVERAGE` of plain samples.

    Returns:
        The words, and the share of calibration samples that contain at least one.
    """
    torch.manual_seed(CALIBRATION_SEED)  # seed=None draws per-prompt seeds from torch's RNG
    results = sampler.generate_batch([PROMPT] * CALIBRATION_SAMPLES, seed=None)
    samples = [{w.lower() for w in re.findall(r"\w+", r.text) if w.isalpha()} for r in results]
    counts = Counter(word for words in samples for word in words if len(word) > 2)
    chosen: list[str] = []
    covered = 0
    for word, _ in counts.most_common():
        chosen.append(word)
        covered = sum(any(w in words for w in chosen) for words in samples)
        if covered >= COVERAGE * len(samples):
            break
    return chosen, covered / len(samples)


def mark(text: str, words: list[str]) -> str:
    """`text` on one line with the keywords in [brackets], cut to `TEXT_WIDTH` characters
    (the cut keeps the first keyword in view)."""
    pattern = re.compile(rf"(?<!\w)(?:{'|'.join(map(re.escape, words))})(?!\w)", re.IGNORECASE)
    flat = " ".join(text.split())
    first = pattern.search(flat)
    start = 0 if first is None or first.end() <= TEXT_WIDTH - 10 else first.start() - 20
    marked = pattern.sub(lambda m: f"[{m.group(0)}]", flat[start:])
    clipped = marked if len(marked) <= TEXT_WIDTH else marked[: TEXT_WIDTH - 3] + "..."
    return ("..." if start else "") + clipped


def verdict(result: GuardResult) -> str:
    """`safe`, `REFUSED` (over budget, so the guard returned its refusal) or `OVER BUDGET`."""
    if result.refused:
        return "REFUSED"
    return "safe" if result.safe else "OVER BUDGET"


def main() -> None:
    """Run the comparison and print it."""
    # A model this small gains nothing from more threads, and one thread does not stall
    # when other processes share the cores (two contended threads can be 100x slower).
    torch.set_num_threads(1)
    started = time.perf_counter()
    print("InferenceGuard quickstart (offline; a toy model, not a real safety evaluation)")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"Model: a {model.config.num_hidden_layers}-layer Llama ({parameters / 1e6:.1f}M "
        "parameters) with RANDOM weights and a tokenizer trained locally on a generated "
        "corpus\n(inference_safeguard.testing), so the text below is gibberish by design.\n"
    )

    no_cost = CallableScorer(lambda prompts, responses: [0.0] * len(responses))
    words, coverage = frequent_words(
        SamplingDecoder(
            model, tokenizer, cost=no_cost, config=GuardConfig(max_new_tokens=MAX_NEW_TOKENS)
        )
    )
    print(
        f"1. Words the model says most often (from {CALIBRATION_SAMPLES} plain samples; "
        f"{coverage:.0%} of them say one): {', '.join(words)}"
    )
    print(
        f"2. Cost: KeywordCost over these {len(words)} words with budget 0: a response "
        "that says any of them even once is over budget.\n"
    )

    cost = KeywordCost(words)
    config = GuardConfig(
        budget=0.0,
        num_candidates=16,
        beam_width=4,
        block_size=8,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    plain = SamplingDecoder(model, tokenizer, cost=cost, config=config)
    guard = InferenceGuard(model, tokenizer, cost=cost, config=config)
    runs = [
        (seed, plain.generate(PROMPT, seed=seed), guard.generate(PROMPT, seed=seed))
        for seed in SEEDS
    ]

    print(
        f"3. Prompt {PROMPT!r}, {len(runs)} seeds, {MAX_NEW_TOKENS} new tokens; guard: "
        f"N={config.num_candidates} candidates, K={config.beam_width} beams, "
        f"blocks of {config.block_size} tokens\n"
    )
    print(f"{'seed':>4}  {'plain sampling':<20}  {'InferenceGuard':<20}  guard resamples")
    for seed, sampled, guarded in runs:
        print(
            f"{seed:>4}  {f'cost {sampled.cost:g}  {verdict(sampled)}':<20}  "
            f"{f'cost {guarded.cost:g}  {verdict(guarded)}':<20}  "
            f"{guarded.stats.resample_rounds:>15}"
        )

    print("\nExamples (keywords in [brackets]):")
    shown = sorted(runs, key=lambda run: run[1].safe)[:EXAMPLES]  # plain failures first
    for seed, sampled, guarded in shown:
        print(f"  seed {seed}")
        print(
            f"    plain  cost {sampled.cost:g} {verdict(sampled):<11} {mark(sampled.text, words)}"
        )
        print(
            f"    guard  cost {guarded.cost:g} {verdict(guarded):<11} {mark(guarded.text, words)}"
        )

    plain_over = sum(not s.safe for _, s, _ in runs)
    guard_over = sum(not g.safe and not g.refused for _, _, g in runs)
    refused = sum(g.refused for _, _, g in runs)
    print(
        f"\nSummary: plain sampling broke the budget in {plain_over}/{len(runs)} runs; "
        f"InferenceGuard returned {guard_over}/{len(runs)} over-budget responses "
        f"({refused} refused). Took {time.perf_counter() - started:.1f} s after imports."
    )


if __name__ == "__main__":
    main()
