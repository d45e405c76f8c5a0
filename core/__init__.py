"""Safeguard core: almost-surely-safe generation from local Hugging Face models.

InferenceGuard (arXiv 2502.01208) as a library: block-wise search in the model's own
decoding, guided by a safety state that tracks the remaining cost budget.
"""

from core.config import GuardConfig
from core.critic import LatentCritic
from core.errors import (
    ChatTemplateError,
    CriticError,
    CriticFileError,
    CriticMismatchError,
    InvalidPromptError,
    MissingCostModelError,
    MissingCriticError,
    PromptTooLongError,
    RefusalOverBudgetWarning,
    SafeguardError,
    ScorerOutputError,
    UnsafeGenerationError,
)
from core.guard import InferenceGuard
from core.results import GenerationStats, GuardResult

__all__ = [
    "ChatTemplateError",
    "CriticError",
    "CriticFileError",
    "CriticMismatchError",
    "GenerationStats",
    "GuardConfig",
    "GuardResult",
    "InferenceGuard",
    "InvalidPromptError",
    "LatentCritic",
    "MissingCostModelError",
    "MissingCriticError",
    "PromptTooLongError",
    "RefusalOverBudgetWarning",
    "SafeguardError",
    "ScorerOutputError",
    "UnsafeGenerationError",
]
