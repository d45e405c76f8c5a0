"""Programmatic constraints as costs and rewards (DeAL): length, required keywords, shape.

DeAL (Huang et al., "DeAL: Decoding-time Alignment for Large Language Models", 2024)
writes alignment objectives as programs over the text; here each is a `Scorer`, so it
composes with model costs (see `inference_safeguard.composite`) and the search uses it
like any other cost or reward. Forbidden keywords are `KeywordCost`.

**Prefixes.** The search scores partial responses, and a cost must not penalise a prefix
for what it may still add: each cost here is, on a prefix, a lower bound of the cost of
every response that extends it (0 where the constraint can still be met), and
`score_complete` gives the cost of a response known to be finished. Each class says
what it charges a prefix:

- `LengthCost`: too long is charged at once (a prefix over the maximum stays over); too
  short only by `score_complete`.
- `RequiredKeywordsCost`: 0 on every prefix; `score_complete` counts the missing ones.
  `KeywordReward` steers the search towards them meanwhile.
- `ShapeCost`: charged as soon as the prefix can no longer be extended to match the
  regex or JSON schema (checked with llguidance); `score_complete` also charges a
  response that stopped before the shape was complete.
"""

from __future__ import annotations

import json
import re
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper
from transformers import PreTrainedTokenizerBase

from inference_safeguard.errors import InvalidPromptError
from inference_safeguard.scorer_spec import parse_spec, spec_float, spec_int, spec_list
from inference_safeguard.scorers import Scorer, _as_str_list, _check_scores, _check_weight

__all__ = [
    "ConstraintScorer",
    "KeywordReward",
    "LengthCost",
    "RequiredKeywordsCost",
    "ShapeCost",
    "score_complete",
]


class ConstraintScorer(Scorer):
    """A scorer that knows the difference between a prefix and a finished response.

    `scorer(prompts, responses)` scores prefixes (what the search calls at each block);
    `scorer.score_complete(prompts, responses)` scores finished responses (what a final
    check or an evaluation calls). On a prefix the cost is a lower bound of the cost of
    any response that extends it.
    """

    def score_complete(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Score each finished `(prompts[i], responses[i])` pair.

        Returns:
            Scores of shape `(batch,)`, float64, on the CPU.

        Raises:
            InvalidPromptError: the arguments are not sequences of str of equal length.
        """
        prompt_list = _as_str_list(prompts, "prompts")
        response_list = _as_str_list(responses, "responses")
        if len(prompt_list) != len(response_list):
            raise InvalidPromptError(
                f"{type(self).__name__} got {len(prompt_list)} prompts and "
                f"{len(response_list)} responses; pass one prompt per response."
            )
        if not prompt_list:
            return torch.empty(0, dtype=torch.float64)
        scores = self._score_complete(prompt_list, response_list)
        return _check_scores(scores, len(prompt_list), type(self).__name__)

    @abstractmethod
    def _score_complete(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Score a non-empty batch of finished responses; returns `(batch,)`."""


def score_complete(
    scorer: Scorer, prompts: Sequence[str], responses: Sequence[str]
) -> torch.Tensor:
    """`(batch,)` scores of finished responses: `scorer.score_complete` where the scorer
    has one (a `ConstraintScorer` or a composite), else `scorer(prompts, responses)`."""
    if isinstance(scorer, ConstraintScorer):
        return scorer.score_complete(prompts, responses)
    return scorer(prompts, responses)


def _keyword_regex(word: str, owner: str, index: int) -> re.Pattern[str]:
    """Whole-word, case-insensitive regex of a word or phrase (any whitespace inside)."""
    if not isinstance(word, str):
        raise TypeError(f"{owner}: words[{index}] is a {type(word).__name__}; pass str words.")
    parts = word.split()
    if not parts:
        raise ValueError(f"{owner}: words[{index}] is empty or whitespace; remove it.")
    phrase = r"\s+".join(map(re.escape, parts))
    return re.compile(rf"(?<!\w){phrase}(?!\w)", re.IGNORECASE)


def _keyword_regexes(words: Iterable[str] | str, owner: str) -> dict[str, re.Pattern[str]]:
    words = [words] if isinstance(words, str) else list(words)
    if not words:
        raise ValueError(f"{owner} needs at least one word, e.g. {owner}(['Paris', 'Seine']).")
    regexes: dict[str, re.Pattern[str]] = {}
    for index, word in enumerate(words):
        regex = _keyword_regex(word, owner, index)
        regexes.setdefault(" ".join(word.split()).casefold(), regex)
    return regexes


class KeywordReward(Scorer):
    """Reward = `weight` * number of distinct listed words present in the response.

    Matching is as in `KeywordCost` (case-insensitive, whole words, a phrase across any
    whitespace); each word counts once however often it occurs. On a prefix it counts
    what is there so far, which is what a reward that steers the search should do.

    Args:
        words: the words or phrases the response should contain.
        weight: reward per word present, >= 0.
    """

    def __init__(self, words: Iterable[str] | str, weight: float = 1.0) -> None:
        self._regexes = _keyword_regexes(words, "KeywordReward")
        self.words = tuple(self._regexes)
        self.weight = _check_weight(weight, "KeywordReward")

    @classmethod
    def from_spec(cls, spec: str) -> KeywordReward:
        """From `"words=Paris,Seine;weight=1"` (see `inference_safeguard.scorer_spec`)."""
        options = parse_spec(spec, cls.__name__, {"words", "weight"})
        return cls(
            spec_list(options.get("words", "")), spec_float(options, "weight", cls.__name__, 1.0)
        )

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` rewards."""
        present = [sum(1 for r in self._regexes.values() if r.search(t)) for t in responses]
        return torch.tensor(present, dtype=torch.float64) * self.weight


class RequiredKeywordsCost(ConstraintScorer):
    """Cost = `weight` * number of listed words a finished response lacks.

    Prefix semantics: every prefix costs 0, since a missing word may still come; only
    `score_complete` charges the missing ones. Pair it with `KeywordReward` on the same
    words so that the search seeks them before the end. Matching is as in `KeywordCost`.

    Args:
        words: the words or phrases every response must contain.
        weight: cost per missing word, >= 0.
    """

    def __init__(self, words: Iterable[str] | str, weight: float = 1.0) -> None:
        self._regexes = _keyword_regexes(words, "RequiredKeywordsCost")
        self.words = tuple(self._regexes)
        self.weight = _check_weight(weight, "RequiredKeywordsCost")

    @classmethod
    def from_spec(cls, spec: str) -> RequiredKeywordsCost:
        """From `"words=Paris,Seine;weight=1"` (see `inference_safeguard.scorer_spec`)."""
        options = parse_spec(spec, cls.__name__, {"words", "weight"})
        return cls(
            spec_list(options.get("words", "")), spec_float(options, "weight", cls.__name__, 1.0)
        )

    def missing(self, response: str) -> list[str]:
        """The listed words (normalised: casefolded, single spaces) `response` lacks."""
        return [word for word, regex in self._regexes.items() if not regex.search(response)]

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` zeros: a prefix may still add every missing word."""
        return torch.zeros(len(responses), dtype=torch.float64)

    def _score_complete(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` costs: missing words times the weight."""
        counts = [len(self.missing(response)) for response in responses]
        return torch.tensor(counts, dtype=torch.float64) * self.weight


class LengthCost(ConstraintScorer):
    """Cost = `weight` * how far the response's length is outside `[min_length, max_length]`.

    Length is counted in words (runs of non-whitespace characters) or, with `tokenizer`,
    in that tokenizer's tokens of the text (no special tokens). A prefix is charged
    `weight * max(0, length - max_length)` at once: appending text never lowers a word
    count, so a prefix over the maximum stays over. Being too short,
    `weight * max(0, min_length - length)`, is charged only by `score_complete`. (Token
    counts re-encode the text, and a merge across the end of a prefix can lower them by a
    token; count words where that matters.)

    Args:
        max_length: the most words (tokens) allowed; None for no maximum.
        min_length: the fewest words (tokens) a finished response needs; None for none.
        tokenizer: count this tokenizer's tokens instead of words.
        weight: cost per word (token) outside the range, >= 0.
    """

    def __init__(
        self,
        max_length: int | None = None,
        min_length: int | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        weight: float = 1.0,
    ) -> None:
        for name, value in (("max_length", max_length), ("min_length", min_length)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"LengthCost: {name} must be an int >= 0 or None, got {value!r}.")
        if max_length is None and min_length is None:
            raise ValueError(
                "LengthCost needs max_length, min_length or both, e.g. LengthCost(max_length=60)."
            )
        if max_length is not None and min_length is not None and min_length > max_length:
            raise ValueError(
                f"LengthCost: min_length={min_length} is above max_length={max_length}; no "
                "response could meet both."
            )
        self.max_length = max_length
        self.min_length = min_length
        self.tokenizer = tokenizer
        self.weight = _check_weight(weight, "LengthCost")

    @classmethod
    def from_spec(cls, spec: str) -> LengthCost:
        """From `"max_words=60;min_words=10;weight=1"` (word counts; see
        `inference_safeguard.scorer_spec`)."""
        owner = cls.__name__
        options = parse_spec(spec, owner, {"max_words", "min_words", "weight"})
        return cls(
            spec_int(options, "max_words", owner),
            spec_int(options, "min_words", owner),
            weight=spec_float(options, "weight", owner, 1.0),
        )

    def lengths(self, responses: Sequence[str]) -> list[int]:
        """The length of each response, in words or the tokenizer's tokens."""
        if self.tokenizer is None:
            return [len(response.split()) for response in responses]
        encoded = self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def _over(self, lengths: list[int]) -> torch.Tensor:
        limit = self.max_length
        return torch.tensor(
            [0 if limit is None else max(0, n - limit) for n in lengths], dtype=torch.float64
        )

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` costs of being over the maximum."""
        return self._over(self.lengths(responses)) * self.weight

    def _score_complete(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` costs of being over the maximum or under the minimum."""
        lengths = self.lengths(responses)
        floor = self.min_length
        under = torch.tensor(
            [0 if floor is None else max(0, floor - n) for n in lengths], dtype=torch.float64
        )
        return (self._over(lengths) + under) * self.weight


class _ByteTokenizer:
    """A tokenizer whose tokens are the 256 bytes (and an end token, id 256), so that
    llguidance checks text against a grammar byte by byte, whatever model wrote it."""

    def __init__(self) -> None:
        self.eos_token_id = 256
        self.bos_token_id = None
        self.tokens = [bytes([i]) for i in range(256)] + [b"<end>"]
        self.special_token_ids = [256]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)


@cache
def _byte_tokenizer() -> LLTokenizer:
    return LLTokenizer(TokenizerWrapper(_ByteTokenizer()), slices=[])


class ShapeCost(ConstraintScorer):
    """Cost = `weight` when the response cannot match a regex or a JSON schema.

    The response (with leading whitespace removed: models often open with a space or a
    newline) is fed byte by byte to an llguidance matcher of the shape. A prefix costs
    `weight` as soon as no continuation of it can match, else 0; `score_complete` also
    charges a response that stopped before the shape was complete. Build it with
    `ShapeCost.regex(...)` or `ShapeCost.json_schema(...)`.

    Args:
        grammar: an llguidance grammar (see `llguidance.grammar_from`).
        description: what the shape is, for messages.
        weight: cost of a response off the shape, >= 0.

    Raises:
        ValueError: the grammar does not compile.
    """

    def __init__(self, grammar: str, description: str, weight: float = 1.0) -> None:
        error = LLMatcher.validate_grammar(grammar, _byte_tokenizer())
        if error:
            raise ValueError(f"ShapeCost: cannot build {description}: {error.splitlines()[0]}.")
        self.grammar = grammar
        self.description = description
        self.weight = _check_weight(weight, "ShapeCost")
        self._start = LLMatcher(_byte_tokenizer(), grammar, log_level=0)

    @classmethod
    def regex(cls, pattern: str, weight: float = 1.0) -> ShapeCost:
        """The whole response must match `pattern` (Rust `regex` syntax, anchored at both
        ends)."""
        if not isinstance(pattern, str):
            raise TypeError(
                f"ShapeCost.regex: pattern must be a str, got {type(pattern).__name__}."
            )
        return cls(LLMatcher.grammar_from_regex(pattern), f"the regex {pattern!r}", weight)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str, weight: float = 1.0) -> ShapeCost:
        """The response must be one JSON value valid under `schema` (a dict or its JSON
        text)."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"ShapeCost.json_schema: the schema is not valid JSON ({exc})."
            ) from exc
        if not isinstance(parsed, dict):
            raise ValueError("ShapeCost.json_schema: the schema must be a JSON object.")
        return cls(LLMatcher.grammar_from_json_schema(text), "a JSON schema", weight)

    @classmethod
    def from_spec(cls, spec: str) -> ShapeCost:
        """From `"regex=PATTERN"` or `"json_schema=PATH.json"`, with `;weight=W` (see
        `inference_safeguard.scorer_spec`; a regex cannot hold `;` here)."""
        owner = cls.__name__
        options = parse_spec(spec, owner, {"regex", "json_schema", "weight"})
        weight = spec_float(options, "weight", owner, 1.0)
        if ("regex" in options) == ("json_schema" in options):
            raise ValueError(f"{owner}.from_spec: give exactly one of regex=... or json_schema=...")
        if "regex" in options:
            return cls.regex(options["regex"], weight)
        path = Path(options["json_schema"])
        if not path.is_file():
            raise FileNotFoundError(f"{owner}.from_spec: no schema file at {path}.")
        return cls.json_schema(path.read_text(encoding="utf-8"), weight)

    def _viability(self, response: str) -> tuple[bool, bool]:
        """`(can still match, matches now)` for one response."""
        matcher = self._start.deep_copy()
        data = list(response.lstrip().encode("utf-8"))
        viable = matcher.try_consume_tokens(data) == len(data) and not matcher.is_error()
        return viable, viable and matcher.is_accepting()

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` costs: `weight` where no continuation can match."""
        dead = [not self._viability(response)[0] for response in responses]
        return torch.tensor(dead, dtype=torch.float64) * self.weight

    def _score_complete(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` costs: `weight` where the response does not match."""
        off = [not self._viability(response)[1] for response in responses]
        return torch.tensor(off, dtype=torch.float64) * self.weight
