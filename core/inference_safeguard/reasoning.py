"""Reasoning ("thinking") text of a response, told apart from its answer.

Thinking models (Qwen3, DeepSeek-R1, SmolLM3, ...) write their reasoning between
markers, `<think>...</think>`, before the answer; some chat templates open the section
in the generation prompt, so that the response holds only its end. The guard holds all
of it to the budget (the cost model scores the whole response, reasoning included:
safety covers everything the model writes) and returns the reasoning apart from the
answer (`GuardResult.reasoning`, `GuardResult.text`).

Markers: the first known pair that the tokenizer knows (as added tokens, or as text its
chat template holds); a tokenizer with none splits nothing. A reasoning
section that never closes (the response hit `max_new_tokens` or a stop string while
thinking) is all reasoning and no answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

KNOWN_MARKERS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("<thinking>", "</thinking>"),
    ("<reasoning>", "</reasoning>"),
)
"""Reasoning markers that chat templates use, in order of preference."""


@dataclass(frozen=True)
class ReasoningMarkers:
    """The markers around a model's reasoning.

    Attributes:
        open: text that starts the reasoning, e.g. `<think>`.
        close: text that ends it, e.g. `</think>`.
    """

    open: str
    close: str

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> ReasoningMarkers | None:
        """The markers `tokenizer` (its added tokens or chat template) knows, or None."""
        template = getattr(tokenizer, "chat_template", None) or ""
        sources = "\0".join(template.values() if isinstance(template, Mapping) else [template])
        added = {token.content for token in tokenizer.added_tokens_decoder.values()}
        for start, end in KNOWN_MARKERS:
            if any(marker in added or marker in sources for marker in (start, end)):
                return cls(start, end)
        return None

    def opened_by(self, prompt_text: str) -> bool:
        """Whether a prompt (as rendered) ends by opening the reasoning, so that the
        response starts inside it."""
        return prompt_text.rstrip().endswith(self.open)

    def split(self, text: str, *, opened: bool = False) -> tuple[str | None, str]:
        """`(reasoning, answer)` of a whole response; reasoning is None when there is none.

        Args:
            text: the response.
            opened: the prompt opened the reasoning (see `opened_by`).
        """
        body = self._body(text, opened)
        if body is None:
            return None, text
        reasoning, closed, answer = body.partition(self.close)
        return reasoning.strip(), answer.lstrip() if closed else ""

    def settled_answer(self, text: str, *, opened: bool = False) -> str:
        """The answer part of a response still being written: only text that stays the
        start of its final answer (nothing while it may still open or be in reasoning)."""
        lead = text.lstrip()
        if not opened and self.open.startswith(lead) and lead != self.open:
            return ""  # nothing yet, or what may still become the opening marker
        body = self._body(text, opened)
        if body is None:
            return text
        _, closed, answer = body.partition(self.close)
        return answer.lstrip() if closed else ""

    def _body(self, text: str, opened: bool) -> str | None:
        """The response from the start of its reasoning on, or None without reasoning."""
        if opened:
            return text
        lead = text.lstrip()
        return lead[len(self.open) :] if lead.startswith(self.open) else None
