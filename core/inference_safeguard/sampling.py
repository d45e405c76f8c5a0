"""Next-token sampling: logits processors, per-prompt seeded samplers, and the
sampling settings a model's generation_config ships.

Each prompt owns a `torch.Generator`, so the tokens drawn for a prompt depend only on
its seed and its own rows: a prompt decodes the same alone or in a batch. (A
counter-based hash of (seed, draw, row, token) in torch ops would draw a whole batch in
one call, but on a CPU it costs 3-9x what the generators' `torch.rand` does:
benchmarks/NOTES.md.)

Order, as in transformers: the repetition penalty on the model's logits (also when
decoding greedily), then temperature, top-k, top-p and min-p.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from inference_safeguard.config import SAMPLING_DEFAULTS, GuardConfig


@dataclass(frozen=True)
class SamplingSettings:
    """The sampling fields of a `GuardConfig`, every one set.

    Attributes:
        temperature: 0 decodes greedily.
        top_k: 0 keeps every token.
        top_p: 1 keeps every token.
        min_p: 0 keeps every token.
        repetition_penalty: 1 changes nothing.
    """

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float

    @classmethod
    def of(cls, config: GuardConfig) -> SamplingSettings:
        """`config`'s settings; fields it leaves unset (None) take `SAMPLING_DEFAULTS`
        (a decoder has already filled them from the model's generation_config)."""

        def value(name: str) -> Any:
            given = getattr(config, name)
            return SAMPLING_DEFAULTS[name] if given is None else given

        return cls(
            temperature=float(value("temperature")),
            top_k=int(value("top_k")),
            top_p=float(value("top_p")),
            min_p=float(value("min_p")),
            repetition_penalty=float(value("repetition_penalty")),
        )


def model_sampling_defaults(generation_config: Any) -> dict[str, float | int]:
    """The sampling settings a model's author set in its generation_config.

    transformers 5 leaves every sampling field of a `GenerationConfig` at None unless
    the checkpoint's generation_config.json (or the caller) sets it, so the fields that
    are not None are the author's. A value `GuardConfig` would reject is skipped with a
    warning.

    Returns:
        Field name -> value, for the `SAMPLING_DEFAULTS` fields that are set.
    """
    found: dict[str, float | int] = {}
    for name in SAMPLING_DEFAULTS:
        value = getattr(generation_config, name, None)
        if value is None:
            continue
        try:
            GuardConfig(**{name: value})
        except ValidationError:
            warnings.warn(
                f"the model's generation_config sets {name}={value!r}, which GuardConfig "
                f"does not accept; using {SAMPLING_DEFAULTS[name]!r} unless you set {name}",
                stacklevel=3,
            )
            continue
        found[name] = value
    return found


def warp_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0
) -> torch.Tensor:
    """Apply temperature, top-k, nucleus and min-p filtering; returns a new tensor.

    Args:
        logits: `(rows, vocab)` next-token logits.
        temperature: > 0 (greedy decoding does not warp).
        top_k: keep the k likeliest tokens; 0 keeps all.
        top_p: keep the smallest set of likeliest tokens with mass >= top_p (at least the
            likeliest token); 1 keeps all.
        min_p: keep the tokens whose probability is at least `min_p` times the
            likeliest token's (after the filters above); 0 keeps all.

    Returns:
        `(rows, vocab)` float logits with filtered tokens at `-inf`.
    """
    warped = logits.float() / temperature
    vocab = warped.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(warped, top_k, dim=-1).values[..., -1:]
        warped = warped.masked_fill(warped < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(warped, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p. The likeliest token
        # always stays: a top_p that rounds to 0 in float32 must not drop every token.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        warped = warped.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = warped.softmax(-1)
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        warped = warped.masked_fill(probs < threshold, float("-inf"))
    return warped


class RepetitionPenalty:
    """transformers' repetition penalty over each row's own token history.

    A token already in a row's history (its prompt and its response so far) gets its
    logit divided by `penalty` when positive, multiplied by it when negative (CTRL,
    Keskar et al. 2019), however often it occurred. The history is kept as a
    `(rows, vocab)` mask; `observe` adds the tokens chosen for each row.

    Args:
        penalty: > 0; above 1 discourages repeats, 1 changes nothing.
        histories: token ids of each row (prompt + response so far).
        vocab_size: columns of the logits it will see.
        device: device of those logits.
    """

    def __init__(
        self,
        penalty: float,
        histories: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        if not penalty > 0:
            raise ValueError(f"repetition penalty must be > 0 (1 disables it), got {penalty}")
        self.penalty = float(penalty)
        self.seen = torch.zeros(len(histories), vocab_size, dtype=torch.bool, device=device)
        rows = [row for row, ids in enumerate(histories) for i in ids if 0 <= i < vocab_size]
        ids = [i for history in histories for i in history if 0 <= i < vocab_size]
        if ids:  # one scatter for every row's history
            index = torch.tensor([rows, ids], dtype=torch.long).to(device)
            self.seen[index[0], index[1]] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """`(rows, vocab)` logits with the penalty applied to seen tokens; a new tensor."""
        penalized = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return torch.where(self.seen.to(logits.device), penalized, logits)

    def observe(self, tokens: torch.Tensor) -> None:
        """Add `(rows,)` chosen tokens (ids < 0 ignored) to the rows' histories."""
        rows = torch.arange(tokens.shape[0], device=self.seen.device)
        tokens = tokens.to(self.seen.device)
        valid = (tokens >= 0) & (tokens < self.seen.shape[1])
        self.seen[rows[valid], tokens[valid]] = True


def penalize_tokens(logits: torch.Tensor, token_mask: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the logits of masked tokens; returns a new tensor.

    Args:
        logits: `(rows, vocab)`.
        token_mask: `(rows, vocab)` bool, True where a token is penalised.
        penalty: non-negative amount subtracted.
    """
    # `where`, not `penalty * mask`: a huge penalty times 0 must not turn other logits NaN.
    return torch.where(token_mask, logits - penalty, logits)


class PromptSamplers:
    """One seeded generator per prompt; samples rows grouped contiguously by prompt.

    Args:
        seeds: one seed per prompt.
        device: device of the logits the samplers will see.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.device = device
        self.generators: dict[int, torch.Generator] = {}
        for prompt, seed in enumerate(seeds):
            self.add(prompt, seed)

    def add(self, prompt: int, seed: int) -> None:
        """Seed a generator for prompt `prompt` (a prompt that joins a running search)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(seed))
        self.generators[prompt] = generator

    def discard(self, prompt: int) -> None:
        """Forget prompt `prompt`'s generator (its search is over)."""
        self.generators.pop(prompt, None)

    def sample(
        self,
        logits: torch.Tensor,
        group_sizes: Sequence[int],
        prompt_ids: Sequence[int],
        temperature: float,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
    ) -> torch.Tensor:
        """Draw one token per row with the Gumbel-max trick.

        Args:
            logits: `(rows, vocab)` next-token logits, rows grouped by prompt.
            group_sizes: rows of each group, in order; they sum to `rows`.
            prompt_ids: the prompt (index into the seeds, or as `add`ed) that owns each
                group.
            temperature: 0 for greedy decoding (no randomness drawn).
            top_k, top_p, min_p: filters, see `warp_logits`.

        Returns:
            `(rows,)` long token ids.

        Raises:
            ValueError: `group_sizes` do not sum to `rows`.
        """
        if temperature == 0:
            return logits.argmax(dim=-1)
        if sum(group_sizes) != logits.shape[0]:
            raise ValueError(
                f"group sizes sum to {sum(group_sizes)}, but the logits have {logits.shape[0]} rows"
            )
        warped = warp_logits(logits, temperature, top_k, top_p, min_p)
        # Each group's uniforms are drawn straight into its rows of one buffer (the
        # same numbers `torch.rand` would return), then turned into Gumbel noise in
        # place: no per-group tensors to join, no temporaries the size of the logits.
        noise = torch.empty_like(warped)
        start = 0
        for size, prompt in zip(group_sizes, prompt_ids, strict=True):
            torch.rand(
                size,
                warped.shape[-1],
                generator=self.generators[prompt],
                device=warped.device,
                out=noise[start : start + size],
            )
            start += size
        gumbel = noise.clamp_min_(1e-20).log_().neg_().log_().neg_()
        return warped.add_(gumbel).argmax(dim=-1)

    def row_seeds(self, group_sizes: Sequence[int], prompt_ids: Sequence[int]) -> list[int]:
        """One seed per row, drawn from the generator of the prompt that owns its group:
        for a backend that samples each row with its own seeded request.

        Args:
            group_sizes: rows of each group, in order.
            prompt_ids: the prompt that owns each group.

        Returns:
            `sum(group_sizes)` seeds in `[0, 2**31)`.
        """
        seeds: list[int] = []
        for size, prompt in zip(group_sizes, prompt_ids, strict=True):
            drawn = torch.randint(
                0, 2**31, (size,), generator=self.generators[prompt], device=self.device
            )
            seeds += drawn.tolist()
        return seeds
