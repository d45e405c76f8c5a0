"""Safeguard core: almost-surely-safe generation from local Hugging Face models.

InferenceGuard (arXiv 2502.01208) as a library: block-wise search in the model's own
decoding, guided by a safety state that tracks the remaining cost budget.
"""

from importlib.metadata import PackageNotFoundError, version

from inference_safeguard.config import GuardConfig
from inference_safeguard.critic import LatentCritic
from inference_safeguard.engine import GuardEngine
from inference_safeguard.errors import (
    ChatTemplateError,
    CheckpointKindError,
    ConstraintError,
    CriticError,
    CriticFileError,
    CriticMismatchError,
    EngineClosedError,
    EngineOverloadedError,
    GenerationCancelledError,
    GenerationTimeoutError,
    InvalidPromptError,
    LoadOptionError,
    MissingCostModelError,
    MissingCriticError,
    ModelLoadError,
    PromptTooLongError,
    RefusalOverBudgetWarning,
    SafeguardError,
    ScorerOutputError,
    SessionBudgetSpentError,
    SessionStateError,
    UnsafeGenerationError,
)
from inference_safeguard.extras import MissingExtraError
from inference_safeguard.guard import InferenceGuard
from inference_safeguard.results import (
    ConstraintOutcome,
    GenerationStats,
    GuardResult,
    SessionState,
)
from inference_safeguard.session import SafetySession

try:
    __version__ = version("inference-safeguard")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "ChatTemplateError",
    "CheckpointKindError",
    "ConstraintError",
    "ConstraintOutcome",
    "CriticError",
    "CriticFileError",
    "CriticMismatchError",
    "EngineClosedError",
    "EngineOverloadedError",
    "GenerationCancelledError",
    "GenerationStats",
    "GenerationTimeoutError",
    "GuardConfig",
    "GuardEngine",
    "GuardResult",
    "InferenceGuard",
    "InvalidPromptError",
    "LatentCritic",
    "LoadOptionError",
    "MissingCostModelError",
    "MissingCriticError",
    "MissingExtraError",
    "ModelLoadError",
    "PromptTooLongError",
    "RefusalOverBudgetWarning",
    "SafeguardError",
    "SafetySession",
    "ScorerOutputError",
    "SessionBudgetSpentError",
    "SessionState",
    "SessionStateError",
    "UnsafeGenerationError",
    "__version__",
]
