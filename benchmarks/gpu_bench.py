"""InferenceGuard's two scorer modes next to plain sampling and Best-of-N, on a GPU: one run.

One command builds random-weight models, times every method in one process and prints a
table (and writes JSON). Rows (`--methods`):

- `sampling`: plain Hugging Face `model.generate(do_sample=True)` at batch 1, the baseline;
- `best-of-n`: `inference_safeguard.baselines.BestOfN`, N whole responses ranked by the
  safety-augmented score, so the cost and reward models score all N finished responses once;
- `guard-models`: InferenceGuard in models mode: the cost and reward classifiers score all
  N candidates at every block end;
- `guard-models-whole`: the same with classifiers that run every input whole
  (`share_prompt_cache=False`), the before of `benchmarks/NOTES.md` entry 2;
- `guard-critic`: InferenceGuard in critic mode with the critic's cost probe: the latent
  critic scores the candidates from the hidden states the decode already has; the cost
  model checks only the candidates the search keeps (about K per block), and the reward
  model scores the returned response;
- `guard-critic-cost`: critic mode without the probe (`cost_probe=False`): the critic gives
  the rewards, the cost model the costs of every candidate at every block end.

Models (random weights: timing does not depend on them; nothing is downloaded): the base
model is a Llama of `--shape` (`tiny`, `1b`, `7b`, built by `cpu_overhead.build_random_llama`
with the tokenizer `inference_safeguard.testing` trains locally); the cost and reward models are
`ClassifierScorer`s around `LlamaForSequenceClassification`s of the same shape (one label,
different seeds), on the same device and dtype, running `--scorer-batch-size` pairs per
forward (default min(N, 32): a 7B classifier is compute-bound long before 128 pairs); the
critic is
`inference_safeguard.testing.build_random_critic(model, width=--critic-width)` with a cost
probe. EOS and
the ids the tokenizer lacks are banned by a logit bias (`cpu_overhead.ban_unusable_tokens`),
so every response has exactly `--max-new-tokens` tokens. The prompt is plain text that
tokenizes to exactly `--prompt-tokens` tokens.

Budget: `--budget` defaults to 1e6, far above anything the random scorers return, so no
candidate is ever over budget and no method resamples or refuses: random-weight scorers
would otherwise make resampling (which re-decodes blocks) depend on noise. The worst case
with resampling is a different measurement: pass a budget the scorers exceed.

Timing: all methods run in one process on the same models, round-robin (response i of
every method before response i+1 of any) after `--warmup` untimed responses each, so drift
in the machine's speed hits every method alike; the table shows the median of `--repeats`
responses (seeds 0, 1, ...). On CUDA, `torch.cuda.synchronize()` brackets every response,
so a response's time includes all of its device work.

Breakdown: after the timed runs, one more response per method runs untimed with timers
around the base model's forward, the cost and reward scorers' `_score` and the critic's
`predict` and `probe_cost` (synchronising CUDA inside the timers, in this pass only):
decoding = time in base-model forwards (prefill included), scoring = time in the scorers
and the critic (their tokenisation included), host = the rest (sampling, cache fan-out and
pruning, detokenising candidates, search bookkeeping, and their kernels). The same pass
counts base-model forwards (decode steps; prefill included) and measures memory: on CUDA
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`; on CPU the process's peak
RSS after its high-water mark is reset (`/proc/self/clear_refs`). Both include the resident
weights of every model; `+MiB` is the increase over the memory in use when the response
started (on CPU, memory an earlier method freed but the allocator kept may hide some of it).

Targets (printed with "met" or "MISSED"; the exit status is 0 either way):
- on one H100 with the 7B shape, N=128, K=32, block 32: critic mode at most 3x plain
  sampling's seconds per response, models mode at most 8x;
- in any run (the cost and reward models here are as large as the base model): critic mode
  at least 2x faster than models mode (measured on CPU with the tiny shape).

Usage:
    python benchmarks/gpu_bench.py                        # CUDA 7b if a GPU is seen, else CPU tiny
    python benchmarks/gpu_bench.py --device cpu --threads 1 --json-out gpu_bench.json
    python benchmarks/gpu_bench.py --device cuda --shape 1b --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# benchmarks/ is on sys.path when a script there runs (and the tests put it there).
from cpu_overhead import (
    PROMPT,
    BenchSettings,
    Runner,
    add_dtype_option,
    add_output_options,
    add_timing_options,
    aligned_table,
    build_model,
    build_random_llama,
    busy_machine_warning,
    decoder_runner,
    environment,
    hf_sampling_runner,
    peak_memory,
    reset_peak_memory,
    resolve_device_options,
    run_benchmark,
    synchronize,
    time_round_robin,
    versions_line,
)
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard import InferenceGuard
from inference_safeguard.baselines import BestOfN
from inference_safeguard.critic import LatentCritic
from inference_safeguard.decoder import Decoder
from inference_safeguard.scorers import ClassifierScorer
from inference_safeguard.testing import build_random_critic

METHODS = (
    "sampling",
    "best-of-n",
    "guard-models",
    "guard-models-whole",
    "guard-critic",
    "guard-critic-cost",
)
LABELS = {
    "sampling": "HF generate (sampling)",
    "best-of-n": "Best-of-N",
    "guard-models": "InferenceGuard models mode",
    "guard-models-whole": "  same, whole scorer inputs",
    "guard-critic": "InferenceGuard critic mode",
    "guard-critic-cost": "InferenceGuard critic + cost model",
}
SHAPE_DEFAULTS: dict[str, dict[str, int]] = {
    "tiny": {"num_candidates": 16, "beam_width": 4, "block_size": 8, "max_new_tokens": 64},
    "1b": {"num_candidates": 128, "beam_width": 32, "block_size": 32, "max_new_tokens": 128},
    "7b": {"num_candidates": 128, "beam_width": 32, "block_size": 32, "max_new_tokens": 128},
}
"""Search defaults per shape: the paper's on GPU shapes, a small search for tiny on CPU."""
SCORER_BATCH_SIZE = 32
"""Default pairs per cost/reward model forward (fewer when N is smaller)."""
PROFILE_SEED = 2_000_000
MIB = 2**20


@dataclass(frozen=True)
class Target:
    """A speed target: `ratio` of two methods' median seconds, compared with `limit`.

    Attributes:
        ratio: `(numerator, denominator)` methods; the value is their seconds' quotient.
        at_least: True when the value must be >= `limit` (a speed-up), else <= it.
        conditions: the settings the target was set for; other runs report it for
            information only.
    """

    description: str
    ratio: tuple[str, str]
    limit: float
    at_least: bool = False
    conditions: dict[str, Any] = field(default_factory=dict)


H100_7B = {
    "device": "cuda",
    "shape": "7b",
    "num_candidates": 128,
    "beam_width": 32,
    "block_size": 32,
}
TARGETS = {
    "critic_vs_sampling": Target(
        "InferenceGuard critic mode / plain sampling",
        ("guard-critic", "sampling"),
        3.0,
        conditions=H100_7B,
    ),
    "models_vs_sampling": Target(
        "InferenceGuard models mode / plain sampling",
        ("guard-models", "sampling"),
        8.0,
        conditions=H100_7B,
    ),
    "critic_vs_models": Target(
        "critic mode vs models mode (x faster)",
        ("guard-models", "guard-critic"),
        2.0,
        at_least=True,
    ),
}


@dataclass(frozen=True)
class Settings(BenchSettings):
    """What every method is measured with."""

    prompt_tokens: int
    scorer_batch_size: int
    critic_width: int
    methods: tuple[str, ...]


@dataclass
class Bench:
    """The models every method shares."""

    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    cost: ClassifierScorer
    reward: ClassifierScorer
    whole_cost: ClassifierScorer
    whole_reward: ClassifierScorer
    critic: LatentCritic
    prompt: str


# --------------------------------------------------------------------------- setup
def exact_length_prompt(tokenizer: PreTrainedTokenizerBase, num_tokens: int) -> str:
    """Plain text that the tokenizer encodes (special tokens included) to `num_tokens` ids.

    Words of `cpu_overhead.PROMPT` are appended in turn; a word that would overshoot is
    replaced by "a", which is one token in sentencepiece-style vocabularies.

    Raises:
        ValueError: no such text was found (e.g. the tokenizer adds more special tokens
            than `num_tokens`).
    """
    words = PROMPT.rstrip(".").split()

    def length(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    text = ""
    for index in range(4 * num_tokens):
        if length(text) == num_tokens:
            return text
        for word in (words[index % len(words)], "a"):
            longer = f"{text} {word}".strip()
            if length(longer) <= num_tokens:
                text = longer
                break
        else:
            break
    if text and length(text) == num_tokens:
        return text
    raise ValueError(
        f"found no prompt text of exactly {num_tokens} tokens for this tokenizer; "
        "try another --prompt-tokens"
    )


def build_bench(settings: Settings) -> Bench:
    """The tokenizer, base model (EOS banned), cost and reward classifiers and critic."""
    tokenizer, model = build_model(settings.shape, settings.device, settings.dtype)
    classifiers = [
        build_random_llama(
            tokenizer, settings.shape, settings.device, model.dtype, num_labels=1, seed=seed
        )
        for seed in (1, 2)
    ]
    scorers, whole = (
        [
            ClassifierScorer(
                classifier,
                tokenizer,
                batch_size=settings.scorer_batch_size,
                share_prompt_cache=share,
            )
            for classifier in classifiers
        ]
        for share in (True, False)
    )
    critic = build_random_critic(
        model,
        budget=settings.budget,
        block_size=settings.block_size,
        width=settings.critic_width,
        cost_probe=True,
    )
    return Bench(
        tokenizer=tokenizer,
        model=model,
        cost=scorers[0],
        reward=scorers[1],
        whole_cost=whole[0],
        whole_reward=whole[1],
        critic=critic,
        prompt=exact_length_prompt(tokenizer, settings.prompt_tokens),
    )


def make_runner(method: str, bench: Bench, settings: Settings) -> Runner:
    """A function that generates one response to the benchmark's prompt with `method`."""
    if method == "sampling":
        return hf_sampling_runner(
            bench.tokenizer, bench.model, bench.prompt, settings.max_new_tokens
        )
    common = {"cost": bench.cost, "reward": bench.reward}
    if method == "best-of-n":
        decoder: Decoder = BestOfN(
            bench.model,
            bench.tokenizer,
            **common,
            config=settings.guard_config(),
            scoring="augmented",
        )
    elif method == "guard-models":
        config = settings.guard_config(scorer="models")
        decoder = InferenceGuard(bench.model, bench.tokenizer, **common, config=config)
    elif method == "guard-models-whole":
        decoder = InferenceGuard(
            bench.model,
            bench.tokenizer,
            cost=bench.whole_cost,
            reward=bench.whole_reward,
            config=settings.guard_config(scorer="models"),
        )
    elif method in ("guard-critic", "guard-critic-cost"):
        config = settings.guard_config(scorer="critic", cost_probe=method == "guard-critic")
        decoder = InferenceGuard(
            bench.model, bench.tokenizer, **common, critic=bench.critic, config=config
        )
    else:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return decoder_runner(decoder, bench.prompt)


# ------------------------------------------------------------------------- profile
@dataclass
class Profile:
    """Where one untimed response's time went, its forward count and its memory.

    Attributes:
        seconds: wall-clock seconds of the response (with the timers' synchronisation).
        decoding: seconds in the base model's forwards.
        scoring: seconds in the cost and reward scorers and the critic.
        forwards: base-model forward calls (prefill included).
        scorer_calls: calls of the scorers and the critic, by name.
        scorer_seconds: seconds in each of them, by name.
        memory_at_start: bytes in use when the response started.
        peak_memory: peak bytes during the response.
        peak_may_include_earlier: True on CPU when the RSS high-water mark could not be
            reset, so the peak may be an earlier one.
    """

    seconds: float = 0.0
    decoding: float = 0.0
    scoring: float = 0.0
    forwards: int = 0
    scorer_calls: dict[str, int] = field(default_factory=dict)
    scorer_seconds: dict[str, float] = field(default_factory=dict)
    memory_at_start: int = 0
    peak_memory: int = 0
    peak_may_include_earlier: bool = False

    @property
    def host(self) -> float:
        return max(self.seconds - self.decoding - self.scoring, 0.0)

    def shares(self) -> dict[str, float]:
        """Fractions of the response's time in decoding, scoring and host work (sum 1)."""
        total = self.decoding + self.scoring + self.host
        if total <= 0:
            return {"decoding": 0.0, "scoring": 0.0, "host": 1.0}
        return {
            "decoding": self.decoding / total,
            "scoring": self.scoring / total,
            "host": self.host / total,
        }


@contextmanager
def _timers(bench: Bench, settings: Settings, profile: Profile) -> Iterator[None]:
    """Time the base model's forward and the scorers' and critic's calls into `profile`.

    The timers are instance attributes that shadow the methods, removed on exit.
    """

    def timed(function: Callable[..., Any], bucket: str, name: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            synchronize(settings.device)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                synchronize(settings.device)
                setattr(profile, bucket, getattr(profile, bucket) + time.perf_counter() - started)
                if bucket == "decoding":
                    profile.forwards += 1
                else:
                    profile.scorer_calls[name] = profile.scorer_calls.get(name, 0) + 1
                    profile.scorer_seconds[name] = (
                        profile.scorer_seconds.get(name, 0.0) + time.perf_counter() - started
                    )

        return wrapper

    patched = [
        (bench.model, "forward", "decoding", "base model"),
        (bench.cost, "_score", "scoring", "cost model"),
        (bench.reward, "_score", "scoring", "reward model"),
        (bench.whole_cost, "_score", "scoring", "cost model"),
        (bench.whole_reward, "_score", "scoring", "reward model"),
        (bench.critic, "predict", "scoring", "critic"),
        (bench.critic, "probe_cost", "scoring", "cost probe"),
    ]
    for owner, attribute, bucket, name in patched:
        setattr(owner, attribute, timed(getattr(owner, attribute), bucket, name))
    try:
        yield
    finally:
        for owner, attribute, _bucket, _name in patched:
            delattr(owner, attribute)


def profile_response(run: Runner, bench: Bench, settings: Settings) -> Profile:
    """One untimed response of `run` with timers, forward counts and its memory peak."""
    profile = Profile()
    profile.memory_at_start, peak_reset = reset_peak_memory(settings.device)
    profile.peak_may_include_earlier = not peak_reset
    with _timers(bench, settings, profile):
        synchronize(settings.device)
        started = time.perf_counter()
        run(PROFILE_SEED)
        synchronize(settings.device)
        profile.seconds = time.perf_counter() - started
    profile.peak_memory = peak_memory(settings.device)
    return profile


# -------------------------------------------------------------------------- report
def search_shape(method: str, settings: Settings) -> str:
    """What `method` samples per response, in short."""
    if method == "sampling":
        return "N=1"
    if method == "best-of-n":
        return f"N={settings.num_candidates}"
    return f"N={settings.num_candidates} K={settings.beam_width} B={settings.block_size}"


def _device_name(settings: Settings) -> str:
    if settings.cuda:
        return torch.cuda.get_device_name(settings.device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _applies(target: Target, settings: Settings) -> bool:
    values = {**asdict(settings), "device": "cuda" if settings.cuda else settings.device}
    return all(values[key] == value for key, value in target.conditions.items())


def build_report(
    settings: Settings,
    bench: Bench,
    seconds: dict[str, list[float]],
    tokens: dict[str, list[int]],
    profiles: dict[str, Profile],
    load_average: float | None,
) -> dict[str, Any]:
    """Everything measured, with ratios and target checks, as JSON-ready data."""
    medians = {method: statistics.median(values) for method, values in seconds.items()}
    baseline = medians.get("sampling")
    methods = {}
    for method, median in medians.items():
        profile = profiles[method]
        methods[method] = {
            "label": LABELS[method],
            "search": search_shape(method, settings),
            "seconds": seconds[method],
            "median_seconds": median,
            "ratio_vs_sampling": None if baseline is None else median / baseline,
            "tokens": tokens[method],
            "forwards": profile.forwards,
            "decode_steps_per_second": profile.forwards / median,
            "memory": {
                "at_start": profile.memory_at_start,
                "peak": profile.peak_memory,
                "peak_over_start": max(profile.peak_memory - profile.memory_at_start, 0),
                "peak_may_include_earlier": profile.peak_may_include_earlier,
            },
            "profile": {
                "seconds": profile.seconds,
                "decoding_seconds": profile.decoding,
                "scoring_seconds": profile.scoring,
                "host_seconds": profile.host,
                "shares": profile.shares(),
                "scorer_calls": profile.scorer_calls,
                "scorer_seconds": profile.scorer_seconds,
            },
        }
    targets = {}
    for name, target in TARGETS.items():
        numerator, denominator = target.ratio
        value = None
        if numerator in medians and denominator in medians:
            value = medians[numerator] / medians[denominator]
        targets[name] = {
            "description": target.description,
            "methods": list(target.ratio),
            "value": value,
            "limit": target.limit,
            "comparison": ">=" if target.at_least else "<=",
            "met": None
            if value is None
            else (value >= target.limit if target.at_least else value <= target.limit),
            "conditions": target.conditions,
            "applies": _applies(target, settings),
        }
    parameters = {
        "base_model": sum(p.numel() for p in bench.model.parameters()),
        "cost_model": sum(p.numel() for p in bench.cost.model.parameters()),
        "reward_model": sum(p.numel() for p in bench.reward.model.parameters()),
        "critic": sum(p.numel() for p in bench.critic.parameters()),
    }
    return {
        "settings": asdict(settings),
        "environment": {
            **environment(load_average),
            "device_name": _device_name(settings),
            "torch_threads": torch.get_num_threads(),
        },
        "prompt": {"text": bench.prompt, "tokens": settings.prompt_tokens},
        "parameters": parameters,
        "memory_kind": "cuda_max_memory_allocated" if settings.cuda else "peak_rss",
        "methods": methods,
        "targets": targets,
    }


def _check_line(target: dict[str, Any]) -> str:
    limit = f"target {target['comparison']} {target['limit']:g}x"
    if target["value"] is None:
        return f"{target['description']}: n/a ({limit}; needs rows {', '.join(target['methods'])})"
    verdict = "met" if target["met"] else "MISSED"
    line = f"{target['description']}: {target['value']:.2f}x ({limit}): {verdict}"
    if not target["applies"]:
        wanted = ", ".join(f"{k}={v}" for k, v in target["conditions"].items())
        line += f" [set for {wanted}; informative here]"
    return line


def format_report(report: dict[str, Any]) -> str:
    """The report as a header, an aligned table, the target checks and notes."""
    settings, env = report["settings"], report["environment"]
    on_cuda = report["memory_kind"].startswith("cuda")
    params = report["parameters"]
    header = [
        f"models: random-weight Llama '{settings['shape']}' ({params['base_model'] / 1e6:.1f}M "
        f"params), cost and reward classifiers of the same shape "
        f"({params['cost_model'] / 1e6:.1f}M each), critic {params['critic'] / 1e6:.2f}M; "
        f"{settings['dtype']} on {settings['device']} ({env['device_name']}"
        + ("" if on_cuda else f", {settings['threads']} torch threads")
        + ")",
        f"prompt {settings['prompt_tokens']} tokens, {settings['max_new_tokens']} new tokens "
        f"(EOS banned), temperature 1; budget {settings['budget']:g} (no resampling)",
        f"timing: median of {settings['repeats']} responses per method after "
        f"{settings['warmup']} warm-up, round-robin in one process"
        + (", CUDA synchronised" if on_cuda else ""),
        versions_line(env),
    ]
    memory = "GPU peak MiB" if on_cuda else "peak RSS MiB"
    columns = [
        "method",
        "search",
        "s/response",
        "min-max s",
        "x sampling",
        memory,
        "+MiB",
        "forwards",
        "steps/s",
        "decode",
        "scoring",
        "host",
    ]
    rows = []
    for m in report["methods"].values():
        shares, mem = m["profile"]["shares"], m["memory"]
        rows.append(
            [
                m["label"],
                m["search"],
                f"{m['median_seconds']:.3f}",
                f"{min(m['seconds']):.3f}-{max(m['seconds']):.3f}",
                "n/a" if m["ratio_vs_sampling"] is None else f"{m['ratio_vs_sampling']:.2f}",
                f"{mem['peak'] / MIB:.0f}" + ("*" if mem["peak_may_include_earlier"] else ""),
                f"{mem['peak_over_start'] / MIB:.0f}",
                str(m["forwards"]),
                f"{m['decode_steps_per_second']:.1f}",
                f"{shares['decoding']:.0%}",
                f"{shares['scoring']:.0%}",
                f"{shares['host']:.0%}",
            ]
        )
    checks = [_check_line(target) for target in report["targets"].values()]
    notes = []
    short = {
        name: sorted(set(m["tokens"]))
        for name, m in report["methods"].items()
        if set(m["tokens"]) != {settings["max_new_tokens"]}
    }
    if short:
        notes.append(f"note: responses of other lengths than {settings['max_new_tokens']}: {short}")
    busy = busy_machine_warning(env, settings["threads"], "--threads 1 helps")
    if busy is not None and not on_cuda:
        notes.append(busy)
    if any(m["memory"]["peak_may_include_earlier"] for m in report["methods"].values()):
        notes.append("* the RSS high-water mark could not be reset: the peak may be earlier")
    legend = (
        "forwards: base-model forwards per response (prefill included); steps/s: forwards "
        "per second of the median response; decode/scoring/host: shares of a profiled response"
    )
    return "\n".join([*header, "", *aligned_table(columns, rows), "", *checks, *notes, legend])


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options, with the device's and shape's defaults filled in."""
    parser = argparse.ArgumentParser(
        description="Time InferenceGuard's critic and models modes against plain sampling "
        "and Best-of-N on random-weight Llama models."
    )
    parser.add_argument(
        "--device", help="cpu or cuda[:index] (default: cuda if torch sees one, else cpu)"
    )
    parser.add_argument(
        "--shape",
        choices=tuple(SHAPE_DEFAULTS),
        help="model shape (default: tiny on CPU, 7b on CUDA)",
    )
    add_dtype_option(parser)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens")
    parser.add_argument(
        "--max-new-tokens", type=int, help="response length (default: 128; 64 for tiny)"
    )
    parser.add_argument("--num-candidates", type=int, help="N (default: 128; 16 for tiny)")
    parser.add_argument("--beam-width", type=int, help="K (default: 32; 4 for tiny)")
    parser.add_argument("--block-size", type=int, help="tokens per block (default: 32; 8 for tiny)")
    parser.add_argument(
        "--budget",
        type=float,
        default=1e6,
        help="cost budget; the default is never exceeded, so nothing is resampled",
    )
    parser.add_argument(
        "--scorer-batch-size",
        type=int,
        help="pairs per cost/reward model forward (default: min(N, 32))",
    )
    parser.add_argument("--critic-width", type=int, default=256, help="critic hidden width")
    add_timing_options(parser, repeats=5, warmup=1)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="rows to measure (default: all)",
    )
    add_output_options(parser)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    resolve_device_options(parser, args)
    if args.shape is None:
        args.shape = "7b" if args.device.startswith("cuda") else "tiny"
    for name, value in SHAPE_DEFAULTS[args.shape].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.scorer_batch_size is None:
        args.scorer_batch_size = min(args.num_candidates, SCORER_BATCH_SIZE)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.prompt_tokens < 1:
        parser.error("--repeats, --threads and --prompt-tokens must be >= 1, --warmup >= 0")
    args.methods = tuple(m for m in METHODS if m in args.methods)  # table order, no repeats
    return args


def measure_every_method(settings: Settings, load_average: float | None) -> dict[str, Any]:
    """Build the models, time every requested method in turn and profile one response
    of each."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        print(f"building {settings.shape} models on {settings.device} ...", file=sys.stderr)
        bench = build_bench(settings)
        runners = {method: make_runner(method, bench, settings) for method in settings.methods}
        responses = time_round_robin(
            runners, repeats=settings.repeats, warmup=settings.warmup, device=settings.device
        )
        print("profiling one response per method ...", file=sys.stderr)
        profiles = {
            method: profile_response(run, bench, settings) for method, run in runners.items()
        }
    finally:
        torch.set_num_threads(previous_threads)
    seconds = {method: [r.seconds for r in rows] for method, rows in responses.items()}
    tokens = {method: [len(r.token_ids) for r in rows] for method, rows in responses.items()}
    return build_report(settings, bench, seconds, tokens, profiles, load_average)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every requested method, print the table, write the JSON; the exit status."""
    return run_benchmark(parse_args(argv), Settings, measure_every_method, format_report)


if __name__ == "__main__":
    sys.exit(main())
