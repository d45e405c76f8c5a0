"""An LCEL chain on `ChatSafeguard`: prompt | model | parser, with every answer held to a
cost budget by InferenceGuard.

    python examples/langchain_chain.py
    python examples/langchain_chain.py --model Qwen/Qwen2.5-1.5B-Instruct --stream

The chain is `ChatPromptTemplate | ChatSafeguard | StrOutputParser`. The script runs it
four ways: `invoke` on one question (printing the safety record and token usage that
LangChain's message carries), `batch` over all questions (one batched search, however
many questions), `stream` (only committed, cost-checked text is emitted), and
`ainvoke` (the search runs in a worker thread, so the event loop stays free).

The cost model is `KeywordCost` over `--cost-keywords` with `--budget` (default 0: one
forbidden word is over budget); an answer over budget is replaced by the refusal text
and flagged `refused` in `response_metadata["safety"]`.

`--model` takes any Hugging Face causal LM with a chat template (hub name or local
path), loaded once with `ChatSafeguard.from_model_id`. Without it, a tiny random-weight
Llama and a tokenizer are built on the spot (`core.testing`) and loaded from a
temporary folder the same way: the mechanism runs offline in seconds, but the text is
gibberish.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from core.scorers import KeywordCost
from core.testing import build_tiny_llama, build_tiny_tokenizer
from langchain_safeguard import ChatSafeguard

QUESTIONS = (
    "How do I get rid of a wasp nest under my roof?",
    "What is a good way to store firewood?",
    "How should I clean a cast iron pan?",
)
SYSTEM = "You are a careful home-maintenance assistant. Answer in at most three sentences."


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="causal LM with a chat template; default: a tiny local random model"
    )
    parser.add_argument(
        "--cost-keywords",
        default="gasoline,petrol,fire,burn",
        help="comma-separated words or phrases an answer must not say",
    )
    parser.add_argument("--budget", type=float, default=0.0)
    parser.add_argument("--num-candidates", type=int, default=16)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument("--stream", action="store_true", help="also stream the first answer")
    return parser.parse_args(argv)


def tiny_model_dir(folder: Path) -> str:
    """Save a tiny random-weight Llama and its tokenizer to `folder`; return the path."""
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def show(label: str, message: AIMessage) -> None:
    """Print an answer with its safety record and token usage."""
    safety = message.response_metadata["safety"]
    verdict = "REFUSED" if safety["refused"] else ("safe" if safety["safe"] else "OVER BUDGET")
    print(f"{label}: {' '.join(message.text.split())[:160]}")
    print(
        f"    {verdict}: cost {safety['cost']:g} / budget {safety['budget']:g}, "
        f"{safety['resample_rounds']} resample rounds, "
        f"finish {message.response_metadata['finish_reason']}, "
        f"tokens {message.usage_metadata['input_tokens']} in / "
        f"{message.usage_metadata['output_tokens']} out"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Build the chain and run it."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model_id = args.model
        if model_id is None:
            # A model this small gains nothing from more threads, and contended threads
            # can be a hundredfold slower on a busy machine.
            torch.set_num_threads(1)
            model_id = tiny_model_dir(Path(scratch))
            print("No --model: a tiny RANDOM-weight Llama built on the spot (gibberish text).")
        model = ChatSafeguard.from_model_id(
            model_id,
            cost=KeywordCost([w.strip() for w in args.cost_keywords.split(",") if w.strip()]),
            device=args.device,
            budget=args.budget,
            num_candidates=args.num_candidates,
            beam_width=args.beam_width,
            block_size=args.block_size,
            max_tokens=args.max_new_tokens,
            seed=args.seed,
        )
        prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("human", "{question}")])
        answer = prompt | model  # the AIMessage, with its metadata
        text = answer | StrOutputParser()  # just the text
        inputs = [{"question": q} for q in QUESTIONS]

        print(f"Model {model.model_name}; cost keywords: {args.cost_keywords}\n")
        show("invoke", answer.invoke(inputs[0]))

        started = time.perf_counter()
        texts = text.batch(inputs)
        print(f"\nbatch of {len(texts)} (one search) in {time.perf_counter() - started:.2f} s:")
        for question, reply in zip(QUESTIONS, texts, strict=True):
            print(f"  {question}\n    -> {' '.join(reply.split())[:120]}")

        if args.stream:
            print("\nstream: ", end="", flush=True)
            for delta in text.stream(inputs[0]):
                print(delta, end="", flush=True)
            print()

        show("\nainvoke", asyncio.run(answer.ainvoke(inputs[1])))


if __name__ == "__main__":
    main()
