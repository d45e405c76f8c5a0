"""Backends of the base model, one module each, behind `inference_safeguard.lm.LanguageModel`.

- "huggingface" (`inference_safeguard.lm.CausalLM`): a transformers model in this
  process; the search's own KV-cache fan-out, pruning and rewinds; hidden states (critic
  mode) and grammar-constrained responses.
- "vllm" (`inference_safeguard.backends.vllm.VLLMModel`): a `vllm.LLM` engine, or an
  `AsyncLLM` driven from a background event loop (`backends.vllm_async`); the rows
  the search fans out share their prompt's KV cache through vLLM's prefix cache, and the
  engine scales out with tensor and pipeline parallelism and Ray. No hidden states, no
  grammars.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from inference_safeguard.lm import CausalLM, LanguageModel

Backend = Literal["huggingface", "vllm"]
BACKENDS: tuple[Backend, ...] = ("huggingface", "vllm")


def wrap_base_model(
    model: Any, tokenizer: Any, *, allow_special_tokens_in_content: bool = False
) -> LanguageModel:
    """The backend of `model`: a `LanguageModel` as it is, a `vllm.LLM` or `AsyncLLM` (its
    own tokenizer unless `tokenizer` is given), else a Hugging Face causal LM with
    `tokenizer`."""
    if isinstance(model, LanguageModel):
        return model
    if type(model).__module__.partition(".")[0] == "vllm":
        from inference_safeguard.backends.vllm import VLLMModel

        return VLLMModel(
            model, tokenizer, allow_special_tokens_in_content=allow_special_tokens_in_content
        )
    return CausalLM(
        model, tokenizer, allow_special_tokens_in_content=allow_special_tokens_in_content
    )


def load_base_model(
    name_or_path: str,
    backend: Backend,
    *,
    hf_options: Mapping[str, Any],
    engine_options: Mapping[str, Any],
) -> LanguageModel:
    """Load the base model on `backend`.

    Args:
        hf_options: `CausalLM.from_pretrained` options (the Hugging Face backend).
        engine_options: `VLLMModel.from_pretrained` options (the vLLM backend).

    Raises:
        ValueError: an unknown backend, or engine options given to the Hugging Face one.
    """
    if backend == "huggingface":
        if engine_options:
            raise ValueError(
                f"{', '.join(sorted(engine_options))} are options of an inference engine; "
                "pass backend='vllm' to use them, or drop them"
            )
        return CausalLM.from_pretrained(name_or_path, **hf_options)
    if backend == "vllm":
        from inference_safeguard.backends.vllm import VLLMModel

        return VLLMModel.from_pretrained(name_or_path, **engine_options)
    raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
