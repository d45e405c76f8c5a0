"""Speculative candidates: blocks drafted by a small model, verified by the base model.

`SpeculativeCausalLM` is the Hugging Face backend with a draft model beside the base
model (M2R2's fast candidates; the sampling is Leviathan et al. 2023 and Chen et al.
2023). Each round, every row's draft model proposes `draft_tokens` tokens one by one
from its own warped distribution q; the base model scores them all in one forward of
`draft_tokens + 1` positions; drafted token i is kept with probability
`min(1, p_i(d_i) / q_i(d_i))`; at the first rejection a token is drawn from
`normalize(max(0, p - q))`, and when all are kept a bonus token from the base model's
next distribution. The tokens kept then follow the base model's distribution exactly,
whatever the draft model is: p and q are the very distributions the ordinary path
samples from (repetition penalty, the unsafe-token penalty, temperature, top-k, top-p,
min-p), the repetition penalty's history growing with every drafted token.

Both models keep their own KV cache rows in step: `fan_out`, `select_rows`, `merge` and
checkpoints act on both. Drafted tokens that are rejected stay in the caches as masked
holes (attention mask 0, position ids continue from the kept tokens), as `CausalLM`
masks the tokens fed after a row ended; so only full-attention caches are accepted
(a sliding window or a recurrent state cannot skip a hole). A round costs the draft
model `draft_tokens` forwards: its last drafted token is read in the next round's first
forward (two positions), or at the block's end.

`inference_safeguard.quantized_draft` makes a draft model of the base model itself
(`draft_model="self:int8"` and the like).

Grammar-constrained responses are refused (`supports_grammar = False`): a grammar's
mask depends on the tokens before it, which the draft and the verification would have
to replay exactly per position.

A prompt's tokens depend on its seed and its own rows only: each round draws one fixed
set of uniforms per row, from the prompt's generator, and only for prompts that still
have a row decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from inference_safeguard.cancellation import raise_if_cancelled
from inference_safeguard.errors import BackendCapabilityError, DraftModelError
from inference_safeguard.hf_compat import output_cache
from inference_safeguard.kv_cache import is_full_attention_cache
from inference_safeguard.lm import (
    BlockCheckpoint,
    BlockRequest,
    CausalLM,
    Checkpoint,
    DecodedBlock,
    DecodeState,
    LanguageModel,
    TokenChooser,
)
from inference_safeguard.quantized_draft import is_self_draft, quantized_draft
from inference_safeguard.sampling import RepetitionPenalty, SamplingSettings, warp_logits

DEFAULT_DRAFT_TOKENS = 4
"""Tokens the draft model proposes per round (gamma)."""


@dataclass
class SpeculativeState(DecodeState):
    """A base model's `DecodeState` and, row for row, the draft model's.

    Attributes:
        draft: the draft model's state; its attention mask and positions match the
            base model's, its logits and hidden states are not read.
    """

    draft: DecodeState


@dataclass(frozen=True)
class SpeculativeCheckpoint(Checkpoint):
    """Both models' states before a block."""

    base: BlockCheckpoint
    draft: BlockCheckpoint

    def rewind(self, state: SpeculativeState) -> None:
        self.base.rewind(state)
        self.draft.rewind(state.draft)


@dataclass
class DraftStats:
    """How many drafted tokens the base model kept, over every sampled block so far.

    Attributes:
        drafted: drafted tokens verified (sampled rows that were still decoding).
        kept: those the base model kept.
        rounds: rounds of drafting and verification (one base forward each).
    """

    drafted: int = 0
    kept: int = 0
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens kept (0 before any)."""
        return self.kept / self.drafted if self.drafted else 0.0


# ------------------------------------------------------------------ the distributions
def warped_probs(
    logits: torch.Tensor,
    sampling: SamplingSettings,
    seen: torch.Tensor | None,
    unsafe_mask: torch.Tensor | None,
    unsafe_penalty: float,
) -> torch.Tensor:
    """The distribution the ordinary path samples a token from.

    Args:
        logits: `(rows, vocab)` raw next-token logits.
        sampling: the settings (temperature 0: the one-hot of the likeliest token).
        seen: `(rows, vocab)` bool, tokens the repetition penalty divides, or None.
        unsafe_mask: `(rows, vocab)` bool, tokens losing `unsafe_penalty`, or None.

    Returns:
        `(rows, vocab)` float probabilities.
    """
    picked = logits.float()
    if seen is not None:
        penalty = sampling.repetition_penalty
        penalized = torch.where(picked < 0, picked * penalty, picked / penalty)
        picked = torch.where(seen, penalized, picked)
    if unsafe_mask is not None:
        picked = torch.where(unsafe_mask, picked - unsafe_penalty, picked)
    if sampling.temperature == 0:
        return torch.nn.functional.one_hot(picked.argmax(-1), picked.shape[-1]).float()
    warped = warp_logits(
        picked, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p
    )
    return warped.softmax(-1)


def accept_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`min(1, p / q)` elementwise (`(rows,)` probabilities of the drafted tokens; q > 0
    since the token was drawn from q)."""
    return (p / q.clamp_min(1e-30)).clamp_max(1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`normalize(max(0, p - q))` per row (`(rows, vocab)`), p itself where that is empty."""
    residual = (p - q).clamp_min(0.0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp_min(1e-30), p)


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: `(rows, vocab)` probabilities, `(rows,)` uniforms in [0, 1) ->
    `(rows,)` long tokens (never a token of probability 0)."""
    cdf = probs.cumsum(-1)
    target = (uniform * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


# ---------------------------------------------------------------------- the backend
class SpeculativeCausalLM(CausalLM):
    """`CausalLM` whose blocks are drafted by a smaller model and verified by this one.

    Args:
        base: the base model's backend; its model and tokenizer are shared, not copied.
        draft: the draft model's backend; it must use the base model's tokenizer.
        draft_tokens: tokens drafted per round (gamma), at least 1.

    Raises:
        DraftModelError: the tokenizers differ, or `draft_tokens` < 1.
    """

    supports_grammar = False

    def __init__(
        self, base: CausalLM, draft: CausalLM, *, draft_tokens: int = DEFAULT_DRAFT_TOKENS
    ) -> None:
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
            raise DraftModelError(f"draft_tokens must be an int >= 1, got {draft_tokens!r}")
        if base.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
            raise DraftModelError(
                f"the draft model {draft.name!r} uses another tokenizer than the base model "
                f"{base.name!r} ({len(draft.tokenizer)} vs {len(base.tokenizer)} tokens, or "
                "the same size with other ids); pick a draft model of the base model's family"
            )
        super().__init__(
            base.model,
            base.tokenizer,
            allow_special_tokens_in_content=base.allow_special_tokens_in_content,
        )
        self.draft = draft
        self.draft_tokens = draft_tokens
        self.stats = DraftStats()

    # ------------------------------------------------------------- rows in step
    def prefill(self, prompts: Sequence[Sequence[int]]) -> SpeculativeState:  # type: ignore[override]
        base = super().prefill(prompts)
        draft = self.draft.prefill(prompts)
        for owner, state in (("base", base), ("draft", draft)):
            if not is_full_attention_cache(state.cache):
                raise DraftModelError(
                    f"the {owner} model's KV cache is not full attention (a sliding window "
                    "or a recurrent state); speculative candidates need models whose every "
                    "layer keeps all keys and values"
                )
        return SpeculativeState(
            base.cache, base.attention_mask, base.next_position, base.logits, base.hidden, draft
        )

    def fan_out(self, state: SpeculativeState, repeats: int) -> None:  # type: ignore[override]
        super().fan_out(state, repeats)
        self.draft.fan_out(state.draft, repeats)

    def select_rows(self, state: SpeculativeState, indices: torch.Tensor) -> None:  # type: ignore[override]
        super().select_rows(state, indices)
        self.draft.select_rows(state.draft, indices.to(state.draft.logits.device))

    def can_merge(self, state: SpeculativeState) -> bool:  # type: ignore[override]
        return super().can_merge(state) and self.draft.can_merge(state.draft)

    def merge(self, state: SpeculativeState, other: SpeculativeState) -> None:  # type: ignore[override]
        super().merge(state, other)
        self.draft.merge(state.draft, other.draft)

    def checkpoint(self, state: SpeculativeState, tokens: int) -> SpeculativeCheckpoint:  # type: ignore[override]
        return SpeculativeCheckpoint(
            BlockCheckpoint.of(state, tokens), BlockCheckpoint.of(state.draft, tokens)
        )

    @torch.inference_mode()
    def decode_block(  # type: ignore[override]
        self,
        state: SpeculativeState,
        num_tokens: int,
        choose: TokenChooser,
        limits: torch.Tensor | None = None,
    ) -> DecodedBlock:
        """`CausalLM.decode_block` (teacher forcing, replay), the draft model fed the
        same tokens in one forward."""
        block = super().decode_block(state, num_tokens, choose, limits)
        fed = block.tokens >= 0
        tokens = torch.where(fed, block.tokens, self.pad_token_id)
        _forward(
            self.draft, state.draft, tokens.to(self.draft.device), fed.to(self.draft.device), False
        )
        state.draft.next_position = state.draft.next_position + fed.sum(-1).to(
            state.draft.next_position.device
        )
        return block

    # ------------------------------------------------------------------ sampling
    @torch.inference_mode()
    def sample_block(self, state: SpeculativeState, request: BlockRequest) -> DecodedBlock:  # type: ignore[override]
        """Sample the block by rounds of drafting and verification (the module
        docstring); the rows not in `request.rows` replay `request.replay`.

        Raises:
            BackendCapabilityError: the request carries a grammar.
            GenerationCancelledError: `request.cancel` was set (checked every round).
        """
        if request.grammar is not None:
            raise BackendCapabilityError(
                "speculative candidates cannot follow a grammar (response_format, forced "
                "tool calls): the grammar's mask changes with every drafted token; drop "
                "the draft model for such requests"
            )
        return _SpeculativeBlock(self, state, request).run()


class _SpeculativeBlock:
    """One block sampled by rounds for every row of `state`; see `SpeculativeCausalLM`."""

    def __init__(
        self, lm: SpeculativeCausalLM, state: SpeculativeState, request: BlockRequest
    ) -> None:
        self.lm, self.state, self.request = lm, state, request
        device = state.logits.device
        rows, vocab, gamma = state.rows, lm.vocab_size, lm.draft_tokens
        self.device, self.gamma, self.vocab = device, gamma, vocab
        sampled_rows = request.rows.to(device)
        self.sampled = torch.zeros(rows, dtype=torch.bool, device=device)
        self.sampled[sampled_rows] = True
        self.sampled_rows = sampled_rows
        width = request.num_tokens + gamma + 2
        self.forced = torch.full((rows, width), lm.pad_token_id, dtype=torch.long, device=device)
        budget = torch.full((rows,), request.num_tokens, dtype=torch.long, device=device)
        if request.limits is not None:
            budget = torch.minimum(budget, request.limits.to(device))
        if request.replay is not None:
            replay = request.replay.tokens.to(device)
            self.forced[:, : replay.shape[1]] = replay.clamp_min(0)
            replayed = (replay >= 0).sum(-1)
            budget = torch.where(self.sampled, budget, torch.minimum(budget, replayed))
        self.budget = budget
        self.seen: torch.Tensor | None = None
        if request.histories is not None:
            penalty = RepetitionPenalty(
                request.sampling.repetition_penalty, request.histories, vocab, device
            )
            self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
            self.seen[sampled_rows] = penalty.seen
        self.unsafe: torch.Tensor | None = None
        if request.unsafe_mask is not None:
            self.unsafe = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
            self.unsafe[sampled_rows] = request.unsafe_mask.to(device)
        self.eos = lm._eos_tensor.to(device)
        # Room for a whole round past the block, so that no two positions share a column.
        self.tokens = torch.full((rows, width), -1, dtype=torch.long, device=device)
        self.logprob = torch.zeros(rows, device=device)
        self.emitted = torch.zeros(rows, dtype=torch.long, device=device)
        self.ended = torch.zeros(rows, dtype=torch.bool, device=device)
        self.pending: torch.Tensor | None = None
        # The round's last drafted token and whether it was kept: the draft model reads
        # it in the next round's first forward (or at the block's end), not in a forward
        # of its own whose logits nobody reads.
        self.unread: tuple[torch.Tensor, torch.Tensor] | None = None

    def run(self) -> DecodedBlock:
        try:
            while True:
                live = ~self.ended & (self.emitted < self.budget)
                if not bool(live.any()):
                    break
                raise_if_cancelled(self.request.cancel)
                self._round(live)
        finally:
            if self.unread is not None:  # the draft's cache as long as the base's again
                token, kept = self.unread
                self._feed_draft(token[:, None], kept[:, None], -1)
        return DecodedBlock(
            tokens=self.tokens[:, : self.request.num_tokens],
            logprob=self.logprob,
            ended=self.ended,
            hidden=self.state.hidden,
        )

    # ---------------------------------------------------------------- one round
    def _uniforms(self, live: torch.Tensor) -> torch.Tensor:
        """`(rows, 2 gamma + 2)` uniforms: each prompt with a live row draws its rows'
        from its own generator (draft draws, acceptance tests, the token after the
        round, the round's first token)."""
        request, width = self.request, 2 * self.gamma + 2
        drawn = torch.zeros(self.sampled_rows.shape[0], width, device=self.device)
        start = 0
        for size, prompt in zip(request.group_sizes, request.prompt_ids, strict=True):
            group = self.sampled_rows[start : start + size]
            if bool(live[group].any()):
                generator = request.samplers.generators[prompt]
                drawn[start : start + size] = torch.rand(
                    size, width, generator=generator, device=generator.device
                ).to(self.device)
            start += size
        uniforms = torch.zeros(self.state.rows, width, device=self.device)
        uniforms[self.sampled_rows] = drawn
        return uniforms

    def _probs(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        request = self.request
        return warped_probs(logits, request.sampling, seen, self.unsafe, request.unsafe_penalty)

    def _forced_at(self, offset: torch.Tensor) -> torch.Tensor:
        """`(rows,)` replayed token at each row's `offset`."""
        index = offset.clamp_max(self.forced.shape[1] - 1)[:, None]
        return self.forced.gather(1, index).squeeze(1)

    def _feed_draft(self, tokens: torch.Tensor, fed: torch.Tensor, offset: int) -> torch.Tensor:
        """Feed `(rows, n)` tokens to the draft model at positions `next_position +
        offset` on, appending `fed` (`(rows, n)` bool) to its attention mask; returns
        the `(rows, vocab)` logits after the last."""
        lm, draft_state = self.lm, self.state.draft
        start = draft_state.next_position + offset
        logits, _ = _forward(
            lm.draft, draft_state, _to(tokens, lm.draft), _to(fed, lm.draft), False, start
        )
        return _fit(logits[:, -1].to(self.device), self.vocab)

    def _round(self, live: torch.Tensor) -> None:
        lm, state, gamma, rows = self.lm, self.state, self.gamma, self.state.rows
        arange_rows = torch.arange(rows, device=self.device)
        uniforms = self._uniforms(live)
        seen = None if self.seen is None else self.seen.clone()
        if self.pending is None:  # the block's first token, from the base model itself
            first = draw(self._probs(state.logits, seen), uniforms[:, -1])
            self.pending = first
        first = torch.where(self.sampled, self.pending, self._forced_at(self.emitted))
        proposed = [first]
        # seen_at[i]: what the repetition penalty sees after the round's tokens 0..i,
        # for the base's distribution at position i and the draft's of token i + 1.
        seen_at: list[torch.Tensor | None] = []
        draft_probs: list[torch.Tensor] = []
        # Draft: gamma forwards, of the round's first token (after the last round's
        # unread draft, at the position before it) and of the drafts but the last.
        for j in range(gamma):
            if seen is not None:
                seen[arange_rows, proposed[-1]] = True
            seen_at.append(None if seen is None else seen.clone())
            if j == 0 and self.unread is not None:
                unread, unread_kept = self.unread
                tokens = torch.stack([unread, first], dim=1)
                draft_logits = self._feed_draft(tokens, torch.stack([unread_kept, live], 1), -1)
            else:
                draft_logits = self._feed_draft(proposed[-1][:, None], live[:, None], j)
            q = self._probs(draft_logits, seen_at[j])
            drafted = draw(q, uniforms[:, j])
            drafted = torch.where(self.sampled, drafted, self._forced_at(self.emitted + 1 + j))
            draft_probs.append(q)
            proposed.append(drafted)
        if seen is not None:
            seen[arange_rows, proposed[-1]] = True
        seen_at.append(None if seen is None else seen.clone())
        block = torch.stack(proposed, dim=1)  # (rows, gamma + 1)
        # Verify: one base forward over the round's first token and the drafts.
        fed_all = live[:, None].expand(rows, gamma + 1)
        logits, hidden = _forward(lm, state, block, fed_all, True)
        assert hidden is not None  # asked for
        logits = logits.to(self.device)
        base_probs = [self._probs(logits[:, i], seen_at[i]) for i in range(gamma + 1)]
        accepted = torch.ones(rows, gamma, dtype=torch.bool, device=self.device)
        for i in range(gamma):
            token = block[:, i + 1, None]
            p = base_probs[i].gather(1, token).squeeze(1)
            q = draft_probs[i].gather(1, token).squeeze(1)
            accepted[:, i] = uniforms[:, gamma + i] < accept_probability(p, q)
        accepted |= ~self.sampled[:, None]
        kept_drafts = accepted.long().cumprod(-1).sum(-1)  # (rows,)
        counted = live & self.sampled
        stats = self.lm.stats
        stats.rounds += 1
        stats.drafted += int(counted.sum()) * gamma
        stats.kept += int(kept_drafts[counted].sum())
        # Tokens committed: the first one and the kept drafts, up to the budget and
        # through the first EOS.
        count = torch.minimum(kept_drafts + 1, self.budget - self.emitted)
        positions = torch.arange(gamma + 1, device=self.device)
        is_eos = torch.isin(block, self.eos) & (positions[None] < count[:, None])
        has_eos = is_eos.any(-1)
        count = torch.where(has_eos, is_eos.long().argmax(-1) + 1, count)
        count = torch.where(live, count, 0)
        kept = positions[None] < count[:, None]
        # The token after the round: from the residual at the first rejection, the bonus
        # from the base's next distribution when every draft was kept.
        after = kept_drafts.clamp_max(gamma)
        p_after = torch.stack(base_probs, dim=1)[arange_rows, after]
        q_padded = torch.stack([*draft_probs, torch.zeros_like(draft_probs[0])], dim=1)
        q_after = q_padded[arange_rows, after]
        self.pending = draw(residual_distribution(p_after, q_after), uniforms[:, 2 * gamma])
        # Record the committed tokens and their raw log-probabilities.
        before = torch.cat([state.logits[:, None], logits[:, :-1]], dim=1)
        raw = before.log_softmax(-1).gather(-1, block[..., None]).squeeze(-1)
        self.logprob += torch.where(kept, raw, 0.0).sum(-1)
        columns = self.emitted[:, None] + positions[None]
        current = self.tokens.gather(1, columns)
        self.tokens.scatter_(1, columns, torch.where(kept, block, current))
        self.ended |= has_eos & live
        self.emitted += count
        if self.seen is not None:
            self.seen[arange_rows[:, None].expand_as(block)[kept], block[kept]] = True
        # Crop: the rejected positions become masked holes in both caches.
        last = (count - 1).clamp_min(0)
        has_new = count > 0
        for target, width in ((state, gamma + 1), (state.draft, gamma)):
            mask_device = target.attention_mask.device
            target.attention_mask[:, -width:] = kept[:, :width].long().to(mask_device)
            target.next_position = target.next_position + count.to(target.next_position.device)
        self.unread = (block[:, gamma], kept[:, gamma])
        state.logits = torch.where(has_new[:, None], logits[arange_rows, last], state.logits)
        new_hidden = hidden[arange_rows.to(hidden.device), last.to(hidden.device)]
        state.hidden = torch.where(has_new[:, None].to(hidden.device), new_hidden, state.hidden)


def _forward(
    lm: CausalLM,
    state: DecodeState,
    tokens: torch.Tensor,
    fed: torch.Tensor,
    hidden: bool,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Feed `(rows, n)` tokens to `lm` in one forward, appending `fed` (`(rows, n)` bool)
    to the attention mask and growing the cache by n; positions run from `start`
    (`(rows,)`, default `next_position`), which is left for the caller to advance.

    Returns:
        `(rows, n, vocab)` float logits, and `(rows, n, hidden)` last-layer states when
        `hidden`, else None.
    """
    state.attention_mask = torch.cat([state.attention_mask, fed.long()], dim=-1)
    first = state.next_position if start is None else start
    steps = torch.arange(tokens.shape[1], device=first.device)
    out = lm.model(
        input_ids=tokens,
        attention_mask=state.attention_mask,
        position_ids=first[:, None] + steps[None],
        use_cache=True,
        output_hidden_states=hidden,
        **{lm._cache_keyword: state.cache},
    )
    state.cache = output_cache(out)
    return out.logits.float(), (out.hidden_states[-1] if hidden else None)


def _to(tensor: torch.Tensor, lm: CausalLM) -> torch.Tensor:
    return tensor.to(lm.device)


def _fit(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """`(rows, v)` draft logits as `(rows, vocab)`: extra columns dropped, missing ones
    at -inf (the draft never proposes a token the base model lacks)."""
    width = logits.shape[-1]
    if width >= vocab:
        return logits[:, :vocab]
    return torch.nn.functional.pad(logits, (0, vocab - width), value=float("-inf"))


def with_draft_model(
    lm: LanguageModel,
    draft_model: str,
    *,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    **load_options: Any,
) -> SpeculativeCausalLM:
    """`lm` with a draft model loaded beside it (`CausalLM.from_pretrained` options),
    or, for `draft_model` in `SELF_DRAFT_KINDS` (`"self:bf16"`, `"self:int8"`,
    `"self:int4"`), a copy of `lm` itself in cheaper arithmetic (`quantized_draft`).

    Raises:
        DraftModelError: `lm` is not on the Hugging Face backend, the draft model's
            tokenizer differs from the base model's, or an unknown `self:` kind.
    """
    if not isinstance(lm, CausalLM):
        raise DraftModelError(
            f"a draft model needs the Hugging Face backend, not {lm.backend!r}; "
            "drop draft_model or use backend='huggingface'"
        )
    if is_self_draft(draft_model):
        draft = quantized_draft(lm, draft_model)
        return SpeculativeCausalLM(lm, draft, draft_tokens=draft_tokens)
    options = {
        k: load_options[k] for k in ("device", "dtype", "trust_remote_code") if k in load_options
    }
    draft = CausalLM.from_pretrained(draft_model, **options)
    return SpeculativeCausalLM(lm, draft, draft_tokens=draft_tokens)
