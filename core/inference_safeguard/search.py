"""Block-wise beam search with safety states: the engine behind InferenceGuard.

One search runs all prompts together. Each step fans every live beam out into
candidate blocks (one batched decode for all prompts x candidates), scores the
candidates, resamples a prompt's block with penalised logits when all its candidates
are over budget, and keeps the top `beam_width` per prompt. Finished candidates
(EOS, stop string, `max_new_tokens`) leave the beam and compete on their score at the
end. The same engine, with other scorings and no resampling, is the block beam-search
baseline. A `RunningSearch` holds one search's state between steps, so that prompts can
join and leave it at block boundaries (`inference_safeguard.engine`); each prompt keeps
its own budget, `max_new_tokens`, stop strings and seed.

Choices where the paper is silent:
- the first step samples `num_candidates` blocks from the prompt; later steps give
  each live beam `num_candidates // live_beams` children, so a prompt always scores
  about `num_candidates` candidates per step, even after some beams have finished;
- tokens seen in any unsafe candidate of the step so far are penalised, cumulatively
  over the resample rounds of that step;
- without a reward model, the reward is the response's mean token log-likelihood
  under the base model, which ranks fluent responses first;
- the cumulative cost of a prefix is the highest cost the model gave any of its
  block-end prefixes, so per-block costs are never negative after the first block (a
  cost model that scores a longer text lower cannot wash out an unsafe prefix); the
  first block's cost stands as the model gave it, negative included, so a negative
  budget can be met by a cost model that scores below zero;
- costs, safety states and scores are float64 on the CPU: a cost is compared with the
  budget as the cost model returned it (a cost equal to the budget is within it); with
  gamma_c = 1 the safety state is `d - C` in one subtraction, not a sum of per-block
  increments that could round across 0;
- where costs are estimates (the critic's cost probe), the cost model replaces them
  for every candidate the search would keep before it keeps any, so beams and
  finished responses always carry the cost model's own costs;
- a candidate whose response ends in its block is charged its finished cost
  (`programmatic.score_complete`: a length under the minimum, a required word missing),
  so a finished response that breaks a constraint only a whole response can break ranks
  over budget like any other, and the final check reuses that cost.

Costs and safety states hold one column per constraint (`inference_safeguard.constraints`):
`(rows, constraints)`. A candidate is within budget when every column of its state is
`>= 0`; over budget it ranks by its worst column; a block is resampled when every
candidate of its prompt breaks some constraint, penalising the tokens of those candidates.

With `reward_calibration` on, a candidate's reward enters the scoring as its quantile
among the candidates of its prompt at the same step (`inference_safeguard.calibration`);
finished candidates of different steps then compete on quantiles within their own steps.

Candidates are scored through a `CandidateEvaluator`: `ModelsEvaluator` (the cost and
reward models on the text) or `CriticEvaluator` (the latent critic on the hidden states).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from inference_safeguard.calibration import calibrate_rewards
from inference_safeguard.cancellation import raise_if_cancelled
from inference_safeguard.config import GuardConfig
from inference_safeguard.constraints import (
    DEFAULT_CONSTRAINT,
    Constraint,
    Constraints,
    budget_vector,
)
from inference_safeguard.critic import LatentCritic
from inference_safeguard.grammar import RowGrammars
from inference_safeguard.lm import (
    BlockRequest,
    DecodedBlock,
    EncodedPrompt,
    LanguageModel,
)
from inference_safeguard.safety import (
    augmented_score,
    lagrangian_score,
    over_budget,
    top_k_per_group,
    unsafe_token_mask,
    update_safety_state,
)
from inference_safeguard.sampling import PromptSamplers, SamplingSettings
from inference_safeguard.scorers import Scorer

Scoring = Literal["augmented", "reward", "lagrangian"]


@dataclass(frozen=True)
class Candidates:
    """Candidate responses of one step, rows grouped by prompt.

    Attributes:
        prompt_texts: plain-text prompt of each row.
        texts: each row's response text so far (cut before a stop string).
        token_ids: each row's response token ids (EOS excluded).
        hidden: `(rows, hidden)` last-layer hidden state at each row's block end.
        new_tokens: `(rows,)` tokens the block added to each row (EOS included).
        finished: whether each row's response ends in this block (EOS, a stop string or
            `max_new_tokens`): such a row is charged its finished cost
            (`programmatic.score_complete`), the others their prefix cost.
    """

    prompt_texts: list[str]
    texts: list[str]
    token_ids: list[list[int]]
    hidden: torch.Tensor
    new_tokens: torch.Tensor
    finished: list[bool]

    def select(self, index: torch.Tensor) -> Candidates:
        """The candidates at rows `index` (`(n,)` long)."""
        rows = index.tolist()
        return Candidates(
            prompt_texts=[self.prompt_texts[i] for i in rows],
            texts=[self.texts[i] for i in rows],
            token_ids=[self.token_ids[i] for i in rows],
            hidden=self.hidden[index.to(self.hidden.device)],
            new_tokens=self.new_tokens[index.to(self.new_tokens.device)],
            finished=[self.finished[i] for i in rows],
        )


class CandidateEvaluator(Protocol):
    """Gives the cost and reward of candidate responses: the seam between search modes.

    Attributes:
        has_reward_model: whether `reward` gives values (else the search ranks by
            log-likelihood).
        exact_cost: whether `cost` is the cost model's own value (not an estimate).
        exact_reward: whether `reward` is the reward model's own value.
    """

    has_reward_model: bool
    exact_cost: bool
    exact_reward: bool

    def cost(self, candidates: Candidates) -> torch.Tensor:
        """`(rows, constraints)` cumulative cost C(x, y_<=t) of each candidate under each
        constraint (maybe an estimate; the finished cost where `candidates.finished`)."""

    def model_cost(self, candidates: Candidates) -> torch.Tensor:
        """`(rows, constraints)` the cost models' own C(x, y_<=t) (what `cost` is when
        `exact_cost`), the finished cost where `candidates.finished`."""

    def reward(self, candidates: Candidates, z: torch.Tensor) -> torch.Tensor:
        """`(rows,)` reward of each candidate given its `(rows, constraints)` safety
        state `z`."""


class ModelsEvaluator:
    """`models` mode: run the cost and reward scorers on the candidates' text.

    Args:
        constraints: the cost scorers, one per constraint.
        reward: reward scorer, or None (the search then ranks by log-likelihood).
    """

    exact_cost = True
    exact_reward = True

    def __init__(self, constraints: Constraints, reward: Scorer | None) -> None:
        self.constraints = constraints
        self.reward_scorer = reward
        self.has_reward_model = reward is not None

    def cost(self, candidates: Candidates) -> torch.Tensor:
        return self.constraints.score(
            candidates.prompt_texts, candidates.texts, candidates.finished
        )

    model_cost = cost

    def reward(self, candidates: Candidates, z: torch.Tensor) -> torch.Tensor:
        if self.reward_scorer is None:
            raise RuntimeError("reward() called without a reward model")
        return self.reward_scorer(candidates.prompt_texts, candidates.texts)


class CriticEvaluator:
    """`critic` mode: the latent critic reads the hidden states the decode already has.

    The reward of a candidate is the critic's risk-adjusted value
    `r_hat - risk_weight * reward_sd * (1 - p_safe)`, where `reward_sd` is the spread of
    the rewards the critic was trained on (so the weight does not depend on the reward
    model's scale), which the augmented scoring uses while `z >= 0` (over budget, a
    candidate scores `-n + z` as in models mode). The cost is the critic's cost probe
    when `use_probe` (the search then checks only the candidates it keeps with the cost
    model, see `BlockSearch._settle`), else the cost model's. The critic learned one
    `p_safe` for one cost, so it serves a single constraint: costs and safety states
    are `(rows, 1)`.

    Args:
        critic: the latent critic, on the base model's device.
        cost: the cost model of the one constraint.
        use_probe: take costs from the critic's cost probe.
        risk_weight: weight of `1 - p_safe`, in standard deviations of the training
            rewards. DESIGN's `n * (1 - p_safe)` with the unsafe penalty n (1e4) would
            rank candidates by `p_safe` alone, which on the demo world picks refusal-like
            answers (reward 0.29 against 0.99); the cost checks and resampling already
            keep the search within budget, so the critic's look-ahead is weighed
            against reward instead.
    """

    has_reward_model = True
    exact_reward = False

    def __init__(
        self, critic: LatentCritic, cost: Scorer, *, use_probe: bool, risk_weight: float
    ) -> None:
        if use_probe and not critic.has_cost_probe:
            raise ValueError("use_probe=True needs a critic with a cost probe")
        self.critic = critic
        self.cost_scorer = cost
        self._constraints = Constraints([Constraint(DEFAULT_CONSTRAINT, cost)])
        self.use_probe = use_probe
        self.exact_cost = not use_probe
        self.risk_weight = risk_weight

    def cost(self, candidates: Candidates) -> torch.Tensor:
        if self.use_probe:
            return self.critic.probe_cost(candidates.hidden)[:, None]
        return self.model_cost(candidates)

    def model_cost(self, candidates: Candidates) -> torch.Tensor:
        return self._constraints.score(
            candidates.prompt_texts, candidates.texts, candidates.finished
        )

    def reward(self, candidates: Candidates, z: torch.Tensor) -> torch.Tensor:
        prediction = self.critic.predict(candidates.hidden, z[:, 0])
        penalty = self.risk_weight * self.critic.config.reward_std
        return prediction.r_hat - penalty * (1 - prediction.p_safe)


@dataclass(frozen=True)
class Finished:
    """A finished response competing for the final answer.

    Attributes:
        cost: the search's cumulative cost under each constraint, in constraint order (the
            cost model's own wherever the search keeps a candidate).
        reward: the reward model's value, or None when the search ranked by
            log-likelihood or by the critic's estimates.
        cost_checked: whether `cost` is the cost model's own value of `text` and its
            block-end prefixes (so the final check need not score the text again).
    """

    token_ids: list[int]
    text: str
    cost: tuple[float, ...]
    reward: float | None
    score: float
    finish_reason: Literal["stop", "length"]
    cost_checked: bool = False
    complete: bool = True
    """Whether the text is a whole sentence of the call's grammar (always without one)."""


@dataclass
class PromptSearch:
    """Per-prompt bookkeeping of a search."""

    prompt: EncodedPrompt
    finished: list[Finished] = field(default_factory=list)
    blocks: int = 0
    candidates_scored: int = 0
    resample_rounds: int = 0

    def best(self) -> Finished:
        """The finished response with the highest score (the earliest on ties); under a
        grammar, one that completes it before any that does not (cut by the token limit)."""
        return max(self.finished, key=lambda f: (f.complete, f.score))


@dataclass
class _Rows:
    """Per-row search state aligned with the decode state's rows.

    Attributes:
        cost: `(rows, constraints)` float64 on the CPU: per constraint, the running max of
            the costs of the row's block ends; -inf before its first block is scored
            (nothing said yet).
        z: `(rows, constraints)` float64 on the CPU: the safety state.
        logprob, length: `(rows,)` on the model's device.
        grammar: each row's grammar state, or None when no prompt has a grammar.
    """

    token_ids: list[list[int]]
    cost: torch.Tensor
    z: torch.Tensor
    logprob: torch.Tensor
    length: torch.Tensor
    grammar: RowGrammars | None = None

    def select(self, index: torch.Tensor) -> _Rows:
        on_cpu, on_device = index.cpu(), index.to(self.logprob.device)
        rows = on_cpu.tolist()
        return _Rows(
            token_ids=[self.token_ids[i] for i in rows],
            cost=self.cost[on_cpu],
            z=self.z[on_cpu],
            logprob=self.logprob[on_device],
            length=self.length[on_device],
            grammar=None if self.grammar is None else self.grammar.select(rows),
        )

    def concat(self, other: _Rows) -> _Rows:
        """These rows followed by `other`'s (a row without a grammar gets a None state)."""
        grammar = None
        if self.grammar is not None or other.grammar is not None:
            compiler = (self.grammar or other.grammar).compiler  # type: ignore[union-attr]
            matchers = [
                *(self.grammar.matchers if self.grammar else [None] * len(self.token_ids)),
                *(other.grammar.matchers if other.grammar else [None] * len(other.token_ids)),
            ]
            grammar = RowGrammars(matchers, compiler)
        return _Rows(
            token_ids=self.token_ids + other.token_ids,
            cost=torch.cat([self.cost, other.cost]),
            z=torch.cat([self.z, other.z]),
            logprob=torch.cat([self.logprob, other.logprob]),
            length=torch.cat([self.length, other.length]),
            grammar=grammar,
        )


@dataclass
class _Step:
    """Scored candidates of one step (rows grouped by live prompt)."""

    rows: _Rows
    texts: list[str]
    reasons: list[Literal["stop", "length"] | None]
    reward: torch.Tensor | None
    score: torch.Tensor

    def splice(self, index: torch.Tensor, fresh: _Step) -> _Step:
        """A copy whose rows `index` are replaced by `fresh` (which holds only those rows)."""
        token_ids, texts, reasons = list(self.rows.token_ids), list(self.texts), list(self.reasons)
        for j, i in enumerate(index.tolist()):
            token_ids[i], texts[i], reasons[i] = (
                fresh.rows.token_ids[j],
                fresh.texts[j],
                fresh.reasons[j],
            )

        def put(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            merged = old.clone()
            merged[index.to(old.device)] = new.to(old.device)
            return merged

        reward = None
        if self.reward is not None:
            if fresh.reward is None:
                raise ValueError("splice: the fresh rows have no reward but this step has one")
            reward = put(self.reward, fresh.reward)
        grammar = None
        if self.rows.grammar is not None and fresh.rows.grammar is not None:
            grammar = self.rows.grammar.splice(index.tolist(), fresh.rows.grammar)
        return _Step(
            rows=_Rows(
                token_ids,
                put(self.rows.cost, fresh.rows.cost),
                put(self.rows.z, fresh.rows.z),
                put(self.rows.logprob, fresh.rows.logprob),
                put(self.rows.length, fresh.rows.length),
                grammar,
            ),
            texts=texts,
            reasons=reasons,
            reward=reward,
            score=put(self.score, fresh.score),
        )


@dataclass(frozen=True)
class _Layout:
    """How one step's rows map to prompts: groups of contiguous rows, one per live prompt.

    Attributes:
        live: the prompt (slot) of each group.
        group_sizes: rows of each group.
        prompt_texts: plain-text prompt of each group.
        generated: tokens each group's prompt has after this step's block.
        block_lens: tokens each group decodes in this step: the block size, less at a
            prompt's last block (prompts that joined at other steps, or with other
            `max_new_tokens`, reach their last block at different steps).
        configs: each group's prompt's own settings (budgets, `max_new_tokens`, stop).
    """

    live: list[int]
    group_sizes: list[int]
    prompt_texts: list[str]
    generated: list[int]
    block_lens: list[int]
    configs: list[GuardConfig]

    @property
    def block_len(self) -> int:
        """Tokens the step decodes: the longest of its groups' blocks."""
        return max(self.block_lens)

    @property
    def group_of_row(self) -> torch.Tensor:
        return torch.repeat_interleave(
            torch.arange(len(self.group_sizes)), torch.tensor(self.group_sizes)
        )

    def group_rows(self, group: int) -> torch.Tensor:
        start = sum(self.group_sizes[:group])
        return torch.arange(start, start + self.group_sizes[group])

    def row_limits(self) -> torch.Tensor | None:
        """`(rows,)` tokens each row may decode in this step, or None when every row
        decodes the whole block."""
        if min(self.block_lens) == self.block_len:
            return None
        return torch.repeat_interleave(
            torch.tensor(self.block_lens), torch.tensor(self.group_sizes)
        )

    def budgets(self, rows: torch.Tensor) -> torch.Tensor:
        """`(n, constraints)` float64 budgets of the prompts of `rows` (`(n,)` index into
        the step's rows)."""
        per_group = torch.tensor(
            [budget_vector(config) for config in self.configs], dtype=torch.float64
        )
        return per_group[self.group_of_row[rows]]


class BlockSearch:
    """Block-wise beam search over all prompts at once.

    Args:
        lm: the base model.
        evaluator: where candidate costs and rewards come from.
        scoring: "augmented" (InferenceGuard: `R` if every `z >= 0` else `-n + min(z)`),
            "reward" (`R`), or "lagrangian" (`R - lambda * C`).
        lagrange_multiplier: lambda of the Lagrangian scoring.
        resample: resample all-unsafe blocks with penalised logits (InferenceGuard).
    """

    def __init__(
        self,
        lm: LanguageModel,
        evaluator: CandidateEvaluator,
        *,
        scoring: Scoring = "augmented",
        lagrange_multiplier: float = 1.0,
        resample: bool = True,
    ) -> None:
        if scoring not in ("augmented", "reward", "lagrangian"):
            raise ValueError(
                f"scoring must be 'augmented', 'reward' or 'lagrangian', got {scoring!r}"
            )
        if lagrange_multiplier < 0:
            raise ValueError(f"lagrange_multiplier must be >= 0, got {lagrange_multiplier}")
        self.lm = lm
        self.evaluator = evaluator
        self.scoring = scoring
        self.lagrange_multiplier = lagrange_multiplier
        self.resample = resample

    @property
    def scores_cost(self) -> bool:
        """Whether the search scores costs; only reward-only beam search does not.

        Kept candidates always carry the cost model's value: estimated costs (the cost
        probe) are replaced by the cost model's before a candidate is kept.
        """
        return self.scoring != "reward" or self.resample

    def run(
        self,
        prompts: Sequence[EncodedPrompt],
        config: GuardConfig,
        seeds: Sequence[int],
        commit: Literal["agreement", "block"] | None = None,
        evaluator: CandidateEvaluator | None = None,
        cancel: threading.Event | None = None,
    ) -> Generator[list[list[int] | None], None, list[PromptSearch]]:
        """Search every prompt; a generator that yields after each step.

        Args:
            prompts: validated prompts.
            config: search settings.
            seeds: one sampler seed per prompt.
            commit: when streaming, what each step commits: "agreement" (the prefix all
                beams and finished responses share) or "block" (the best safe candidate;
                beams that do not extend it are dropped).
            evaluator: where this run's costs and rewards come from (default: the
                search's own).
            cancel: once set (from any thread), the search raises
                `GenerationCancelledError` before its next decoded token, which ends
                the generator and drops its KV cache.

        Yields:
            Per prompt, the response token ids committed so far (None when `commit` is
            None or the prompt's search is over).

        Returns:
            One `PromptSearch` per prompt with its finished responses and counts.
        """
        raise_if_cancelled(cancel)
        running = RunningSearch(self, config, evaluator, cancel)
        slots = running.add(prompts, [config] * len(prompts), seeds, commit)
        while running.live:
            running.step()
            yield [running.committed(slot) for slot in slots]
        return [running.take(slot) for slot in slots]

    def search(
        self,
        prompts: Sequence[EncodedPrompt],
        config: GuardConfig,
        seeds: Sequence[int],
        evaluator: CandidateEvaluator | None = None,
        cancel: threading.Event | None = None,
    ) -> list[PromptSearch]:
        """Run `run` to its end and return its searches."""
        steps = self.run(prompts, config, seeds, evaluator=evaluator, cancel=cancel)
        while True:
            try:
                next(steps)
            except StopIteration as finished:
                return finished.value

    # ------------------------------------------------------------------ one step
    def _decode_step(
        self,
        state: Any,
        parents: _Rows,
        layout: _Layout,
        config: GuardConfig,
        samplers: PromptSamplers,
        searches: Mapping[int, PromptSearch],
        evaluator: CandidateEvaluator,
        cancel: threading.Event | None,
    ) -> _Step:
        """Decode and score one block for every row, resampling all-unsafe prompts."""
        rounds = config.resample_rounds if self.resample else 0
        # Only a search that may resample pays for a checkpoint (on sliding-window and
        # linear-attention layers it copies part of the cache).
        checkpoint = self.lm.checkpoint(state, layout.block_len) if rounds else None
        limits = layout.row_limits()
        all_rows = torch.arange(len(parents.token_ids))
        sampling = SamplingSettings.of(config)
        grammar = _block_grammar(parents, all_rows)
        block = self.lm.sample_block(
            state,
            BlockRequest(
                num_tokens=layout.block_len,
                rows=all_rows,
                prompt_ids=layout.live,
                group_sizes=layout.group_sizes,
                samplers=samplers,
                sampling=sampling,
                histories=self._histories(sampling, searches, layout, parents, all_rows),
                limits=limits,
                grammar=grammar,
                cancel=cancel,
            ),
        )
        step = self._score(block, parents, layout, all_rows, grammar, config, evaluator)
        for group, size in enumerate(layout.group_sizes):
            searches[layout.live[group]].blocks += 1
            searches[layout.live[group]].candidates_scored += size
        penalty_mask = None
        for _ in range(rounds):
            unsafe = over_budget(step.rows.z)
            failing = [
                g for g, group in enumerate(unsafe.split(layout.group_sizes)) if bool(group.all())
            ]
            if not failing:
                break
            round_mask = unsafe_token_mask(
                block.tokens,
                unsafe.to(block.tokens.device),
                layout.group_sizes,
                self.lm.vocab_size,
            )
            penalty_mask = round_mask if penalty_mask is None else penalty_mask | round_mask
            resampled = torch.cat([layout.group_rows(g) for g in failing])
            if checkpoint is not None:
                checkpoint.rewind(state)
            grammar = _block_grammar(parents, resampled)
            block = self.lm.sample_block(
                state,
                BlockRequest(
                    num_tokens=layout.block_len,
                    rows=resampled,
                    prompt_ids=[layout.live[g] for g in failing],
                    group_sizes=[layout.group_sizes[g] for g in failing],
                    samplers=samplers,
                    sampling=sampling,
                    histories=self._histories(sampling, searches, layout, parents, resampled),
                    unsafe_mask=penalty_mask[
                        layout.group_of_row[resampled].to(penalty_mask.device)
                    ],
                    unsafe_penalty=config.unsafe_logit_penalty,
                    limits=limits,
                    replay=block,
                    grammar=grammar,
                    cancel=cancel,
                ),
            )
            step = step.splice(
                resampled,
                self._score(block, parents, layout, resampled, grammar, config, evaluator),
            )
            for g in failing:
                searches[layout.live[g]].resample_rounds += 1
                searches[layout.live[g]].candidates_scored += layout.group_sizes[g]
        return step

    @staticmethod
    def _histories(
        sampling: SamplingSettings,
        searches: Mapping[int, PromptSearch],
        layout: _Layout,
        parents: _Rows,
        rows: torch.Tensor,
    ) -> list[list[int]] | None:
        """The token histories the repetition penalty of `rows` (`(n,)` index into the
        step's rows) looks at: each row's prompt and its parent beam's response, or None
        when the penalty is off. Built from `parents` at every decode of a block, so the
        histories follow the rows through fan-out, pruning and rewinds."""
        if sampling.repetition_penalty == 1.0:
            return None
        group_of_row = layout.group_of_row.tolist()
        return [
            searches[layout.live[group_of_row[row]]].prompt.ids + parents.token_ids[row]
            for row in rows.tolist()
        ]

    def _score(
        self,
        block: DecodedBlock,
        parents: _Rows,
        layout: _Layout,
        rows: torch.Tensor,
        grammar: RowGrammars | None,
        config: GuardConfig,
        evaluator: CandidateEvaluator,
    ) -> _Step:
        """Build and score the candidates of `rows` (a `(n,)` index into the step's rows),
        whose grammar states after the block are `grammar`."""
        device = block.tokens.device
        index = rows.to(device)
        tokens = block.tokens[index]
        eos = torch.tensor(sorted(self.lm.eos_token_ids), device=device)
        kept = (tokens >= 0) & ~torch.isin(tokens, eos)
        token_ids = [
            parents.token_ids[row] + toks[keep].tolist()
            for row, toks, keep in zip(rows.tolist(), tokens, kept, strict=True)
        ]
        texts = self.lm.decode(token_ids)
        reasons: list[Literal["stop", "length"] | None] = []
        group_of_row = layout.group_of_row[rows].tolist()
        for i, ended in enumerate(block.ended[index].tolist()):
            own = layout.configs[group_of_row[i]]
            stopped = cut_before_stop(self.lm, token_ids[i], texts[i], own.stop)
            if stopped is not None:
                token_ids[i], texts[i] = stopped
                reasons.append("stop")
            elif ended:
                reasons.append("stop")
            elif layout.generated[group_of_row[i]] >= own.max_new_tokens:
                reasons.append("length")
            else:
                reasons.append(None)
        candidates = Candidates(
            prompt_texts=[layout.prompt_texts[g] for g in group_of_row],
            texts=texts,
            token_ids=token_ids,
            hidden=_block_hidden(block)[index],
            new_tokens=(tokens >= 0).sum(-1),
            finished=[reason is not None for reason in reasons],
        )
        length = parents.length[index] + candidates.new_tokens
        logprob = parents.logprob[index] + block.logprob[index]
        parent = parents.select(index)
        budget = layout.budgets(rows)
        if not self.scores_cost:  # nothing scored: the final check scores the text
            estimate = torch.full(budget.shape, -torch.inf, dtype=torch.float64)
        else:
            estimate = evaluator.cost(candidates).to(device="cpu", dtype=torch.float64)
        cost, z, reward, score = self._values(
            candidates, estimate, budget, parent, logprob, length, evaluator, config
        )
        group_sizes = layout.group_of_row[rows].unique_consecutive(return_counts=True)[1]
        if config.reward_calibration != "none":
            score = self._calibrated_objective(reward, cost, z, group_sizes.tolist(), config)
        if not evaluator.exact_cost:
            self._settle(
                candidates,
                group_sizes.tolist(),
                (cost, z, reward, score),
                budget,
                parent,
                logprob,
                length,
                evaluator,
                config,
            )
        return _Step(
            rows=_Rows(token_ids, cost, z, logprob, length, grammar),
            texts=texts,
            reasons=reasons,
            reward=reward if evaluator.has_reward_model and evaluator.exact_reward else None,
            score=score,
        )

    def _values(
        self,
        candidates: Candidates,
        estimate: torch.Tensor,
        budget: torch.Tensor,
        parent: _Rows,
        logprob: torch.Tensor,
        length: torch.Tensor,
        evaluator: CandidateEvaluator,
        config: GuardConfig,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cumulative cost, safety state, reward and score of candidates whose cost
        C(x, y_<=t) is `estimate` (`(rows, constraints)` float64 on the CPU, -inf where
        nothing is scored) and whose budgets are `budget` (`(rows, constraints)` float64 on
        the CPU); `parent` holds their parents' rows. All four are float64 on the CPU:
        cost and z `(rows, constraints)`, reward and score `(rows,)`."""
        # Cumulative cost never falls: what has been said cannot be unsaid, and a
        # learned cost model that "forgets" an unsafe prefix must not be exploitable.
        # Before the first block the parent's cost is -inf, so the first cost stands.
        cost = torch.maximum(estimate, parent.cost)
        said = torch.isfinite(cost)
        if config.safety_discount == 1.0:
            # z = d - C(x, y) in one subtraction, whose sign is exact: a cost equal to the
            # budget leaves z = 0, where summed increments could round below it.
            z = torch.where(said, budget - cost, parent.z)
        else:
            # The empty response costs 0, so z_0 = d.
            previous = torch.where(torch.isfinite(parent.cost), parent.cost, 0.0)
            z = update_safety_state(
                parent.z,
                previous,
                torch.where(said, cost, previous),
                candidates.new_tokens.cpu(),
                config.safety_discount,
            )
        if evaluator.has_reward_model:
            reward = evaluator.reward(candidates, z)
        else:
            reward = logprob / length.clamp_min(1)
        reward = reward.to(device="cpu", dtype=torch.float64)
        return cost, z, reward, self._objective(reward, cost, z, config)

    def _settle(
        self,
        candidates: Candidates,
        group_sizes: list[int],
        values: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        budget: torch.Tensor,
        parent: _Rows,
        logprob: torch.Tensor,
        length: torch.Tensor,
        evaluator: CandidateEvaluator,
        config: GuardConfig,
    ) -> None:
        """Replace estimated costs by the cost model's wherever a candidate would be kept.

        When the search's costs are estimates (the critic's cost probe), the cost model
        scores each group's current top `beam_width`; candidates it finds over budget
        drop in rank and the next ones are checked, until every kept candidate's cost is
        the cost model's. So beams and finished responses carry exact costs, at the price
        of scoring about `beam_width` candidates per prompt and step instead of
        `num_candidates`. `values` (cost, z, reward, score) are updated in place.
        """
        score = values[3]
        checked = torch.zeros(len(candidates.texts), dtype=torch.bool)
        while True:
            tops = top_k_per_group(score.cpu(), group_sizes, config.beam_width)
            pending = torch.cat(tops)
            pending = pending[~checked[pending]]
            if not len(pending):
                return
            checked[pending] = True
            picked = candidates.select(pending)
            exact = evaluator.model_cost(picked).to(device="cpu", dtype=torch.float64)
            on_device = pending.to(logprob.device)
            fresh = self._values(
                picked,
                exact,
                budget[pending],
                parent.select(pending),
                logprob[on_device],
                length[on_device],
                evaluator,
                config,
            )
            for tensor, new in zip(values, fresh, strict=True):
                tensor[pending] = new
            if config.reward_calibration != "none":
                cost, z, reward = values[:3]
                score[:] = self._calibrated_objective(reward, cost, z, group_sizes, config)

    def _calibrated_objective(
        self,
        reward: torch.Tensor,
        cost: torch.Tensor,
        z: torch.Tensor,
        group_sizes: list[int],
        config: GuardConfig,
    ) -> torch.Tensor:
        """`(rows,)` scores of candidates whose raw rewards `reward` (`(rows,)`, in contiguous
        prompt groups of `group_sizes`) are first calibrated within their group under
        `config.reward_calibration` (`inference_safeguard.calibration`); the group's
        candidates are the reference sample. The raw rewards stay what results report."""
        calibrated = calibrate_rewards(
            reward, group_sizes, config.reward_calibration, config.calibration_exponent
        )
        return self._objective(calibrated, cost, z, config)

    def _objective(
        self, reward: torch.Tensor, cost: torch.Tensor, z: torch.Tensor, config: GuardConfig
    ) -> torch.Tensor:
        if self.scoring == "augmented":
            return augmented_score(reward, z, config.unsafe_penalty)
        if self.scoring == "lagrangian":
            return lagrangian_score(reward, cost, self.lagrange_multiplier)
        return reward

    # ------------------------------------------------------------------ selection
    def _select(
        self,
        step: _Step,
        layout: _Layout,
        config: GuardConfig,
        runs: Mapping[int, _PromptRun],
    ) -> tuple[torch.Tensor, list[int], list[int]]:
        """Keep the top `beam_width` candidates per prompt.

        Finished ones join their prompt's finished list; the others stay live beams.
        Updates the runs' `committed` where they stream.

        Returns:
            Row indices of the live beams (grouped by prompt), the live beams per
            still-live prompt, and the still-live prompts.
        """
        keep: list[int] = []
        beams: list[int] = []
        live: list[int] = []
        score = step.score.cpu()
        tops = top_k_per_group(score, layout.group_sizes, config.beam_width)
        for group, top in enumerate(tops):
            run = runs[layout.live[group]]
            search = run.search
            kept = []
            for row in top.tolist():
                reason = step.reasons[row]
                if reason is None:
                    kept.append(row)
                    continue
                search.finished.append(
                    Finished(
                        token_ids=step.rows.token_ids[row],
                        text=step.texts[row],
                        cost=tuple(step.rows.cost[row].tolist()),
                        reward=None if step.reward is None else float(step.reward[row]),
                        score=float(score[row]),
                        finish_reason=reason,
                        cost_checked=self.scores_cost,
                        complete=step.rows.grammar is None or step.rows.grammar.complete(row),
                    )
                )
            if run.commit == "block" and not bool(over_budget(step.rows.z[top[:1]])[0]):
                run.committed = step.rows.token_ids[int(top[0])]
                kept = [r for r in kept if _starts_with(step.rows.token_ids[r], run.committed)]
                search.finished = [
                    f for f in search.finished if _starts_with(f.token_ids, run.committed)
                ]
            elif run.commit == "agreement":
                run.committed = _common_prefix(
                    [step.rows.token_ids[r] for r in kept] + [f.token_ids for f in search.finished]
                )
            if kept:
                keep.extend(kept)
                beams.append(len(kept))
                live.append(layout.live[group])
        return torch.tensor(keep, dtype=torch.long), beams, live


@dataclass
class _PromptRun:
    """A prompt in a running search, with its own settings and progress.

    Attributes:
        config: the prompt's settings; its budget, `max_new_tokens` and stop strings
            are its own, the rest is the running search's.
        commit: what each step commits for streaming (see `BlockSearch.run`), or None.
        generated: response tokens decoded so far (its blocks' lengths).
        committed: the committed response token ids.
    """

    search: PromptSearch
    config: GuardConfig
    commit: Literal["agreement", "block"] | None
    generated: int = 0
    committed: list[int] = field(default_factory=list)


class RunningSearch:
    """A block search whose prompts change between steps: they join (`add`) and leave
    (finished, or `drop`ped) at block boundaries.

    `BlockSearch.run` drives one for a fixed set of prompts; the engine
    (`inference_safeguard.engine`) drives one per group of requests that share a search
    shape. Every prompt shares `config`'s shape (candidates, beams, block size, resample
    rounds, penalties, sampling); each keeps its own budget, `max_new_tokens`, stop
    strings, seed and commit mode, and decodes exactly as it would alone: its sampler is
    its own, and the rows of prompts that joined later are appended to the decode state
    with the shorter KV cache left-padded (`CausalLM.merge`).

    Args:
        search: the block search whose model, scoring and steps this runs.
        config: the shared search settings.
        evaluator: where costs and rewards come from (default: the search's own).
        cancel: once set, `step` raises `GenerationCancelledError` before its next
            decoded token.
    """

    def __init__(
        self,
        search: BlockSearch,
        config: GuardConfig,
        evaluator: CandidateEvaluator | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.search = search
        self.config = config.with_sampling_defaults(search.lm.sampling_defaults)
        self.evaluator = evaluator or search.evaluator
        self.cancel = cancel
        self.live: list[int] = []
        """The live prompts (slots), in the order of their rows."""
        self._runs: dict[int, _PromptRun] = {}
        self._samplers = PromptSamplers([], search.lm.device)
        self._next_slot = 0
        self._state: Any = None  # the backend's decode state, None when nothing is live
        self._rows: _Rows | None = None
        self._beams: list[int] = []  # live beams of each live prompt
        self._beam_rows = torch.zeros(0, dtype=torch.long)  # their rows in the state
        self._prefilled = False  # the state holds just one prefill row per live prompt

    @property
    def rows(self) -> int:
        """Rows of the decode state (0 when no prompt is live)."""
        return 0 if self._state is None else self._state.rows

    @property
    def can_merge(self) -> bool:
        """Whether prompts can join now: nothing is live, or the model's cache can take
        left-padded rows (full attention only; see `kv_cache.merge_rows`)."""
        return self._state is None or self.search.lm.can_merge(self._state)

    def add(
        self,
        prompts: Sequence[EncodedPrompt],
        configs: Sequence[GuardConfig],
        seeds: Sequence[int],
        commit: Literal["agreement", "block"] | None = None,
    ) -> list[int]:
        """Prefill `prompts` and let them join at the next step.

        Args:
            prompts: validated prompts.
            configs: each prompt's settings (see `_PromptRun.config`).
            seeds: one sampler seed per prompt.
            commit: what each step commits for these prompts when streaming.

        Returns:
            Each prompt's slot, the key of `take`, `drop` and `committed`.

        Raises:
            NotImplementedError: prompts are live and the cache cannot take more rows
                (`can_merge` is False).
        """
        slots = list(range(self._next_slot, self._next_slot + len(prompts)))
        self._next_slot += len(prompts)
        lm = self.search.lm
        state = lm.prefill([p.ids for p in prompts])
        device = lm.output_device
        z = torch.tensor([budget_vector(c) for c in configs], dtype=torch.float64)
        rows = _Rows(
            token_ids=[[] for _ in prompts],
            cost=torch.full(z.shape, -torch.inf, dtype=torch.float64),
            z=z,
            logprob=torch.zeros(len(prompts), device=device),
            length=torch.zeros(len(prompts), device=device),
            grammar=lm.row_grammars([p.constraint for p in prompts]),
        )
        joined = torch.arange(len(prompts))
        if self._state is None or self._rows is None:
            self._state, self._rows, self._prefilled = state, rows, True
        else:
            joined = joined + self._state.rows
            lm.merge(self._state, state)
            self._rows = self._rows.concat(rows)
            self._prefilled = False
        self._beam_rows = torch.cat([self._beam_rows, joined])
        for slot, prompt, config, seed in zip(slots, prompts, configs, seeds, strict=True):
            self._runs[slot] = _PromptRun(PromptSearch(prompt), config, commit)
            self._samplers.add(slot, seed)
        self.live += slots
        self._beams += [1] * len(prompts)
        return slots

    def step(self) -> list[int]:
        """Decode, score and select one block for every live prompt.

        Returns:
            The slots whose search ended in this step (`take` gives their results).
        """
        raise_if_cancelled(self.cancel)
        if self._state is None or self._rows is None:
            return []
        config, state = self.config, self._state
        children = [config.num_candidates // k for k in self._beams]
        per_beam = torch.tensor(
            [c for k, c in zip(self._beams, children, strict=True) for _ in range(k)]
        )
        parent_index = self._beam_rows.repeat_interleave(per_beam)
        if self._prefilled:  # each prompt's single prefill row becomes N candidates
            self.search.lm.fan_out(state, config.num_candidates)
        else:  # one gather both drops the pruned rows and fans the kept beams out
            self.search.lm.select_rows(state, parent_index)
        self._prefilled = False
        parents = self._rows.select(parent_index.to(self.search.lm.output_device))
        runs = [self._runs[slot] for slot in self.live]
        block_lens = [min(config.block_size, r.config.max_new_tokens - r.generated) for r in runs]
        for run, block_len in zip(runs, block_lens, strict=True):
            run.generated += block_len
        layout = _Layout(
            live=self.live,
            group_sizes=[k * c for k, c in zip(self._beams, children, strict=True)],
            prompt_texts=[r.search.prompt.text for r in runs],
            generated=[r.generated for r in runs],
            block_lens=block_lens,
            configs=[r.config for r in runs],
        )
        searches = {slot: run.search for slot, run in self._runs.items()}
        step = self.search._decode_step(
            state, parents, layout, config, self._samplers, searches, self.evaluator, self.cancel
        )
        self._beam_rows, self._beams, live = self.search._select(step, layout, config, self._runs)
        self._rows = step.rows
        still_live = set(live)
        ended = [slot for slot in self.live if slot not in still_live]
        self.live = live
        if not live:  # free the cache now, not when the next prompt joins
            self._state = self._rows = None
            self._beam_rows = torch.zeros(0, dtype=torch.long)
        return ended

    def committed(self, slot: int) -> list[int] | None:
        """The response token ids committed for `slot` so far, or None when it does not
        commit or its search is over."""
        run = self._runs[slot]
        return run.committed if run.commit and slot in self.live else None

    def take(self, slot: int) -> PromptSearch:
        """The search of an ended prompt, which the running search then forgets."""
        if slot in self.live:
            raise ValueError(f"prompt {slot} is still live; drop it or step until it ends")
        self._samplers.discard(slot)
        return self._runs.pop(slot).search

    def drop(self, slots: Sequence[int]) -> None:
        """Remove live prompts at once (cancelled, timed out): their rows leave the
        decode state now and their searches are forgotten."""
        gone = set(slots)
        starts = [0, *itertools.accumulate(self._beams)]
        kept = [g for g, slot in enumerate(self.live) if slot not in gone]
        for slot in gone:
            self._runs.pop(slot, None)
            self._samplers.discard(slot)
        if len(kept) == len(self.live):
            return
        self.live = [self.live[g] for g in kept]
        self._beams = [self._beams[g] for g in kept]
        if not kept or self._state is None or self._rows is None:
            self._state = self._rows = None
            self._beam_rows = torch.zeros(0, dtype=torch.long)
            return
        rows = torch.cat([self._beam_rows[starts[g] : starts[g + 1]] for g in kept])
        self.search.lm.select_rows(self._state, rows)
        self._rows = self._rows.select(rows.to(self.search.lm.output_device))
        self._beam_rows = torch.arange(len(rows))


def _block_hidden(block: DecodedBlock) -> torch.Tensor:
    """`(rows, hidden)` hidden states at the block ends, `(rows, 0)` where the backend
    has none."""
    if block.hidden is not None:
        return block.hidden
    return torch.zeros(block.tokens.shape[0], 0, device=block.tokens.device)


def _block_grammar(parents: _Rows, rows: torch.Tensor) -> RowGrammars | None:
    """Grammar states to decode `rows`' block from: copies of their parents'."""
    return None if parents.grammar is None else parents.grammar.for_rows(rows.tolist())


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None (so `text[:cut]` is the
    text before it either way)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def cut_before_stop(
    lm: LanguageModel, token_ids: list[int], text: str, stops: Sequence[str]
) -> tuple[list[int], str] | None:
    """A response ended before its first stop string: `(token_ids, text)`, or None when
    `text` (the decoding of `token_ids`) holds no stop string.

    The response ends at the last token boundary before the stop string: when the stop
    string starts inside a token, that token goes, with its characters before the stop
    string, so that the token ids still decode to the text.
    """
    cut = first_stop(text, stops)
    if cut is None:
        return None
    head = text[:cut]
    for end in range(len(token_ids), 0, -1):
        decoded = lm.decode([token_ids[:end]])[0]
        if head.startswith(decoded):
            return token_ids[:end], decoded
    return [], ""


def settled_prefix(lm: LanguageModel, token_ids: list[int], stops: Sequence[str]) -> str:
    """The text of the longest prefix of `token_ids` that can no longer change: one whose
    text ends neither in a partial character nor in the start of a stop string (the
    search may still cut there, at the token boundary before it; see `cut_before_stop`).
    """
    for end in range(len(token_ids), 0, -1):
        text = lm.decode([token_ids[:end]])[0]
        partial_stop = any(
            text.endswith(stop[:size]) for stop in stops for size in range(1, len(stop))
        )
        if not text.endswith("\ufffd") and not partial_stop:
            return text
    return ""


def _starts_with(token_ids: list[int], prefix: list[int]) -> bool:
    return token_ids[: len(prefix)] == prefix


def _common_prefix(sequences: list[list[int]]) -> list[int]:
    """Longest common prefix of token id lists."""
    if not sequences:
        return []
    prefix = sequences[0]
    for seq in sequences[1:]:
        n = 0
        while n < min(len(prefix), len(seq)) and prefix[n] == seq[n]:
            n += 1
        prefix = prefix[:n]
    return prefix
