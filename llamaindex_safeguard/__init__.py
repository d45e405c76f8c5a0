"""LlamaIndex integration: `SafeguardLLM`, an almost-surely-safe LLM for query engines,
chat engines and agents.

`SafeguardLLM` implements LlamaIndex's function-calling LLM interface on top of a
`inference_safeguard` decoder (`InferenceGuard` or a baseline): completion and chat, streaming and
real async (the search runs in a worker thread, deltas arrive as they are committed),
tool calling with the tool rendering and parsing of `inference_safeguard.tools` (a required
call and structured output enforced by grammar), and the safety
record of every response in `raw["safety"]` and `additional_kwargs["safety"]`.
Query and chat engine responses carry it in `response.metadata["safety"]` (see
`SafetyRecordHandler`).

Install with `pip install "inference-safeguard[llamaindex]"`.
"""

from __future__ import annotations

from inference_safeguard.extras import import_extra

import_extra("llama_index.core", extra="llamaindex", needed_by="llamaindex_safeguard")

from llamaindex_safeguard.llm import SafeguardLLM
from llamaindex_safeguard.messages import (
    to_guard_messages,
    to_tool_selections,
    to_tool_specs,
)
from llamaindex_safeguard.records import SafetyRecordHandler, install_safety_record_handler
from llamaindex_safeguard.structured import StructuredOutputError, StructuredOutputRefusedError

__all__ = [
    "SafeguardLLM",
    "SafetyRecordHandler",
    "StructuredOutputError",
    "StructuredOutputRefusedError",
    "install_safety_record_handler",
    "to_guard_messages",
    "to_tool_selections",
    "to_tool_specs",
]
