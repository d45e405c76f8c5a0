"""Test doubles for the LlamaIndex integration tests: a decoder that answers from a script."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core import GuardConfig, InferenceGuard
from core.decoder import Response, ToolsInput
from core.lm import EncodedPrompt, PromptInput
from core.scorers import KeywordCost, Scorer


class ScriptedDecoder(InferenceGuard):
    """Answers each prompt with the next scripted text instead of searching, through the
    rest of InferenceGuard's pipeline: prompt encoding with tools, the final cost check,
    refusal of over-budget answers, the safety record.

    Attributes:
        script: texts still to answer with, in order.
        prompts: every prompt it decoded, rendered (chat template, tools) and
            detokenized with special tokens kept.
        stream_piece: characters per delta when streaming.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        script: Sequence[str],
        *,
        cost: Scorer | None = None,
        config: GuardConfig | None = None,
        stream_piece: int = 4,
    ) -> None:
        super().__init__(model, tokenizer, cost=cost or KeywordCost(["unused"]), config=config)
        self.script = list(script)
        self.prompts: list[str] = []
        self.stream_piece = stream_piece

    def _decode(
        self, prompts: list[EncodedPrompt], config: GuardConfig, seeds: list[int]
    ) -> list[Response]:
        responses = []
        for prompt in prompts:
            self.prompts.append(self.lm.tokenizer.decode(prompt.ids))
            if not self.script:
                raise AssertionError("the script ran out: the model was called more than expected")
            text = self.script.pop(0)
            ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            responses.append(Response(token_ids=list(ids), text=text, finish_reason="stop"))
        return responses

    def stream(
        self, prompt: PromptInput, *, tools: ToolsInput = None, **overrides: Any
    ) -> Iterator[str]:
        """The scripted answer (or the refusal) in pieces of `stream_piece` characters."""
        result = self.generate(prompt, tools=tools, **overrides)
        for start in range(0, len(result.text), self.stream_piece):
            yield result.text[start : start + self.stream_piece]
