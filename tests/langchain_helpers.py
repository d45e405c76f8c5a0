"""Test doubles for the LangChain integration tests: a callback recorder and a search counter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from inference_safeguard import InferenceGuard
from inference_safeguard.search import RunningSearch


class RecordingHandler(BaseCallbackHandler):
    """Records what LangChain reports to callbacks: new tokens, errors, ends, options."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.errors: list[BaseException] = []
        self.ends: list[Any] = []
        self.options: list[dict[str, Any]] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.options.append(kwargs.get("options") or {})

    def on_llm_start(self, serialized: Any, prompts: Any, **kwargs: Any) -> None:
        self.options.append(kwargs.get("options") or {})

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self.errors.append(error)

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.ends.append(response)


def count_searches(guard: InferenceGuard, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the guard's block searches (one per batch of prompts), whether a call runs
    its own or its engine runs it (a request joining the engine's search counts as
    one): returns a list that gets the number of prompts of each search appended."""
    searches: list[int] = []
    run: Callable[..., Any] = guard.search.run
    add = RunningSearch.add

    def counted(prompts: Any, *args: Any, **kwargs: Any) -> Any:
        searches.append(len(prompts))
        return run(prompts, *args, **kwargs)

    def counted_add(running: RunningSearch, prompts: Any, *args: Any, **kwargs: Any) -> Any:
        if running.search is guard.search:
            searches.append(len(prompts))
        return add(running, prompts, *args, **kwargs)

    monkeypatch.setattr(guard.search, "run", counted)
    monkeypatch.setattr(RunningSearch, "add", counted_add)
    return searches
