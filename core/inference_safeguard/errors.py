"""Typed errors raised by the safe-decoding core.

Every error says what was wrong and how to fix the call. All inherit from
`SafeguardError`, so callers can catch the package's errors in one place; the ones
caused by a bad argument are also `ValueError`s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inference_safeguard.results import GuardResult


class SafeguardError(Exception):
    """Base class of every error raised by the package."""


class InvalidPromptError(SafeguardError, ValueError):
    """A prompt is empty, not text, or not a well-formed message list."""


class PromptTooLongError(InvalidPromptError):
    """A prompt plus `max_new_tokens` does not fit in the model's context window."""


class ChatTemplateError(SafeguardError, ValueError):
    """A message list was given but the tokenizer has no chat template."""


class MissingCostModelError(SafeguardError, ValueError):
    """A safe decoder was built without the cost model it needs."""

    @classmethod
    def of(cls, owner: str) -> MissingCostModelError:
        """The error for `owner` (what was being built), saying which costs to pass."""
        return cls(
            f"{owner} needs a cost model: pass cost=KeywordCost([...]), RegexCost(...), "
            "ClassifierScorer.from_pretrained(...) or GuardModelCost(...)"
        )


class ConstraintError(SafeguardError, ValueError):
    """Constraints given wrongly: a bad name or budget, a budget for a constraint the guard
    does not have, or a setting that needs exactly one constraint."""


class SessionBudgetSpentError(SafeguardError):
    """A safety session's budget is spent, so the call did not generate.

    Attributes:
        remaining: what is left of each constraint's session budget.
    """

    def __init__(self, message: str, remaining: dict[str, float]) -> None:
        super().__init__(message)
        self.remaining = remaining


class SessionStateError(SafeguardError, ValueError):
    """A safety session's saved state is malformed or of another version."""


class ModelLoadError(SafeguardError, OSError):
    """A model or tokenizer cannot be loaded from what was named: no such local directory
    or hub name, a directory without a checkpoint, or incomplete or corrupted files."""


class CheckpointKindError(SafeguardError, ValueError):
    """A checkpoint is of another kind than the one asked for (a causal LM where a
    sequence classifier is needed, or the reverse): loading it would leave randomly
    initialised weights in the model."""


class LoadOptionError(SafeguardError, ValueError):
    """A device or dtype that torch or this machine cannot provide."""


class DemoWorldError(SafeguardError, ValueError):
    """A demo world's `prompts.json` or `manifest.json` is malformed."""


class OutputFormatError(SafeguardError, ValueError):
    """A response format, tool schema or grammar that cannot be enforced as given."""


class ScorerOutputError(SafeguardError, ValueError):
    """A scorer returned the wrong number of scores or non-finite values."""


class CriticError(SafeguardError):
    """Base class of the latent critic's errors."""


class CriticFileError(CriticError, ValueError):
    """A critic file is missing, corrupted, or not a critic written by `LatentCritic.save`."""


class CriticMismatchError(CriticError, ValueError):
    """A critic was trained on another base model (its stored fingerprint differs)."""


class CriticTrainingError(CriticError, ValueError):
    """A critic cannot be fitted: too few prompts for a train/validation split, or the
    loss diverged."""


class MissingCriticError(CriticError, ValueError):
    """Critic mode was asked for, but the guard has no critic."""


class CriticMismatchWarning(UserWarning):
    """A critic is used outside the settings it was trained for: another block size, or a
    budget outside its training range."""


class RefusalOverBudgetWarning(UserWarning):
    """The configured refusal text is itself over budget under the cost model."""


class GenerationCancelledError(SafeguardError):
    """A generation was cancelled before it finished: its stream was closed (from
    another thread, while a delta was being computed) or its caller stopped waiting."""


class GenerationTimeoutError(SafeguardError, TimeoutError):
    """A request to a `GuardEngine` ran past its timeout and was stopped."""


class EngineOverloadedError(SafeguardError, RuntimeError):
    """A `GuardEngine` cannot take a request: its queue is full, or the request needs
    more rows than the engine may ever hold."""


class EngineClosedError(SafeguardError, RuntimeError):
    """A `GuardEngine` was closed before (or while) it served a request."""


class BackendCapabilityError(SafeguardError, NotImplementedError):
    """The base model's backend cannot do what a call asks (critic mode without hidden
    states, a grammar-constrained response); the message names the backends that can."""


class UnsafeGenerationError(SafeguardError):
    """The search found no response within the safety budget and `on_unsafe="raise"`.

    Attributes:
        result: the first over-budget `GuardResult`, flagged `safe=False`.
        results: every result of the call, in prompt order, so that nothing is lost.
    """

    def __init__(self, message: str, result: GuardResult, results: list[GuardResult]) -> None:
        super().__init__(message)
        self.result = result
        self.results = results


class DraftModelError(SafeguardError, ValueError):
    """A draft model that cannot propose tokens for the base model (another tokenizer,
    a cache layout the drafted blocks cannot be cropped in, a bad draft length)."""
