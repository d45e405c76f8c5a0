"""`ScriptedGuard`: an InferenceGuard that answers from a script, for tests and offline
examples of what a capable model would do (call tools, answer in JSON).

Only the search is scripted. Everything after it is the real InferenceGuard: the cost
model scores the reply, and an over-budget reply is refused, returned flagged or
raised (`on_unsafe`), so scripted tool calls are held to the budget like any text.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core import GuardConfig, InferenceGuard
from core.decoder import Response, ToolsInput
from core.lm import EncodedPrompt, PromptInput
from core.scorers import CallableScorer, Scorer
from core.search import first_stop

Replies = Callable[[str], str] | Sequence[str]
"""A function from the prompt (as scorers see it: a `role: content` transcript) to the
reply, or replies to give in turn (the last one repeats)."""


class ScriptedGuard(InferenceGuard):
    """An `InferenceGuard` whose search returns scripted replies.

    Args:
        model: a causal LM (for tokenizing and the chat template; it generates nothing).
        tokenizer: its tokenizer, with a chat template for message prompts.
        replies: see `Replies`. Stop strings cut a reply; `max_new_tokens` does not.
        cost: cost model (default: every reply costs 0).
        reward: reward model, or None.
        config: default config.

    Attributes:
        search_sizes: prompts per search run, in order (one search per
            `generate_batch`, whatever its size); shared with copies of the guard.
        prompts: every prompt decoded, in order, as the model saw it; shared likewise.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        replies: Replies,
        cost: Scorer | None = None,
        reward: Scorer | None = None,
        config: GuardConfig | None = None,
    ) -> None:
        if cost is None:
            cost = CallableScorer(lambda prompts, responses: [0.0] * len(responses))
        super().__init__(model, tokenizer, cost=cost, reward=reward, config=config)
        if isinstance(replies, str) or not (callable(replies) or replies):
            raise ValueError("replies must be a function of the prompt or a non-empty list")
        self.replies = replies
        self.search_sizes: list[int] = []
        self.prompts: list[EncodedPrompt] = []
        self._turns = itertools.count()
        self._lock = threading.Lock()

    @property
    def searches(self) -> int:
        """How many searches ran."""
        return len(self.search_sizes)

    def _decode(
        self, prompts: list[EncodedPrompt], config: GuardConfig, seeds: list[int]
    ) -> list[Response]:
        with self._lock:
            self.search_sizes.append(len(prompts))
            self.prompts.extend(prompts)
            texts = [self._reply(prompt) for prompt in prompts]
        responses = []
        for text in texts:
            cut = first_stop(text, config.stop)
            text = text if cut is None else text[:cut]
            ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            responses.append(Response(token_ids=list(ids), text=text, finish_reason="stop"))
        return responses

    def _reply(self, prompt: EncodedPrompt) -> str:
        if callable(self.replies):
            return self.replies(prompt.text)
        return self.replies[min(next(self._turns), len(self.replies) - 1)]

    def stream(
        self, prompt: PromptInput, *, tools: ToolsInput = None, **overrides: Any
    ) -> Iterator[str]:
        """The checked reply, a word at a time (`last_result` is set before the first)."""
        result = self.generate(prompt, tools=tools, **overrides)
        yield from re.findall(r"\s*\S+|\s+", result.text)
