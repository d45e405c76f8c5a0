"""Safeguard core: almost-surely-safe generation from local Hugging Face models.

InferenceGuard (arXiv 2502.01208) as a library: block-wise search in the model's own
decoding, guided by a safety state that tracks the remaining cost budget.
"""

from core.config import GuardConfig
from core.errors import (
    ChatTemplateError,
    InvalidPromptError,
    MissingCostModelError,
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
    "GenerationStats",
    "GuardConfig",
    "GuardResult",
    "InferenceGuard",
    "InvalidPromptError",
    "MissingCostModelError",
    "PromptTooLongError",
    "RefusalOverBudgetWarning",
    "SafeguardError",
    "ScorerOutputError",
    "UnsafeGenerationError",
]
