"""Critic training: rollouts of the base model, and a `LatentCritic` fitted to them.

- `rollouts`: `collect_rollouts`, sampled responses recorded at every block end
  (hidden state, prefix cost) with their final cost and reward, as a `RolloutSet`.
- `fit`: `fit_critic` (the training loop, `CriticTrainingSettings`, `TrainingReport`)
  and `train_critic`, rollouts + fit + save in one call.
- `cli`: the `safeguard train-critic` subcommand.
"""

from inference_safeguard.training.fit import (
    MIN_PROMPTS,
    CriticTrainingError,
    CriticTrainingSettings,
    TrainingReport,
    fit_critic,
    train_critic,
)
from inference_safeguard.training.rollouts import RolloutSet, collect_rollouts

__all__ = [
    "MIN_PROMPTS",
    "CriticTrainingError",
    "CriticTrainingSettings",
    "RolloutSet",
    "TrainingReport",
    "collect_rollouts",
    "fit_critic",
    "train_critic",
]
