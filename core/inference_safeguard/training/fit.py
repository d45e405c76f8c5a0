"""Critic fitting: a `LatentCritic` trained on rollouts, with a report on held-out prompts.

The training loop, top to bottom:

1. Split the rollouts by prompt (seeded): no prompt's rollouts are in both splits.
2. Standardise with training-split statistics (hidden states, rewards, prefix costs;
   `z_scale` is the spread of the final costs) and build the critic.
3. Each epoch, give every training point a budget `d`: the target budget, or for a
   fraction `budget_augmentation` of points (redrawn every epoch) one drawn uniformly
   from the range of training costs, which teaches the critic how the safety state
   matters. The critic reads `(h, z = d - prefix_cost)` (safety discount 1); its
   labels are `final_cost <= d` for `p_safe`, the standardised final reward for
   `r_hat` and, with a probe, the standardised prefix cost.
4. Loss = BCE(safe logit) + MSE(reward) [+ MSE(probe)]; AdamW over shuffled
   mini-batches. Validation uses the target budget only.
5. Stop when the validation loss has not improved for `patience` epochs and restore
   the best epoch's weights; report held-out metrics at the target budget.

Everything runs on the CPU and is deterministic for a fixed seed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from inference_safeguard.critic import CriticConfig, LatentCritic, ModelFingerprint
from inference_safeguard.errors import CriticTrainingError
from inference_safeguard.lm import CausalLM, PromptInput
from inference_safeguard.scorers import Scorer
from inference_safeguard.training.rollouts import RolloutSet, collect_rollouts

MIN_PROMPTS = 2
"""Fewest prompts a critic can be fitted on: one to train on, one to validate on."""

_MIN_SCALE = 1e-3
"""Floor of every standard deviation used to standardise, so constants divide safely."""

_CALIBRATION_BINS = 10


class CriticTrainingSettings(BaseModel):
    """Settings of `fit_critic`, checked at construction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(256, ge=1, le=65536, description="Width of the critic's hidden layers.")
    epochs: int = Field(
        50,
        ge=1,
        le=100_000,
        description="Most passes over the training points (early stopping may end sooner).",
    )
    batch_size: int = Field(64, ge=1, le=1 << 20, description="Points per optimiser step.")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="AdamW weight decay.")
    validation_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Fraction of the prompts held out, with all their rollouts, for early "
        "stopping and the report (at least one prompt on each side).",
    )
    patience: int = Field(
        5,
        ge=1,
        le=100_000,
        description="Stop after this many epochs without a lower validation loss; the best "
        "epoch's weights are kept.",
    )
    cost_probe: bool = Field(
        True,
        description="Also train a cost probe (the prefix's cost from the hidden state "
        "alone), so that the search can run without the cost model.",
    )
    budget_augmentation: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Chance that a training point's budget is drawn uniformly from the range "
        "of training costs (redrawn every epoch) instead of being the target budget.",
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seed of the split, the initial weights, the shuffling and the budget draws.",
    )


DEFAULT_SETTINGS = CriticTrainingSettings()
"""The default training settings (frozen, so safe to share)."""


@dataclass(frozen=True)
class TrainingReport:
    """What `fit_critic` did and how the critic does on held-out prompts.

    Held-out metrics are taken at the target budget, over validation points:

    Attributes:
        train_points, validation_points: block-end points in each split.
        train_rollouts, validation_rollouts: rollouts in each split.
        train_prompts, validation_prompts: prompts in each split.
        epochs_run: epochs trained before stopping.
        best_epoch: the epoch (from 1) whose weights were kept.
        train_loss: mean training loss of each epoch.
        validation_loss: validation loss after each epoch.
        seconds: wall time of the fit.
        budget: the target budget.
        p_safe_brier: mean squared error of `p_safe` against "the rollout ended within
            budget".
        p_safe_brier_baseline: the same for a constant predictor at the training safe
            rate (a useful critic scores below it).
        p_safe_ece: expected calibration error of `p_safe` over 10 equal-width bins.
        safe_rate: fraction of validation points whose rollout ended within budget.
        r_hat_mae, r_hat_rmse: errors of `r_hat` against the final reward.
        reward_std: standard deviation of the validation final rewards (the RMSE of
            predicting their mean).
        probe_mae: mean absolute error of the cost probe against the prefix cost; None
            without a probe.
        probe_over_budget_accuracy: how often "probe cost > budget" agrees with "prefix
            cost > budget"; None without a probe.
        settings: the `CriticTrainingSettings` used.
    """

    train_points: int
    validation_points: int
    train_rollouts: int
    validation_rollouts: int
    train_prompts: int
    validation_prompts: int
    epochs_run: int
    best_epoch: int
    train_loss: list[float]
    validation_loss: list[float]
    seconds: float
    budget: float
    p_safe_brier: float
    p_safe_brier_baseline: float
    p_safe_ece: float
    safe_rate: float
    r_hat_mae: float
    r_hat_rmse: float
    reward_std: float
    probe_mae: float | None
    probe_over_budget_accuracy: float | None
    settings: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-safe builtins (what `critic.json` stores under `training`)."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------- fitting
def fit_critic(
    rollouts: RolloutSet,
    *,
    budget: float,
    block_size: int,
    fingerprint: ModelFingerprint,
    settings: CriticTrainingSettings = DEFAULT_SETTINGS,
    progress: bool = True,
) -> tuple[LatentCritic, TrainingReport]:
    """Fit a critic to rollouts (see the module docstring for the loop).

    Args:
        rollouts: points from `collect_rollouts`, of at least `MIN_PROMPTS` prompts.
        budget: the target budget d.
        block_size: tokens per block of the rollouts (stored in the critic's config).
        fingerprint: the base model that produced the rollouts.
        settings: training settings.
        progress: show a tqdm bar over epochs, with the losses, on standard error.

    Returns:
        The critic in eval mode on the CPU (the best validation epoch's weights), and
        the report; save both with `critic.save(directory, training=report.as_dict())`.

    Raises:
        CriticTrainingError: fewer than `MIN_PROMPTS` prompts, or a non-finite loss.
        ValueError: a non-finite budget or a block size below 1.
    """
    started = time.perf_counter()
    if not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number, got {budget!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    is_train = split_by_prompt(rollouts.prompt, settings.validation_fraction, settings.seed)
    train, validation = rollouts.subset(is_train), rollouts.subset(~is_train)
    critic = _initial_critic(train, budget, block_size, fingerprint, settings)

    optimizer = torch.optim.AdamW(
        critic.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    generator = torch.Generator().manual_seed(settings.seed)
    validation_budgets = torch.full((len(validation),), float(budget))
    train_losses: list[float] = []
    validation_losses: list[float] = []
    best_loss, best_epoch, best_state = math.inf, 0, {}
    bar = tqdm(total=settings.epochs, desc="critic", unit="epoch", disable=not progress)
    with bar:
        for epoch in range(1, settings.epochs + 1):
            critic.train()
            budgets = _training_budgets(critic.config, len(train), settings, generator)
            total = 0.0
            for batch in torch.randperm(len(train), generator=generator).split(settings.batch_size):
                loss = _loss(critic, train.subset(batch), budgets[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            train_losses.append(total / len(train))

            critic.eval()
            with torch.no_grad():
                validation_losses.append(_loss(critic, validation, validation_budgets).item())
            bar.set_postfix(train=f"{train_losses[-1]:.4f}", val=f"{validation_losses[-1]:.4f}")
            bar.update()
            if not (math.isfinite(train_losses[-1]) and math.isfinite(validation_losses[-1])):
                raise CriticTrainingError(
                    f"the critic's loss is not finite at epoch {epoch}; lower the learning "
                    f"rate (now {settings.learning_rate:g})"
                )
            if validation_losses[-1] < best_loss:
                best_loss, best_epoch = validation_losses[-1], epoch
                best_state = {name: t.clone() for name, t in critic.state_dict().items()}
            elif epoch - best_epoch >= settings.patience:
                break
    critic.load_state_dict(best_state)
    critic.eval()

    train_safe_rate = float((train.final_cost <= budget).float().mean())
    report = TrainingReport(
        train_points=len(train),
        validation_points=len(validation),
        train_rollouts=train.num_rollouts,
        validation_rollouts=validation.num_rollouts,
        train_prompts=train.num_prompts,
        validation_prompts=validation.num_prompts,
        epochs_run=len(train_losses),
        best_epoch=best_epoch,
        train_loss=train_losses,
        validation_loss=validation_losses,
        seconds=time.perf_counter() - started,
        budget=float(budget),
        **_held_out_metrics(critic, validation, budget, train_safe_rate),
        settings=settings.model_dump(),
    )
    return critic, report


def split_by_prompt(prompt: torch.Tensor, validation_fraction: float, seed: int) -> torch.Tensor:
    """Which points train: a seeded draw of whole prompts, the rest validate.

    Args:
        prompt: `(points,)` long prompt of each point.
        validation_fraction: fraction of the prompts held out (rounded, at least one
            prompt on each side).
        seed: seed of the draw.

    Returns:
        `(points,)` bool, True for training points.

    Raises:
        CriticTrainingError: fewer than `MIN_PROMPTS` distinct prompts.
    """
    prompts = prompt.unique()
    check_prompt_count(len(prompts))
    held_out = min(max(1, round(validation_fraction * len(prompts))), len(prompts) - 1)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    return ~torch.isin(prompt, prompts[order[:held_out]])


def check_prompt_count(num_prompts: int) -> None:
    """Raise `CriticTrainingError` unless `num_prompts` allow a train/validation split."""
    if num_prompts < MIN_PROMPTS:
        raise CriticTrainingError(
            f"fitting a critic needs rollouts of at least {MIN_PROMPTS} distinct prompts "
            f"(whole prompts are held out for validation), got {num_prompts}; add prompts"
        )


def _initial_critic(
    train: RolloutSet,
    budget: float,
    block_size: int,
    fingerprint: ModelFingerprint,
    settings: CriticTrainingSettings,
) -> LatentCritic:
    """A freshly initialised critic (seeded) standardised with training-split statistics.

    `z_scale` is the spread of the training final costs; when they are (nearly) all
    equal, it is the width of the budget range instead, so that the budgets drawn in
    training still enter the network at a scale near 1.
    """
    low = min(float(train.final_cost.min()), budget)
    high = max(float(train.final_cost.max()), budget)
    cost_spread = float(train.final_cost.std(correction=0))
    config = CriticConfig(
        hidden_size=train.hidden_size,
        width=settings.width,
        cost_probe=settings.cost_probe,
        budget=budget,
        budget_range=(low, high),
        block_size=block_size,
        z_scale=max(cost_spread if cost_spread >= _MIN_SCALE else high - low, _MIN_SCALE),
        reward_mean=float(train.final_reward.mean()),
        reward_std=_spread(train.final_reward),
        cost_mean=float(train.prefix_cost.mean()),
        cost_std=_spread(train.prefix_cost),
        fingerprint=fingerprint,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return LatentCritic(
            config,
            hidden_mean=train.hidden.mean(0),
            hidden_std=train.hidden.std(0, correction=0).clamp_min(_MIN_SCALE),
        )


def _spread(values: torch.Tensor) -> float:
    return max(float(values.std(correction=0)), _MIN_SCALE)


def _training_budgets(
    config: CriticConfig, points: int, settings: CriticTrainingSettings, generator: torch.Generator
) -> torch.Tensor:
    """`(points,)` budgets of one epoch: the target, or for a `budget_augmentation`
    fraction of points a uniform draw from `config.budget_range`."""
    low, high = config.budget_range
    drawn = torch.rand(points, generator=generator) < settings.budget_augmentation
    uniform = low + (high - low) * torch.rand(points, generator=generator)
    return torch.where(drawn, uniform, torch.tensor(config.budget))


def _loss(critic: LatentCritic, points: RolloutSet, budgets: torch.Tensor) -> torch.Tensor:
    """Scalar loss of `points` under `(points,)` budgets d.

    BCE of the safe logit against `final_cost <= d`, plus MSE of the reward head
    against the standardised final reward, plus (with a probe) MSE of the probe
    against the standardised prefix cost.
    """
    config = critic.config
    out = critic(points.hidden, budgets - points.prefix_cost)
    safe = (points.final_cost <= budgets).float()
    reward = (points.final_reward - config.reward_mean) / config.reward_std
    loss = F.binary_cross_entropy_with_logits(out.safe_logit, safe)
    loss = loss + F.mse_loss(out.reward, reward)
    if out.cost is not None:
        prefix_cost = (points.prefix_cost - config.cost_mean) / config.cost_std
        loss = loss + F.mse_loss(out.cost, prefix_cost)
    return loss


# ----------------------------------------------------------------------- metrics
def _held_out_metrics(
    critic: LatentCritic, validation: RolloutSet, budget: float, train_safe_rate: float
) -> dict[str, Any]:
    """The report's held-out metrics at the target budget (see `TrainingReport`)."""
    prediction = critic.predict(validation.hidden, budget - validation.prefix_cost)
    safe = (validation.final_cost <= budget).float()
    error = prediction.r_hat - validation.final_reward
    metrics: dict[str, float | None] = {
        "p_safe_brier": float(((prediction.p_safe - safe) ** 2).mean()),
        "p_safe_brier_baseline": float(((train_safe_rate - safe) ** 2).mean()),
        "p_safe_ece": expected_calibration_error(prediction.p_safe, safe),
        "safe_rate": float(safe.mean()),
        "r_hat_mae": float(error.abs().mean()),
        "r_hat_rmse": math.sqrt(float((error**2).mean())),
        "reward_std": float(validation.final_reward.std(correction=0)),
        "probe_mae": None,
        "probe_over_budget_accuracy": None,
    }
    if critic.has_cost_probe:
        probe = critic.probe_cost(validation.hidden)
        agree = (probe > budget) == (validation.prefix_cost > budget)
        metrics["probe_mae"] = float((probe - validation.prefix_cost).abs().mean())
        metrics["probe_over_budget_accuracy"] = float(agree.float().mean())
    return metrics


def expected_calibration_error(
    probability: torch.Tensor, outcome: torch.Tensor, bins: int = _CALIBRATION_BINS
) -> float:
    """Expected calibration error over `bins` equal-width bins of `[0, 1]`.

    Args:
        probability: `(n,)` predicted probabilities.
        outcome: `(n,)` 0/1 outcomes.

    Returns:
        `sum_b (n_b / n) * |mean probability in b - mean outcome in b|`.
    """
    index = (probability * bins).long().clamp(0, bins - 1)
    predicted = torch.bincount(index, weights=probability.double(), minlength=bins)
    observed = torch.bincount(index, weights=outcome.double(), minlength=bins)
    return float((predicted - observed).abs().sum() / len(probability))


# -------------------------------------------------------------- rollouts + fit
def train_critic(
    lm: CausalLM,
    prompts: Sequence[PromptInput],
    cost: Scorer,
    reward: Scorer,
    *,
    out: Path | None,
    budget: float,
    block_size: int = 8,
    max_new_tokens: int = 64,
    samples_per_prompt: int = 8,
    temperature: float = 1.0,
    settings: CriticTrainingSettings = DEFAULT_SETTINGS,
    seed: int = 0,
    progress: bool = True,
) -> tuple[LatentCritic, TrainingReport]:
    """Collect rollouts of `lm` on `prompts`, fit a critic to them, and save it to `out`.

    Args:
        lm: the base model; the critic records its fingerprint.
        prompts: training prompts (at least `MIN_PROMPTS`).
        cost, reward: the cost and reward scorers that label the rollouts.
        out: directory to save the critic into (with the report as its `training`
            entry), or None to only return it.
        budget: the target budget d.
        block_size, max_new_tokens, samples_per_prompt, temperature: rollout settings
            (see `collect_rollouts`); use the search's block size.
        settings: fitting settings (see `fit_critic`).
        seed: seed of the rollout samplers (fitting uses `settings.seed`).
        progress: show progress bars on standard error.

    Raises:
        CriticTrainingError: fewer than `MIN_PROMPTS` prompts (before any decoding), or
            the loss diverged.
    """
    check_prompt_count(len(prompts))
    rollouts = collect_rollouts(
        lm,
        prompts,
        cost,
        reward,
        samples_per_prompt=samples_per_prompt,
        block_size=block_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        progress=progress,
    )
    critic, report = fit_critic(
        rollouts,
        budget=budget,
        block_size=block_size,
        fingerprint=ModelFingerprint.of(lm.model),
        settings=settings,
        progress=progress,
    )
    if out is not None:
        critic.save(out, training=report.as_dict())
    return critic, report
