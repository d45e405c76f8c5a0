"""LangChain integration of Safeguard: InferenceGuard's almost-surely-safe decoding of
local Hugging Face models as a LangChain chat model and text-completion model.

- `ChatSafeguard` (`BaseChatModel`): chat messages, streaming, real async, batching in
  one search, tool calling and structured output, usage and safety metadata.
- `SafeguardLLM` (`BaseLLM`): plain-text completion with the same decoding.

Both take a built `InferenceGuard` (`guard=`) or load a model by name (`model=`, or
`from_model_id(...)`); `clear_model_cache()` forgets the models loaded by name.

Install with `pip install "inference-safeguard[langchain]"`.
"""

from inference_safeguard.extras import import_extra

import_extra("langchain_core", extra="langchain", needed_by="langchain_safeguard")

from langchain_safeguard._loading import clear_model_cache
from langchain_safeguard.chat_models import ChatSafeguard
from langchain_safeguard.llms import SafeguardLLM

__all__ = ["ChatSafeguard", "SafeguardLLM", "clear_model_cache"]
