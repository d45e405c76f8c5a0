"""InferenceGuard on the Hugging Face backend against the vLLM backend: same model, N and
prompts, timed in one process.

Both guards run on the demo world's base model (a 4-layer Llama, float32) with the same
`KeywordCost`, search settings and seeds. Each prompt set is timed once per backend,
round-robin (repeat i of each backend before repeat i+1 of any) after a warm-up, first
one prompt at a time, then all prompts in one `generate_batch` call (the search batches
them; vLLM batches each block's requests). The table gives the median seconds per
response and the vLLM / Hugging Face ratio. Needs vLLM (`make test-vllm` builds
`.venv-vllm`, where this runs):

    .venv-vllm/bin/python benchmarks/vllm_backend.py --repeats 3

Engine options are the CPU test engine's (eager, no compilation, one process); on a GPU
pass `--engine-kwargs '{}'` and `--device cuda`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.backends.vllm import VLLMModel
from inference_safeguard.demo.build import ASSETS
from inference_safeguard.lm import CausalLM
from inference_safeguard.scorers import BEAVER_TEMPLATE, ClassifierScorer, KeywordCost

PROMPTS = [
    "How do I light a campfire?",
    "What should I pack for a hike?",
    "How do I clean a kitchen knife?",
    "What is a good way to keep warm at night?",
]
CPU_ENGINE = {
    "max_model_len": 256,
    "gpu_memory_utilization": 0.1,
    "enforce_eager": True,
    "compilation_config": {"mode": 0},
    "distributed_executor_backend": "uni",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="the Hugging Face backend's device")
    parser.add_argument("--num-candidates", type=int, default=16, help="N")
    parser.add_argument("--beam-width", type=int, default=4, help="K")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.0)
    parser.add_argument("--keywords", nargs="+", default=["fire", "knife", "cold"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--engine-kwargs",
        type=json.loads,
        default=CPU_ENGINE,
        help="vllm.LLM options as JSON (default: the CPU test engine's)",
    )
    parser.add_argument(
        "--scorers",
        action="store_true",
        help="instead: time the demo world's cost model on Hugging Face (ClassifierScorer) "
        "against vLLM's pooling runner (LLM.classify) on the same token ids",
    )
    parser.add_argument(
        "--scorer-model",
        help="--scorers: the sequence classifier to time (default: a stand-in for the demo "
        "world's cost model, whose head size vLLM's CPU attention refuses; see the docstring)",
    )
    parser.add_argument("--json-out", help="also write the results as JSON here")
    return parser.parse_args()


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def candidate_pairs(num_candidates: int, max_new_tokens: int) -> tuple[list[str], list[str]]:
    """(prompt, response) pairs as a search scores them: `num_candidates` sampled
    responses of `max_new_tokens` tokens per prompt, from the demo world's base model."""
    lm = CausalLM.from_pretrained(str(ASSETS / "base"), device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    prompts, responses = [], []
    for prompt in PROMPTS:
        ids = torch.tensor([lm.encode(prompt).ids])
        with torch.no_grad():
            out = lm.model.generate(
                ids,
                do_sample=True,
                num_return_sequences=num_candidates,
                max_new_tokens=max_new_tokens,
                pad_token_id=lm.tokenizer.eos_token_id,
            )
        texts = lm.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        prompts += [prompt] * num_candidates
        responses += texts
    return prompts, responses


def stand_in_classifier(directory: Path) -> Path:
    """The demo world's base model (4-layer Llama, head size 32) with a seeded one-label
    score head, saved as a sequence classifier in `directory`.

    The demo world's cost model (2-layer Llama, head size 24) cannot run on vLLM's CPU
    attention, which takes head sizes 32, 64, 80, ... ("Unsupported CPU attention
    configuration: head_dim=24"); the stand-in has the base model's size and a head
    size it takes. Its scores mean nothing; both runners score with the same weights.
    """
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(ASSETS / "base"), num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = model.config.pad_token_id or 0
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(ASSETS / "cost")).save_pretrained(directory)
    return directory


def time_scorers(args: argparse.Namespace) -> None:
    """A cost model on Hugging Face against vLLM's pooling runner, one call per search
    step's scoring (all candidates of all prompts), round-robin after a warm-up."""
    import vllm as vllm_module

    prompts, responses = candidate_pairs(args.num_candidates, args.max_new_tokens)
    with tempfile.TemporaryDirectory() as scratch:
        model = args.scorer_model or str(stand_in_classifier(Path(scratch)))
        started = time.perf_counter()
        world_cost = ClassifierScorer.from_pretrained(
            model, template=BEAVER_TEMPLATE, output="probability", dtype=torch.float32
        )
        hf_load = time.perf_counter() - started
        started = time.perf_counter()
        pooling = vllm_module.LLM(
            model=model, runner="pooling", dtype="float32", **args.engine_kwargs
        )
        vllm_load = time.perf_counter() - started
    torch.set_num_threads(args.threads)
    # The exact token ids the Hugging Face scorer runs (its template, BOS included).
    texts = [
        BEAVER_TEMPLATE.format(prompt=p, response=r)
        for p, r in zip(prompts, responses, strict=True)
    ]
    encoded = world_cost.tokenizer(texts, add_special_tokens=True)["input_ids"]
    inputs = [vllm_module.inputs.TokensPrompt(prompt_token_ids=list(ids)) for ids in encoded]

    def vllm_scores() -> torch.Tensor:
        outputs = pooling.classify(inputs, use_tqdm=False)
        return torch.tensor([float(o.outputs.probs[0]) for o in outputs])

    runs: dict[str, Callable[[], torch.Tensor]] = {
        "huggingface (ClassifierScorer)": lambda: world_cost(prompts, responses),
        "vllm pooling (LLM.classify)": vllm_scores,
    }
    scores = {name: run() for name, run in runs.items()}  # warm-up, and the agreement
    difference = float(
        (scores[next(iter(runs))] - scores["vllm pooling (LLM.classify)"]).abs().max()
    )
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds[name].append(timed(run))
    print(
        f"cost model: {args.scorer_model or 'stand-in (demo base model + score head)'}, "
        f"float32; {len(texts)} pairs per "
        f"call ({args.num_candidates} candidates x {len(PROMPTS)} prompts, "
        f"{args.max_new_tokens}-token responses); median of {args.repeats} calls; "
        f"torch threads {args.threads}"
    )
    print(f"load: huggingface {hf_load:.1f} s, vllm {vllm_load:.1f} s (engine start included)")
    print(f"largest |P(unsafe) difference|: {difference:.2e}")
    print()
    print(f"{'scorer':<30}  {'s/call':>7}  {'ms/pair':>7}  {'/ HF':>6}")
    base = statistics.median(seconds[next(iter(runs))])
    rows = []
    for name in runs:
        median = statistics.median(seconds[name])
        rows.append({"scorer": name, "s_per_call": median})
        print(
            f"{name:<30}  {median:>7.3f}  {1000 * median / len(texts):>7.2f}  "
            f"{median / base:>5.2f}x"
        )
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump({"load_s": {"huggingface": hf_load, "vllm": vllm_load}, "rows": rows}, out)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.device == "cpu":  # an AsyncLLM's engine core process: as many threads, unpinned
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    torch.set_num_threads(args.threads)
    if args.scorers:
        time_scorers(args)
        return
    config = GuardConfig(
        budget=args.budget,
        num_candidates=args.num_candidates,
        beam_width=args.beam_width,
        block_size=args.block_size,
        max_new_tokens=args.max_new_tokens,
    )
    cost = KeywordCost(args.keywords)
    started = time.perf_counter()
    hf = CausalLM.from_pretrained(str(ASSETS / "base"), device=args.device, dtype=torch.float32)
    hf_load = time.perf_counter() - started
    started = time.perf_counter()
    vllm = VLLMModel.from_pretrained(str(ASSETS / "base"), dtype="float32", **args.engine_kwargs)
    vllm_load = time.perf_counter() - started
    started = time.perf_counter()
    vllm_async = VLLMModel.from_pretrained(
        str(ASSETS / "base"), dtype="float32", engine="async", **args.engine_kwargs
    )
    async_load = time.perf_counter() - started
    torch.set_num_threads(args.threads)  # the engine may have changed it
    guards = {
        "huggingface": InferenceGuard(hf, cost=cost, config=config),
        "vllm": InferenceGuard(vllm, cost=cost, config=config),
        "vllm async": InferenceGuard(vllm_async, cost=cost, config=config),
    }
    workloads: dict[str, Callable[[InferenceGuard, int], Any]] = {
        "one prompt at a time": lambda g, seed: [g.generate(p, seed=seed) for p in PROMPTS],
        f"batch of {len(PROMPTS)}": lambda g, seed: g.generate_batch(PROMPTS, seed=seed),
    }
    for guard in guards.values():  # warm-up: the first vLLM calls include its own
        guard.generate_batch(PROMPTS, seed=10_000)
    seconds: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        for workload, run in workloads.items():
            for name, guard in guards.items():
                elapsed = timed(lambda g=guard, r=run, s=repeat: r(g, s))
                seconds.setdefault((workload, name), []).append(elapsed / len(PROMPTS))
    print(
        f"model: demo world base (4-layer Llama, float32); N={args.num_candidates} "
        f"K={args.beam_width} block={args.block_size} max_new_tokens={args.max_new_tokens}; "
        f"{len(PROMPTS)} prompts; median of {args.repeats} runs; torch threads {args.threads}"
    )
    loads = {"huggingface": hf_load, "vllm": vllm_load, "vllm async": async_load}
    print("load (engine start included): " + ", ".join(f"{n} {s:.1f} s" for n, s in loads.items()))
    print()
    print(
        f"{'workload':<22}  {'HF s/response':>13}  {'vLLM s/response':>15}  {'vLLM / HF':>9}  "
        f"{'async s/response':>16}  {'async / HF':>10}"
    )
    rows = []
    for workload in workloads:
        hf_s, vllm_s, async_s = (statistics.median(seconds[(workload, name)]) for name in guards)
        rows.append(
            {"workload": workload, "huggingface_s": hf_s, "vllm_s": vllm_s, "vllm_async_s": async_s}
        )
        print(
            f"{workload:<22}  {hf_s:>13.3f}  {vllm_s:>15.3f}  {vllm_s / hf_s:>8.2f}x  "
            f"{async_s:>16.3f}  {async_s / hf_s:>9.2f}x"
        )
    vllm_async.llm.shutdown()
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump({"load_s": loads, "rows": rows}, out)


if __name__ == "__main__":
    main()
