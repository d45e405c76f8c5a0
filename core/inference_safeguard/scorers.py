"""Cost and reward scorers: batched `(prompts, responses) -> scores` for the safe-decoding search.

A scorer maps a batch of `(prompt, response)` pairs to one float per pair: a tensor of
shape `(batch,)`, float64, on the CPU (float64 so that a cost meets the budget as the
scorer computed it, not rounded to float32). `prompts` are the user's prompts as plain
text (a message list is flattened to a `role: content` transcript by the caller, never
rendered with the base model's chat template); `responses` are possibly partial
responses. Each scorer applies its own model's format, and none modifies its inputs.

- `KeywordCost`, `RegexCost`: programmatic costs counted in the response (DeAL-style).
- `CallableScorer`: any Python function, batched or per pair.
- `ClassifierScorer`: an `AutoModelForSequenceClassification` reward or cost model
  (e.g. Beaver-style cost models, where higher means more unsafe).
- `GuardModelCost`: P(unsafe) read from a guard LLM's next-token distribution
  (Llama-Guard style).

Scorers defined in their own modules are importable from here too:
`LengthCost`, `RequiredKeywordsCost`, `KeywordReward`, `ShapeCost`
(`inference_safeguard.programmatic`), `ScorerSum`, `ScorerMax`
(`inference_safeguard.composite`), `ProvenanceCost` (`inference_safeguard.provenance`)
and `ConstitutionCost` (`inference_safeguard.constitution`).
"""

from __future__ import annotations

import inspect
import math
import re
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import import_module
from typing import TYPE_CHECKING, Any, ClassVar, Self, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from inference_safeguard.errors import (
    ChatTemplateError,
    CheckpointKindError,
    InvalidPromptError,
    ScorerOutputError,
)
from inference_safeguard.hf_compat import cache_keyword, output_cache
from inference_safeguard.kv_cache import is_full_attention_cache, repeat_rows
from inference_safeguard.loading import (
    CheckpointKind,
    DeviceMap,
    is_placed,
    load_pretrained,
    resolve_device,
)

if TYPE_CHECKING:
    from inference_safeguard.composite import ScorerMax, ScorerSum
    from inference_safeguard.constitution import ConstitutionCost
    from inference_safeguard.programmatic import (
        KeywordReward,
        LengthCost,
        RequiredKeywordsCost,
        ShapeCost,
    )
    from inference_safeguard.provenance import ProvenanceCost

__all__ = [
    "BEAVER_TEMPLATE",
    "CallableScorer",
    "ClassifierScorer",
    "ConstitutionCost",
    "GuardModelCost",
    "KeywordCost",
    "KeywordReward",
    "LengthCost",
    "ProvenanceCost",
    "RegexCost",
    "RequiredKeywordsCost",
    "Scorer",
    "ScorerMax",
    "ScorerSum",
    "ShapeCost",
]

_ELSEWHERE = {
    "ConstitutionCost": "inference_safeguard.constitution",
    "KeywordReward": "inference_safeguard.programmatic",
    "LengthCost": "inference_safeguard.programmatic",
    "ProvenanceCost": "inference_safeguard.provenance",
    "RequiredKeywordsCost": "inference_safeguard.programmatic",
    "ScorerMax": "inference_safeguard.composite",
    "ScorerSum": "inference_safeguard.composite",
    "ShapeCost": "inference_safeguard.programmatic",
}
"""Scorers defined in modules that import this one, re-exported on first access (an
import at the top would be circular)."""


def __getattr__(name: str) -> Any:
    if name in _ELSEWHERE:
        return getattr(import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


BEAVER_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"
"""Prompt format of the PKU-Alignment Beaver reward and cost models."""

_PLAIN_TEMPLATE = "{prompt}\n\n{response}"

_Pattern = str | re.Pattern[str]


class Scorer(ABC):
    """Batched scorer: `(prompts, responses) -> tensor (batch,)` float64 on CPU.

    Subclasses implement `_score`; `__call__` validates the inputs and the output, so
    every scorer fails the same clear way.
    """

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Score each `(prompts[i], responses[i])` pair.

        Args:
            prompts: `batch` prompts as plain text.
            responses: `batch` (possibly partial) responses.

        Returns:
            Scores of shape `(batch,)`, float64, on the CPU; `torch.empty(0)` for an
            empty batch.

        Raises:
            InvalidPromptError: the arguments are not sequences of str of equal length.
            ScorerOutputError: the scorer produced the wrong shape or non-finite values.
        """
        prompt_list = _as_str_list(prompts, "prompts")
        response_list = _as_str_list(responses, "responses")
        if len(prompt_list) != len(response_list):
            raise InvalidPromptError(
                f"{type(self).__name__} got {len(prompt_list)} prompts and "
                f"{len(response_list)} responses; pass one prompt per response (repeat a "
                "prompt for each of its candidate responses)."
            )
        if not prompt_list:
            return torch.empty(0, dtype=torch.float64)
        scores = self._score(prompt_list, response_list)
        return _check_scores(scores, len(prompt_list), type(self).__name__)

    @abstractmethod
    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Score a non-empty batch; returns a tensor of shape `(batch,)`."""


def _as_str_list(values: Sequence[str], name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise InvalidPromptError(
            f"{name} must be a sequence (list or tuple) of str, got {type(values).__name__}; "
            f"wrap a single item in a list: [{name[:-1]}]."
        )
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise InvalidPromptError(
                f"{name}[{index}] is a {type(value).__name__}, not a str; scorers take "
                "plain text (flatten a message list to a 'role: content' transcript)."
            )
    return list(values)


def _check_scores(scores: object, batch: int, owner: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise ScorerOutputError(
            f"{owner} returned a {type(scores).__name__}; expected a torch.Tensor of shape "
            f"({batch},)."
        )
    if scores.shape != (batch,):
        raise ScorerOutputError(
            f"{owner} returned scores of shape {tuple(scores.shape)} for a batch of {batch}; "
            f"expected shape ({batch},): one score per (prompt, response) pair."
        )
    scores = scores.detach().to(device="cpu", dtype=torch.float64)
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ScorerOutputError(
            f"{owner} returned non-finite scores (NaN or inf) at positions {bad}; a scorer "
            "must return finite floats."
        )
    return scores


def _check_weight(weight: float, owner: str, what: str = "weight") -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"{owner}: {what} must be a number, got {type(weight).__name__}.")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(
            f"{owner}: {what} must be a finite number >= 0, got {weight!r}; a cost never "
            "decreases as the response grows (use CallableScorer for signed scores)."
        )
    return float(weight)


class KeywordCost(Scorer):
    """Cost = `weight` * number of occurrences of the listed words in the response.

    Matching is case-insensitive and on whole words only (`cat` does not match
    `concatenate`); a phrase matches across any run of whitespace (`"ice cream"` matches
    `"Ice  cream"`). Overlapping keywords are counted once per position, preferring the
    longest (`"ice cream"` over `"ice"`). The prompt is ignored.

    Args:
        words: the words or phrases to count; a single str is one word or phrase.
        weight: cost per occurrence, >= 0.
    """

    def __init__(self, words: Iterable[str] | str, weight: float = 1.0) -> None:
        words = [words] if isinstance(words, str) else list(words)
        if not words:
            raise ValueError(
                "KeywordCost needs at least one word, e.g. KeywordCost(['bomb', 'poison'])."
            )
        cleaned: dict[str, str] = {}
        for index, word in enumerate(words):
            if not isinstance(word, str):
                raise TypeError(
                    f"KeywordCost: words[{index}] is a {type(word).__name__}; pass str words."
                )
            parts = word.split()
            if not parts:
                raise ValueError(
                    f"KeywordCost: words[{index}] is empty or whitespace; remove it from the list."
                )
            cleaned.setdefault(" ".join(parts).casefold(), r"\s+".join(map(re.escape, parts)))
        self.words = tuple(cleaned)
        self.weight = _check_weight(weight, "KeywordCost")
        # Longest first, so that a phrase wins over a word it starts with.
        alternatives = sorted(cleaned.values(), key=len, reverse=True)
        self._regex = re.compile(rf"(?<!\w)(?:{'|'.join(alternatives)})(?!\w)", re.IGNORECASE)

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` costs."""
        counts = [len(self._regex.findall(response)) for response in responses]
        return torch.tensor(counts, dtype=torch.float64) * self.weight


class RegexCost(Scorer):
    """Cost = sum over patterns of weight * number of non-overlapping matches in the response.

    Args:
        patterns: one pattern, a sequence of patterns (each weighted by `weight`), or a
            mapping `pattern -> weight`. Patterns may be str or compiled `re.Pattern`s.
        weight: weight of every pattern not given as a mapping, >= 0.
        flags: `re` flags for str patterns; compiled patterns keep their own flags.

    Patterns that match the empty string are rejected: they would count every position.
    The prompt is ignored.
    """

    def __init__(
        self,
        patterns: _Pattern | Sequence[_Pattern] | Mapping[_Pattern, float],
        weight: float = 1.0,
        flags: int | re.RegexFlag = re.IGNORECASE,
    ) -> None:
        if isinstance(patterns, (str, re.Pattern)):
            patterns = [patterns]
        if isinstance(patterns, Mapping):
            weighted = [
                (p, _check_weight(w, "RegexCost", f"weight of {p!r}")) for p, w in patterns.items()
            ]
        elif isinstance(patterns, Sequence):
            default = _check_weight(weight, "RegexCost")
            weighted = [(p, default) for p in patterns]
        else:
            raise TypeError(
                "RegexCost: patterns must be a str, a sequence of patterns or a mapping "
                f"pattern -> weight, got {type(patterns).__name__}."
            )
        if not weighted:
            raise ValueError("RegexCost needs at least one pattern, e.g. RegexCost(r'\\bkill\\b').")
        self.patterns = tuple((_compile(p, flags), w) for p, w in weighted)

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` costs."""
        costs = [
            sum(w * len(regex.findall(response)) for regex, w in self.patterns)
            for response in responses
        ]
        return torch.tensor(costs, dtype=torch.float64)


def _compile(pattern: str | re.Pattern[str], flags: int) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        regex = pattern
    elif isinstance(pattern, str):
        try:
            regex = re.compile(pattern, flags)
        except re.error as exc:
            raise ValueError(f"RegexCost: invalid regular expression {pattern!r}: {exc}.") from exc
    else:
        raise TypeError(
            f"RegexCost: pattern {pattern!r} is a {type(pattern).__name__}; pass str or re.Pattern."
        )
    if regex.fullmatch("") is not None:
        raise ValueError(
            f"RegexCost: pattern {regex.pattern!r} matches the empty string, so it would "
            "count every position; make it match at least one character."
        )
    return regex


class CallableScorer(Scorer):
    """Scores with a Python function.

    Args:
        fn: with `batched=True`, `fn(prompts, responses)` gets two lists of `batch` str
            and returns `batch` floats (sequence, numpy array or tensor); with
            `batched=False`, `fn(prompt, response) -> float` is called once per pair.
        batched: how `fn` is called.

    Raises (when called):
        ScorerOutputError: `fn` returned the wrong number of values, non-numeric values
            or non-finite ones.
    """

    def __init__(
        self,
        fn: Callable[[list[str], list[str]], Any] | Callable[[str, str], float],
        batched: bool = True,
    ) -> None:
        if not callable(fn):
            raise TypeError(
                f"CallableScorer needs a callable, got {type(fn).__name__}; pass a function "
                "fn(prompts, responses) -> scores, or fn(prompt, response) with batched=False."
            )
        # How `fn` is called depends on `batched`, which its type cannot carry.
        self.fn: Callable[..., Any] = fn
        self.batched = batched
        self._name = getattr(fn, "__qualname__", type(fn).__name__)

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` scores."""
        if self.batched:
            output = self.fn(list(prompts), list(responses))
            try:
                if isinstance(output, torch.Tensor):
                    return output.detach().to(device="cpu", dtype=torch.float64)
                return torch.as_tensor(output, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ScorerOutputError(
                    f"CallableScorer: {self._name} returned {type(output).__name__} that is "
                    f"not a sequence of floats ({exc}); return one float per pair."
                ) from exc
        values = []
        for index, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            value = self.fn(prompt, response)
            try:
                values.append(float(value))
            except (TypeError, ValueError) as exc:
                raise ScorerOutputError(
                    f"CallableScorer: {self._name} returned {value!r} for pair {index}; it "
                    "must return a float."
                ) from exc
        return torch.tensor(values, dtype=torch.float64)


def _check_template(template: str, owner: str) -> str:
    if not isinstance(template, str):
        raise TypeError(f"{owner}: template must be a str, got {type(template).__name__}.")
    hint = (
        "pass a format string with a {response} field and optionally {prompt}, e.g. "
        "template='User: {prompt}\\nAssistant: {response}' (write literal braces as {{ }})"
    )
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{owner}: template {template!r} is malformed ({exc}); {hint}.") from exc
    if "response" not in fields or not fields <= {"prompt", "response"}:
        raise ValueError(f"{owner}: template {template!r} has fields {sorted(fields)}; {hint}.")
    return template


def _has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _context_length(model: PreTrainedModel) -> int | None:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def _check_positive_int(value: int | None, owner: str, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}.")


class _ModelScorer(Scorer):
    """Shared plumbing of the scorers that run a Hugging Face model on rendered text."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    batch_size: int
    _pad_id: int
    _cache_keyword: str | None
    """How `model.forward` takes a KV cache when prompts share one; None: they do not."""

    _auto_class: ClassVar[type]
    """The transformers auto class `from_pretrained` loads the model with."""
    _checkpoint_kind: ClassVar[CheckpointKind]
    """The kind of checkpoint `from_pretrained` accepts."""

    @abstractmethod
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str | torch.device | None = None,
        **options: Any,
    ) -> None:
        """Every model scorer takes the model, its tokenizer, a device and its own options
        (what `from_pretrained` passes on)."""

    @abstractmethod
    def _render(self, prompt: str, response: str) -> str:
        """The model's input text for one pair."""

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: DeviceMap | None = None,
        trust_remote_code: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Self:
        """Load the tokenizer and the model (in eval mode) by hub name, local directory
        or `.gguf` file path.

        `device_map` (a string such as "auto", or a dict) shards a large model; with it,
        or with a quantized model (`model_kwargs={"quantization_config": ...}`), `device`
        is ignored and the model is never moved. `model_kwargs` and `tokenizer_kwargs`
        go to the `from_pretrained` of the model and the tokenizer (see
        `inference_safeguard.loading`). `kwargs` are the scorer's own options (see the
        class). Code shipped with the checkpoint runs only if you pass
        `trust_remote_code` as True.

        Raises:
            LoadOptionError: a device this machine lacks, or not a floating dtype.
            ModelLoadError: no such directory or hub name, or incomplete or corrupted files.
            CheckpointKindError: the checkpoint is of another kind (see the class), so
                part of the model would be randomly initialised.
        """
        device = resolve_device(device)
        model, tokenizer = load_pretrained(
            cls._auto_class,
            name_or_path,
            kind=cls._checkpoint_kind,
            owner=cls.__name__,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            model_kwargs=model_kwargs,
            tokenizer_kwargs=tokenizer_kwargs,
        )
        return cls(model, tokenizer, device=None if device_map is not None else device, **kwargs)

    @staticmethod
    def _prompt_cache_keyword(model: PreTrainedModel, enabled: bool) -> str | None:
        """The keyword that passes a KV cache to `model.forward` when prompts can share
        one (a decoder-only model that takes a cache), else None."""
        keyword = cache_keyword(model)
        decoder_only = not getattr(model.config, "is_encoder_decoder", False)
        return keyword if enabled and decoder_only else None

    def _prompt_cache_kwargs(self, cache: Any) -> dict[str, Any]:
        """The `model.forward` keywords that pass a shared prompt's KV cache."""
        if self._cache_keyword is None:
            raise RuntimeError(
                f"{type(self).__name__}: a prompt cache was built for a model that takes none"
            )
        return {self._cache_keyword: cache, "use_cache": True}

    def _prompt_cache(self, prefix: tuple[int, ...], rows: int) -> Any:
        """The KV cache of `prefix` run once, repeated for `rows` rows (None unless every
        layer of the model's cache is full attention: padding between the prefix and a
        sequence would take a sliding window's places, or run on through a recurrent
        state, so those models score whole sequences). The layout is the model's, so
        the first cache that is not full attention turns prompt sharing off for good:
        no later call runs a prefix only to throw its cache away."""
        prefix_ids = torch.tensor([prefix], dtype=torch.long, device=self.model.device)
        out = self.model(input_ids=prefix_ids, use_cache=True)
        cache = output_cache(out)
        if not is_full_attention_cache(cache):
            self._cache_keyword = None
            return None
        repeat_rows(cache, rows, 1)
        return cache

    def _place(self, model: PreTrainedModel, device: str | torch.device | None) -> None:
        device = resolve_device(device)
        if device is not None and not is_placed(model):
            # transformers wraps `to` with functools.wraps, whose typeshed stub binds no self.
            model.to(device)  # type: ignore[arg-type]
        self.model = model

    def _encode(self, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
        """Token ids per rendered text; an input that renders to no tokens is an error."""
        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        for index, ids in enumerate(encoded):
            if not ids:
                raise InvalidPromptError(
                    f"{type(self).__name__}: item {index} renders to no tokens; use a template "
                    "with text around {response} so that every input is non-empty."
                )
        return [list(ids) for ids in encoded]

    def _truncate(self, ids: list[int], limit: int | None) -> list[int]:
        """Keep the last `limit` tokens (and a leading BOS): the end decides the score."""
        if limit is None or len(ids) <= limit:
            return ids
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids[0] == bos and limit > 1:
            return [bos, *ids[len(ids) - limit + 1 :]]
        return ids[len(ids) - limit :]

    def _prompt_splits(
        self, prompts: list[str], encoded: list[list[int]], special: bool, limit: int | None
    ) -> dict[tuple[int, ...], list[tuple[int, list[int]]]]:
        """Rows whose token ids are the rendered prompt's ids then a suffix with a token
        that is not padding, grouped by prompt: `{prompt ids: [(row, suffix ids), ...]}`.

        Rows longer than `limit` (they need truncation) and rows whose tokens do not
        split at the response (a merge across the boundary) are left out: they run whole.
        """
        marker = "\x00response\x00"
        prefixes: dict[str, tuple[int, ...] | None] = {}
        splits: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for row, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
            if prompt not in prefixes:
                rendered = self._render(prompt, marker)
                head = rendered.split(marker)[0] if marker in rendered else ""
                prefixes[prompt] = (
                    tuple(self._encode([head], add_special_tokens=special)[0]) if head else None
                )
            prefix = prefixes[prompt]
            if (
                prefix is None
                or (limit is not None and len(ids) > limit)
                or tuple(ids[: len(prefix)]) != prefix
                # The model pools the last token that is not padding: keep one in the suffix.
                or all(t == self._pad_id for t in ids[len(prefix) :])
            ):
                continue
            splits.setdefault(prefix, []).append((row, ids[len(prefix) :]))
        return splits

    def _score_inputs(
        self,
        prompts: list[str],
        encoded: list[list[int]],
        special: bool,
        limit: int | None,
        run: Callable[[list[list[int]], tuple[int, ...]], torch.Tensor],
    ) -> torch.Tensor:
        """`(len(encoded),)` scores of encoded inputs, in chunks of `batch_size`.

        `run(sequences, prefix)` scores one chunk of `prefix + sequence` inputs. Rows that
        share a rendered prompt (see `_prompt_splits`) run as suffixes of it; the others
        run whole (`prefix == ()`), truncated to `limit`.
        """
        splits = (
            self._prompt_splits(prompts, encoded, special, limit) if self._cache_keyword else {}
        )
        shared = {row for group in splits.values() for row, _ in group}
        whole = [i for i in range(len(encoded)) if i not in shared]
        runs: list[tuple[list[int], list[list[int]], tuple[int, ...]]] = [
            (whole, [self._truncate(encoded[i], limit) for i in whole], ())
        ]
        for prefix, group in splits.items():
            runs.append(([row for row, _ in group], [suffix for _, suffix in group], prefix))
        scores = torch.empty(len(encoded), dtype=torch.float64)
        with torch.inference_mode():
            for rows, sequences, prefix in runs:
                for chunk in self._batches(sequences):
                    chunk_scores = run([sequences[i] for i in chunk], prefix)
                    scores[[rows[i] for i in chunk]] = chunk_scores.to(torch.float64)
        return scores

    def _batches(self, sequences: list[list[int]]) -> list[list[int]]:
        """Indices in chunks of `batch_size`, grouped by length to minimise padding."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _pad(
        self, sequences: list[list[int]], pad_id: int, side: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, attention_mask)`, each `(batch, max_len)`, on the model's device."""
        width = max(map(len, sequences))
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            span = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, span] = 1
        device = self.model.device
        return input_ids.to(device), attention_mask.to(device)


class ClassifierScorer(_ModelScorer):
    """Scores with an `AutoModelForSequenceClassification`: a reward model or a cost model.

    For Beaver-style cost models higher means more unsafe; use them as the cost. Inputs
    are rendered with `template`, tokenized, truncated from the left (the end of the
    response is kept) to `max_length` and the model's context window, and run in chunks
    of `batch_size` with right padding under `torch.inference_mode()`.

    Args:
        model: the classifier, used as is (in eval mode; see `from_pretrained`). If its
            config has no `pad_token_id`, it is set to the padding id used here so that
            the model pools the last non-pad token.
        tokenizer: its tokenizer; not modified (padding falls back to the EOS token).
        template: format string with `{response}` and optionally `{prompt}`, e.g.
            `BEAVER_TEMPLATE`. Default: the tokenizer's chat template with a user and an
            assistant message when it has one, else `"{prompt}\\n\\n{response}"`.
        label: which logit is the score, `0 <= label < num_labels`.
        output: `"logit"` for `logits[:, label]`, `"probability"` for
            `softmax(logits)[:, label]` (`sigmoid` when `num_labels == 1`).
        batch_size: pairs per forward pass.
        max_length: maximum tokens per input; default: the model's context window.
        device: moves the model there; default: leave it where it is.
        share_prompt_cache: for a decoder-only classifier, run each distinct rendered
            prompt once and reuse its KV cache for every response to it (a search scores
            many candidates of the same prompt). Inputs whose tokens do not split cleanly
            at the response (a merge across the boundary, truncation) run whole. The
            scores are those of the whole input up to float rounding.
    """

    _auto_class = AutoModelForSequenceClassification
    _checkpoint_kind = "sequence-classification"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        template: str | None = None,
        label: int = 0,
        output: str = "logit",
        batch_size: int = 16,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        share_prompt_cache: bool = True,
    ) -> None:
        if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
            raise CheckpointKindError(
                f"model is a {type(model).__name__}, a causal LM; ClassifierScorer needs a "
                "sequence classifier (AutoModelForSequenceClassification) with a trained "
                "score head. Use a causal LM as the base model or with GuardModelCost"
            )
        num_labels = model.config.num_labels
        if num_labels is None:
            raise CheckpointKindError(
                f"model is a {type(model).__name__} whose config has no labels (num_labels "
                "is None); ClassifierScorer needs a sequence classifier with a score head"
            )
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
            raise ValueError(
                f"ClassifierScorer: label={label!r} is out of range for a model with "
                f"{num_labels} label(s); pass an int in [0, {num_labels - 1}]."
            )
        if output not in ("logit", "probability"):
            raise ValueError(
                f"ClassifierScorer: output={output!r}; pass output='logit' or 'probability'."
            )
        _check_positive_int(batch_size, "ClassifierScorer", "batch_size")
        _check_positive_int(max_length, "ClassifierScorer", "max_length")
        text_config = model.config.get_text_config()
        pad_id = text_config.pad_token_id
        if pad_id is None:
            pad_id = (
                tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id
            )
            if pad_id is None:
                raise ValueError(
                    "ClassifierScorer: neither the model config nor the tokenizer defines a pad "
                    "or EOS token; set model.config.pad_token_id before building the scorer."
                )
            # Sequence-classification heads pool the last token that is not pad_token_id.
            text_config.pad_token_id = pad_id
        self._pad_id = pad_id
        self._place(model, device)
        self.tokenizer = tokenizer
        self.template = None if template is None else _check_template(template, "ClassifierScorer")
        self.label = label
        self.output = output
        self.batch_size = batch_size
        limits = [n for n in (max_length, _context_length(model)) if n is not None]
        self.max_length = min(limits) if limits else None
        parameters = inspect.signature(model.forward).parameters
        # Building a KV cache for a whole batch of inputs scored once is wasted memory.
        self._no_cache = {"use_cache": False} if "use_cache" in parameters else {}
        self._cache_keyword = self._prompt_cache_keyword(model, share_prompt_cache)

    def _render(self, prompt: str, response: str) -> str:
        if self.template is not None:
            return self.template.format(prompt=prompt, response=response)
        if _has_chat_template(self.tokenizer):
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            # With tokenize=False the template renders to a str; the stub unions every mode.
            return cast(str, self.tokenizer.apply_chat_template(messages, tokenize=False))
        return _PLAIN_TEMPLATE.format(prompt=prompt, response=response)

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` scores: the label's logit or probability."""
        texts = [self._render(p, r) for p, r in zip(prompts, responses, strict=True)]
        # A rendered chat template already holds its special tokens.
        special = not (self.template is None and _has_chat_template(self.tokenizer))
        encoded = self._encode(texts, add_special_tokens=special)
        return self._score_inputs(prompts, encoded, special, self.max_length, self._classify)

    def _classify(self, sequences: list[list[int]], prefix: tuple[int, ...] = ()) -> torch.Tensor:
        """`(len(sequences),)` scores of `prefix + sequence` inputs, right-padded, with
        `prefix` run once and its KV cache shared."""
        cache = self._prompt_cache(prefix, len(sequences)) if prefix else None
        if prefix and cache is None:
            sequences, prefix = [[*prefix, *ids] for ids in sequences], ()
        input_ids, attention_mask = self._pad(sequences, self._pad_id, "right")
        kwargs: dict[str, Any] = dict(self._no_cache)
        if cache is not None:
            prefix_mask = torch.ones(
                (len(sequences), len(prefix)), dtype=torch.long, device=input_ids.device
            )
            attention_mask = torch.cat([prefix_mask, attention_mask], dim=-1)
            kwargs = self._prompt_cache_kwargs(cache)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return self._label_scores(out.logits)

    def _label_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """`(batch,)` float scores on the CPU from `(batch, num_labels)` logits."""
        logits = logits.float()
        if self.output == "logit":
            chunk = logits[:, self.label]
        elif logits.shape[-1] == 1:
            chunk = torch.sigmoid(logits[:, 0])
        else:
            chunk = torch.softmax(logits, dim=-1)[:, self.label]
        return chunk.cpu()


class GuardModelCost(_ModelScorer):
    """Cost = P(unsafe) from a guard LLM's next-token distribution (Llama-Guard style).

    The pair is rendered as a conversation `[user: prompt, assistant: response]` with the
    tokenizer's chat template (`add_generation_prompt=True`), or with `template`; the
    guard's next-token logits are read at the end and renormalised over the two verdict
    tokens: `softmax([logit_safe, logit_unsafe])[1]`, in `[0, 1]`.

    Verdict tokens: words are encoded without special tokens; if the two encodings share
    leading tokens, those are appended to every input and the first tokens where they
    differ are compared. Explicit int token ids are used as given.

    Inputs are truncated from the left to the model's context window and run in chunks of
    `batch_size` with left padding, one forward pass each.

    Args:
        model: the guard, a causal LM, used as is (in eval mode; see `from_pretrained`).
        tokenizer: its tokenizer; not modified.
        unsafe_token: the word (or token id) the guard emits for an unsafe conversation.
        safe_token: the word (or token id) for a safe one.
        template: format string with `{response}` and optionally `{prompt}` that renders
            the whole guard input, up to where the verdict follows. Default: the
            tokenizer's chat template.
        batch_size: pairs per forward pass.
        device: moves the model there; default: leave it where it is.
        share_prompt_cache: run each distinct rendered prompt (with the guard's policy
            text around it) once and reuse its KV cache for every response to it; inputs
            that do not split cleanly at the response run whole. The probabilities are
            those of the whole input up to float rounding.

    Raises:
        ChatTemplateError: no `template` and the tokenizer has no chat template.
    """

    _auto_class = AutoModelForCausalLM
    _checkpoint_kind = "causal-lm"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        unsafe_token: str | int = "unsafe",
        safe_token: str | int = "safe",
        template: str | None = None,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        share_prompt_cache: bool = True,
    ) -> None:
        if template is None and not _has_chat_template(tokenizer):
            raise ChatTemplateError(
                "GuardModelCost: the tokenizer has no chat template to render the guard's "
                "input; pass the guard's prompt format, e.g. template='<task>...User: {prompt}"
                "\\nAgent: {response}\\n...</task>\\nVerdict:'."
            )
        _check_positive_int(batch_size, "GuardModelCost", "batch_size")
        self.template = None if template is None else _check_template(template, "GuardModelCost")
        self._place(model, device)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._shared_prefix, safe_id, unsafe_id = self._verdict_ids(safe_token, unsafe_token)
        self.verdict_token_ids = (safe_id, unsafe_id)
        pad_id = tokenizer.pad_token_id
        self._pad_id = pad_id if pad_id is not None else (tokenizer.eos_token_id or 0)
        accepted = inspect.signature(model.forward).parameters
        # Only the last position's logits are needed: skip the LM head everywhere else.
        self._forward_kwargs = {
            name: value
            for name, value in (("logits_to_keep", 1), ("use_cache", False))
            if name in accepted
        }
        self._takes_position_ids = "position_ids" in accepted
        # Responses after a shared prompt are left-padded, so their positions must be given.
        self._cache_keyword = self._prompt_cache_keyword(
            model, share_prompt_cache and self._takes_position_ids
        )

    def _verdict_ids(self, safe: str | int, unsafe: str | int) -> tuple[list[int], int, int]:
        """`(shared_prefix, safe_id, unsafe_id)` for the two verdict tokens."""
        vocab_size = self.model.config.get_text_config().vocab_size
        encoded = []
        for name, token in (("safe_token", safe), ("unsafe_token", unsafe)):
            if isinstance(token, bool) or not isinstance(token, (int, str)):
                raise TypeError(f"GuardModelCost: {name} must be a str or an int token id.")
            if isinstance(token, int):
                if not 0 <= token < vocab_size:
                    raise ValueError(
                        f"GuardModelCost: {name}={token} is not a token id of a model with "
                        f"vocab_size {vocab_size}."
                    )
                encoded.append([token])
            else:
                ids = self.tokenizer.encode(token, add_special_tokens=False)
                if not ids:
                    raise ValueError(
                        f"GuardModelCost: {name}={token!r} encodes to no tokens; pass the "
                        "guard's verdict word or its token id."
                    )
                encoded.append(ids)
        safe_ids, unsafe_ids = encoded
        shortest = min(len(safe_ids), len(unsafe_ids))
        shared = 0
        if isinstance(safe, str) and isinstance(unsafe, str):
            while shared < shortest and safe_ids[shared] == unsafe_ids[shared]:
                shared += 1
        if shared == shortest or safe_ids[shared] == unsafe_ids[shared]:
            raise ValueError(
                f"GuardModelCost: safe_token={safe!r} and unsafe_token={unsafe!r} do not "
                "differ in a token the guard could emit next; pass distinct words or token ids."
            )
        return list(safe_ids[:shared]), safe_ids[shared], unsafe_ids[shared]

    def _render(self, prompt: str, response: str) -> str:
        if self.template is not None:
            return self.template.format(prompt=prompt, response=response)
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
        # With tokenize=False the template renders to a str; the stub unions every mode.
        return cast(
            str,
            self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            ),
        )

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` probabilities that the guard's verdict is unsafe."""
        texts = [self._render(p, r) for p, r in zip(prompts, responses, strict=True)]
        special = self.template is not None
        encoded = [
            ids + self._shared_prefix for ids in self._encode(texts, add_special_tokens=special)
        ]
        return self._score_inputs(
            prompts, encoded, special, _context_length(self.model), self._unsafe_probability
        )

    def _unsafe_probability(
        self, sequences: list[list[int]], prefix: tuple[int, ...] = ()
    ) -> torch.Tensor:
        """`(len(sequences),)` P(unsafe) of `prefix + sequence` inputs, left-padded, with
        `prefix` run once and its KV cache shared."""
        cache = self._prompt_cache(prefix, len(sequences)) if prefix else None
        if prefix and cache is None:
            sequences, prefix = [[*prefix, *ids] for ids in sequences], ()
        input_ids, attention_mask = self._pad(sequences, self._pad_id, "left")
        kwargs: dict[str, Any] = dict(self._forward_kwargs)
        if self._takes_position_ids:
            # Left padding must not shift the positions of the real tokens.
            kwargs["position_ids"] = len(prefix) + (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if cache is not None:
            prefix_mask = torch.ones(
                (len(sequences), len(prefix)), dtype=torch.long, device=input_ids.device
            )
            attention_mask = torch.cat([prefix_mask, attention_mask], dim=-1)
            kwargs.update(self._prompt_cache_kwargs(cache))
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        verdict_ids = torch.tensor(self.verdict_token_ids, device=logits.device)
        verdict = torch.softmax(logits[:, -1, :].index_select(-1, verdict_ids).float(), dim=-1)
        return verdict[:, 1].cpu()
