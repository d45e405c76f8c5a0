"""Rollout collection: sampled responses, recorded at every block end, as critic training data.

Each prompt is prefilled once and fanned out into `samples_per_prompt` rows that are
sampled block by block, as the search samples its candidates. At every block end the
rows still generating record the base model's last-layer hidden state and the running
cumulative cost of their text so far; when a row is finished, its final cost and the
reward model's score of its response become the targets of every point it recorded.

The cumulative cost follows the search's rule: the highest cost the cost model gave any
block-end prefix of the response, so it never falls within a rollout (the first block's
cost stands as scored, negative included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from inference_safeguard.config import MIN_TEMPERATURE
from inference_safeguard.lm import CausalLM, EncodedPrompt, PromptInput
from inference_safeguard.sampling import PromptSamplers
from inference_safeguard.scorers import Scorer


@dataclass(frozen=True)
class RolloutSet:
    """Points recorded at the block ends of sampled responses.

    One row per recorded block end ("point"). All tensors are on the CPU.

    Attributes:
        hidden: `(points, hidden_size)` float32 last-layer hidden state of the last
            token decoded by the block.
        prefix_cost: `(points,)` float32 cumulative cost C(x, y_<=t) of the response so
            far: the running max of the cost model over the rollout's block ends.
        final_cost: `(points,)` float32 the finished rollout's cumulative cost (the
            running max up to and including its final text).
        final_reward: `(points,)` float32 reward model's score of the finished response.
        rollout: `(points,)` long id of the rollout the point belongs to.
        prompt: `(points,)` long index of its prompt in the prompts collected from.
        tokens: `(points,)` long response tokens so far (EOS excluded).
    """

    hidden: torch.Tensor
    prefix_cost: torch.Tensor
    final_cost: torch.Tensor
    final_reward: torch.Tensor
    rollout: torch.Tensor
    prompt: torch.Tensor
    tokens: torch.Tensor

    def __post_init__(self) -> None:
        if self.hidden.ndim != 2:
            raise ValueError(
                f"hidden must be (points, hidden_size), got shape {tuple(self.hidden.shape)}"
            )
        points = self.hidden.shape[0]
        for name in ("prefix_cost", "final_cost", "final_reward", "rollout", "prompt", "tokens"):
            shape = tuple(getattr(self, name).shape)
            if shape != (points,):
                raise ValueError(
                    f"{name} has shape {shape}, but hidden holds {points} points; every "
                    f"field needs shape ({points},)"
                )

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @property
    def num_rollouts(self) -> int:
        return int(self.rollout.unique().numel())

    @property
    def num_prompts(self) -> int:
        return int(self.prompt.unique().numel())

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[1]

    def subset(self, mask: torch.Tensor) -> RolloutSet:
        """The points where `mask` (`(points,)` bool, or `(kept,)` long indices) selects."""
        return RolloutSet(
            hidden=self.hidden[mask],
            prefix_cost=self.prefix_cost[mask],
            final_cost=self.final_cost[mask],
            final_reward=self.final_reward[mask],
            rollout=self.rollout[mask],
            prompt=self.prompt[mask],
            tokens=self.tokens[mask],
        )


def collect_rollouts(
    lm: CausalLM,
    prompts: Sequence[PromptInput],
    cost: Scorer,
    reward: Scorer,
    *,
    samples_per_prompt: int = 8,
    block_size: int = 8,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    prompts_per_batch: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> RolloutSet:
    """Sample `samples_per_prompt` responses per prompt and record them at every block end.

    Prompts are decoded `prompts_per_batch` at a time: one prefill, a fan-out to
    `prompts_per_batch * samples_per_prompt` rows, then one batched decode per block.
    After each block, one cost-scorer call scores the text of every row that was still
    generating when the block began; after the last block, one reward-scorer call
    scores every finished response of the batch. A batch stops early once every row
    has emitted EOS.

    Each prompt samples from its own generator, seeded from `seed` and the prompt's
    position, so the same arguments give the same rollouts.

    Args:
        lm: the base model.
        prompts: plain-text prompts or chat message lists.
        cost: cost scorer, called on `(prompt texts, response texts so far)`.
        reward: reward scorer, called on the finished responses.
        samples_per_prompt: rollouts per prompt.
        block_size: tokens per block (points are recorded at block ends).
        max_new_tokens: most tokens per response.
        temperature, top_k, top_p: sampling settings (temperature > 0).
        prompts_per_batch: prompts decoded together.
        seed: seed of the per-prompt samplers.
        progress: show a tqdm progress bar over prompts on standard error.

    Returns:
        The rollouts; rollout `i` of prompt `p` has id `p * samples_per_prompt + i`.

    Raises:
        InvalidPromptError: no prompts, or a prompt that is empty or malformed.
        PromptTooLongError: a prompt plus `max_new_tokens` exceeds the context window.
        ValueError: a setting out of range.
    """
    _check_settings(
        samples_per_prompt, block_size, max_new_tokens, temperature, top_k, top_p, prompts_per_batch
    )
    encoded = lm.encode_batch(prompts, max_new_tokens)
    seeds = torch.randint(
        0, 2**62, (len(encoded),), generator=torch.Generator().manual_seed(seed)
    ).tolist()
    sampling = (temperature, top_k, top_p)
    parts: list[RolloutSet] = []
    with tqdm(total=len(encoded), unit="prompt", desc="rollouts", disable=not progress) as bar:
        for start in range(0, len(encoded), prompts_per_batch):
            batch = encoded[start : start + prompts_per_batch]
            parts.append(
                _roll_out_batch(
                    lm,
                    batch,
                    start,
                    seeds[start : start + len(batch)],
                    cost,
                    reward,
                    samples_per_prompt,
                    block_size,
                    max_new_tokens,
                    sampling,
                )
            )
            bar.update(len(batch))
    # Concatenated outside inference mode, so the result holds ordinary tensors that
    # training can use.
    return RolloutSet(
        **{
            name: torch.cat([getattr(part, name) for part in parts])
            for name in RolloutSet.__dataclass_fields__
        }
    )


@torch.inference_mode()
def _roll_out_batch(
    lm: CausalLM,
    batch: list[EncodedPrompt],
    first_prompt: int,
    seeds: list[int],
    cost: Scorer,
    reward: Scorer,
    samples: int,
    block_size: int,
    max_new_tokens: int,
    sampling: tuple[float, int, float],
) -> RolloutSet:
    """Roll out prompts `first_prompt, first_prompt + 1, ...`; rows are grouped by prompt,
    `samples` rows each."""
    temperature, top_k, top_p = sampling
    state = lm.prefill([p.ids for p in batch])
    lm.fan_out(state, samples)
    rows = state.rows
    samplers = PromptSamplers(seeds, lm.device)
    group_sizes, groups = [samples] * len(batch), list(range(len(batch)))

    def choose(logits: torch.Tensor, step: int) -> torch.Tensor:
        return samplers.sample(logits, group_sizes, groups, temperature, top_k, top_p)

    prompt_texts = [p.text for p in batch for _ in range(samples)]
    eos = torch.tensor(sorted(lm.eos_token_ids), dtype=torch.long)
    token_ids: list[list[int]] = [[] for _ in range(rows)]
    # -inf until a row's first block is scored: its first cost stands, negative included.
    running_cost = torch.full((rows,), -math.inf)
    live = torch.ones(rows, dtype=torch.bool)
    hidden, prefix_cost, point_rows, point_tokens = [], [], [], []
    generated = 0
    while generated < max_new_tokens and bool(live.any()):
        block = lm.decode_block(state, min(block_size, max_new_tokens - generated), choose)
        generated += block.tokens.shape[1]
        tokens = block.tokens.cpu()
        kept = (tokens >= 0) & ~torch.isin(tokens, eos)
        recorded = live.nonzero().squeeze(-1)
        recorded_rows = recorded.tolist()
        for row in recorded_rows:
            token_ids[row] += tokens[row][kept[row]].tolist()
        texts = lm.decode([token_ids[row] for row in recorded_rows])
        block_cost = cost([prompt_texts[row] for row in recorded_rows], texts)
        running_cost[recorded] = torch.maximum(running_cost[recorded], block_cost.float())
        hidden.append(state.hidden[recorded.to(state.hidden.device)].float().cpu())
        prefix_cost.append(running_cost[recorded])
        point_rows.append(recorded)
        point_tokens.append(torch.tensor([len(token_ids[row]) for row in recorded_rows]))
        live &= ~block.ended.cpu()
    final_reward = reward(prompt_texts, lm.decode(token_ids))
    row = torch.cat(point_rows)
    return RolloutSet(
        hidden=torch.cat(hidden),
        prefix_cost=torch.cat(prefix_cost),
        final_cost=running_cost[row],
        final_reward=final_reward[row],
        rollout=first_prompt * samples + row,
        prompt=first_prompt + row // samples,
        tokens=torch.cat(point_tokens),
    )


def _check_settings(
    samples_per_prompt: int,
    block_size: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    prompts_per_batch: int,
) -> None:
    for name, value in (
        ("samples_per_prompt", samples_per_prompt),
        ("block_size", block_size),
        ("max_new_tokens", max_new_tokens),
        ("prompts_per_batch", prompts_per_batch),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE)
    ):
        raise ValueError(
            f"temperature must be a finite number >= {MIN_TEMPERATURE}, got {temperature!r}; "
            "rollouts are sampled (greedy decoding would make every rollout of a prompt the "
            "same, and a smaller temperature overflows the logits)"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 keeps every token), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}")
