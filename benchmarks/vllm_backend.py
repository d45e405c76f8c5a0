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
import time
from collections.abc import Callable
from typing import Any

import torch

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.backends.vllm import VLLMModel
from inference_safeguard.demo.build import ASSETS
from inference_safeguard.lm import CausalLM
from inference_safeguard.scorers import KeywordCost

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
    parser.add_argument("--json-out", help="also write the results as JSON here")
    return parser.parse_args()


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    torch.set_num_threads(args.threads)
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
    torch.set_num_threads(args.threads)  # the engine may have changed it
    guards = {
        "huggingface": InferenceGuard(hf, cost=cost, config=config),
        "vllm": InferenceGuard(vllm, cost=cost, config=config),
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
    print(f"load: huggingface {hf_load:.1f} s, vllm {vllm_load:.1f} s (engine start included)")
    print()
    print(f"{'workload':<22}  {'HF s/response':>13}  {'vLLM s/response':>15}  {'vLLM / HF':>9}")
    rows = []
    for workload in workloads:
        hf_s = statistics.median(seconds[(workload, "huggingface")])
        vllm_s = statistics.median(seconds[(workload, "vllm")])
        rows.append({"workload": workload, "huggingface_s": hf_s, "vllm_s": vllm_s})
        print(f"{workload:<22}  {hf_s:>13.3f}  {vllm_s:>15.3f}  {vllm_s / hf_s:>8.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump({"load_s": {"huggingface": hf_load, "vllm": vllm_load}, "rows": rows}, out)


if __name__ == "__main__":
    main()
