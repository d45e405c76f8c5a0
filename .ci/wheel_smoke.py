"""Run from a folder that holds its own `core` package, in a venv with the built wheel.

Checks that the installed distribution brings no module named `core`, that the three
packages import next to the user's own `core`, and that a guarded generation runs
through the core and both integrations on a tiny model built here (no hub).
"""

from __future__ import annotations

import importlib.metadata
import sys
import sysconfig
from pathlib import Path

import core  # the user's own package, found first on sys.path (the working folder)

assert core.OWNER == "user", f"`import core` found {core.__file__}, not the user's package"
site_packages = Path(sysconfig.get_paths()["purelib"])
assert not (site_packages / "core").exists(), "the wheel installed a `core` folder"

import inference_safeguard  # noqa: E402
import langchain_safeguard  # noqa: E402
import llamaindex_safeguard  # noqa: E402
from inference_safeguard import GuardConfig, InferenceGuard  # noqa: E402
from inference_safeguard.scorers import KeywordCost  # noqa: E402
from inference_safeguard.testing import build_tiny_llama, build_tiny_tokenizer  # noqa: E402

for package in (inference_safeguard, langchain_safeguard, llamaindex_safeguard):
    assert Path(package.__file__).is_relative_to(site_packages), package.__file__
    assert (Path(package.__file__).parent / "py.typed").exists(), package.__name__
assert inference_safeguard.__version__ == importlib.metadata.version("inference-safeguard")
files = importlib.metadata.distribution("inference-safeguard").files or []
top_level = {f.parts[0] for f in files if f.suffix == ".py" and len(f.parts) > 1}
assert top_level == {"inference_safeguard", "langchain_safeguard", "llamaindex_safeguard"}, (
    top_level
)

tokenizer = build_tiny_tokenizer()
guard = InferenceGuard(
    build_tiny_llama(tokenizer),
    tokenizer,
    cost=KeywordCost(["garden"]),
    config=GuardConfig(
        budget=0.0, num_candidates=4, beam_width=2, block_size=4, max_new_tokens=8, seed=0
    ),
)
result = guard.generate("Tell me about the dog.")
assert result.safe or result.refused, result
assert "garden" not in result.text.lower() or result.refused

chat = langchain_safeguard.ChatSafeguard(guard=guard)
message = chat.invoke("Tell me about the dog.")
assert message.response_metadata["safety"]["budget"] == 0.0

llm = llamaindex_safeguard.SafeguardLLM(guard=guard)
completion = llm.complete("Tell me about the dog.")
assert completion.raw["safety"]["budget"] == 0.0

print(
    f"wheel ok: inference-safeguard {inference_safeguard.__version__} on Python "
    f"{sys.version.split()[0]}; guarded text {result.text!r}"
)
