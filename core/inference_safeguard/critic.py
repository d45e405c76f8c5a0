"""`LatentCritic`: safety and reward of a partial response, from the base model's hidden states.

The critic sees what the search already has at a block end: the base model's
last-layer hidden state `h` of the last token and the safety state `z` (remaining
budget). Its heads predict

- `p_safe`: the probability that the finished response stays within budget
  (a logit, trained with binary cross-entropy);
- `r_hat`: the expected reward of the finished response (trained with squared error);
- optionally a **cost probe**: the cost model's value `C(x, y_<=t)` of the prefix,
  from `h` alone, so that the search can run without the cost model.

Inputs and targets are standardised with statistics of the training set, stored in
the weights file; predictions come back in the units of the cost and reward models.
`z` is divided by `z_scale` (the spread of the training costs), so one critic serves
every budget in the range it was trained on (training draws budgets around the
target, see `inference_safeguard.training`).

Saved as a directory with `critic.safetensors` (tensors only: nothing is unpickled)
and `critic.json` (`CriticConfig`: sizes, budget, block size, base-model fingerprint,
target statistics, training report, the weights' SHA-256 and the SHA-256 of the config
itself), so that a corrupted file of either kind is rejected instead of loaded. Loading
checks the sizes against sane bounds and against the tensors in the file before
allocating anything, and rejects non-finite weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from inference_safeguard.errors import CriticFileError, CriticMismatchError
from inference_safeguard.loading import resolve_device

WEIGHTS_FILE = "critic.safetensors"
CONFIG_FILE = "critic.json"
FORMAT_VERSION = 2
"""Version 2 added `config_sha256`, the checksum of `critic.json` itself."""
MAX_SIZE = 1 << 20
"""Largest hidden size or width a critic file may declare (the largest LLMs have hidden
sizes near 2**14); anything larger is a corrupted file, not a model."""

# Config entries that say how a model was loaded or run, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "architectures",
        "id2label",
        "label2id",
    }
)


class ModelFingerprint(BaseModel):
    """What identifies the base model a critic was trained on.

    Attributes:
        name: the model's name or path (`config._name_or_path`) as loaded; empty for a
            model built in memory.
        config_hash: SHA-256 of its architecture config (loading settings left out).
        vocab_size: rows of its output embedding.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    config_hash: str = Field(min_length=64, max_length=64)
    vocab_size: int = Field(ge=1)

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelFingerprint:
        """The fingerprint of a loaded Hugging Face model."""
        entries = {
            key: value
            for key, value in model.config.to_dict().items()
            if not key.startswith("_") and key not in _VOLATILE_CONFIG_KEYS
        }
        text = json.dumps(entries, sort_keys=True, default=str)
        return cls(
            name=str(getattr(model.config, "_name_or_path", "") or ""),
            config_hash=hashlib.sha256(text.encode()).hexdigest(),
            vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        )


class CriticConfig(BaseModel):
    """Everything needed to rebuild a critic and to check that it fits a base model.

    Attributes:
        hidden_size: the base model's hidden size (the critic's input width).
        width: width of the critic's hidden layers.
        cost_probe: whether the critic has a cost-probe head.
        budget: the budget d the critic was trained for.
        budget_range: lowest and highest budgets drawn in training; `p_safe` is
            reliable for budgets in this range.
        block_size: tokens per block of the rollouts it was trained on.
        z_scale: the safety state is divided by it before entering the network.
        reward_mean, reward_std: standardisation of the reward targets.
        cost_mean, cost_std: standardisation of the cost-probe targets.
        fingerprint: the base model it was trained on.
        training: training statistics and held-out metrics (see `inference_safeguard.training`).
        weights_sha256: SHA-256 of `critic.safetensors`.
        config_sha256: SHA-256 of the other entries of this config (see `config_sha256`).
        format_version: version of this file format.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    hidden_size: int = Field(ge=1, le=MAX_SIZE)
    width: int = Field(256, ge=1, le=MAX_SIZE)
    cost_probe: bool = True
    budget: float
    budget_range: tuple[float, float]
    block_size: int = Field(ge=1)
    z_scale: float = Field(gt=0)
    reward_mean: float = 0.0
    reward_std: float = Field(1.0, gt=0)
    cost_mean: float = 0.0
    cost_std: float = Field(1.0, gt=0)
    fingerprint: ModelFingerprint
    training: dict[str, Any] = Field(default_factory=dict)
    weights_sha256: str = ""
    config_sha256: str = ""
    format_version: int = FORMAT_VERSION


@dataclass(frozen=True)
class CriticOutput:
    """The critic's raw heads, in standardised units (what training fits).

    Attributes:
        safe_logit: `(rows,)` logit of `p_safe`.
        reward: `(rows,)` standardised `r_hat`.
        cost: `(rows,)` standardised probe cost, or None without a probe.
    """

    safe_logit: torch.Tensor
    reward: torch.Tensor
    cost: torch.Tensor | None


@dataclass(frozen=True)
class CriticPrediction:
    """The critic's predictions in task units.

    Attributes:
        p_safe: `(rows,)` probability that the finished response stays within budget.
        r_hat: `(rows,)` expected reward of the finished response.
    """

    p_safe: torch.Tensor
    r_hat: torch.Tensor


class LatentCritic(nn.Module):
    """A small MLP on `(h, z)` with `p_safe` and `r_hat` heads, plus an optional cost probe.

    Args:
        config: sizes, training statistics and fingerprint.
        hidden_mean: `(hidden_size,)` mean of the training hidden states (default 0).
        hidden_std: `(hidden_size,)` their standard deviation (default 1).
    """

    # Registered as buffers in __init__ (saved with the weights, moved with the module).
    hidden_mean: torch.Tensor
    hidden_std: torch.Tensor

    def __init__(
        self,
        config: CriticConfig,
        hidden_mean: torch.Tensor | None = None,
        hidden_std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        size, width = config.hidden_size, config.width
        self.register_buffer(
            "hidden_mean", torch.zeros(size) if hidden_mean is None else hidden_mean.float()
        )
        self.register_buffer(
            "hidden_std", torch.ones(size) if hidden_std is None else hidden_std.float()
        )
        self.trunk = nn.Sequential(
            nn.Linear(size + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU()
        )
        self.safe_head = nn.Linear(width, 1)
        self.reward_head = nn.Linear(width, 1)
        self.probe = (
            nn.Sequential(nn.Linear(size, width), nn.SiLU(), nn.Linear(width, 1))
            if config.cost_probe
            else None
        )

    @property
    def has_cost_probe(self) -> bool:
        return self.probe is not None

    def _features(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden.to(self.hidden_mean.dtype) - self.hidden_mean) / self.hidden_std

    def forward(self, hidden: torch.Tensor, z: torch.Tensor) -> CriticOutput:
        """Raw heads.

        Args:
            hidden: `(rows, hidden_size)` last-layer hidden states (any float dtype).
            z: `(rows,)` safety states (remaining budget, in cost units).
        """
        features = self._features(hidden)
        z_in = (z.to(features.dtype) / self.config.z_scale)[:, None]
        trunk = self.trunk(torch.cat([features, z_in], dim=-1))
        return CriticOutput(
            safe_logit=self.safe_head(trunk).squeeze(-1),
            reward=self.reward_head(trunk).squeeze(-1),
            cost=None if self.probe is None else self.probe(features).squeeze(-1),
        )

    @torch.inference_mode()
    def predict(self, hidden: torch.Tensor, z: torch.Tensor) -> CriticPrediction:
        """`p_safe` and `r_hat` of `(rows, hidden_size)` states with `(rows,)` safety states."""
        out = self(hidden.to(self.hidden_mean.device), z.to(self.hidden_mean.device))
        return CriticPrediction(
            p_safe=torch.sigmoid(out.safe_logit),
            r_hat=out.reward * self.config.reward_std + self.config.reward_mean,
        )

    @torch.inference_mode()
    def probe_cost(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(rows,)` cost-model value predicted from `(rows, hidden_size)` hidden states."""
        if self.probe is None:
            raise RuntimeError(
                "this critic has no cost probe; train one with a probe (the default of "
                "`safeguard train-critic`) or search with the cost model (cost_probe=False)"
            )
        features = self._features(hidden.to(self.hidden_mean.device))
        return self.probe(features).squeeze(-1) * self.config.cost_std + self.config.cost_mean

    # ------------------------------------------------------------ compatibility
    def check_base_model(self, model: PreTrainedModel) -> None:
        """Reject a base model other than the one the critic was trained on.

        Names are compared by their last path component, so a local copy of
        "org/model" in "/models/model" passes; a model built in memory has no name to
        compare. A fine-tune shares its base model's config but not its hidden states,
        so another name is rejected too; for the same model saved under another name,
        see `set_base_model_name`.

        Raises:
            CriticMismatchError: the architecture config, vocabulary, hidden size or name
                differ.
        """
        expected, actual = self.config.fingerprint, ModelFingerprint.of(model)
        problems = []
        hidden_size = model.config.get_text_config().hidden_size
        if hidden_size != self.config.hidden_size:
            problems.append(f"hidden size {hidden_size} != {self.config.hidden_size}")
        if actual.vocab_size != expected.vocab_size:
            problems.append(f"vocabulary size {actual.vocab_size} != {expected.vocab_size}")
        if actual.config_hash != expected.config_hash:
            problems.append("the model's architecture config differs")
        if problems:
            raise CriticMismatchError(
                f"this critic was trained on {_described(expected.name)}, not on "
                f"{_described(actual.name)}: {'; '.join(problems)}. Train a critic for this "
                f"model with `safeguard train-critic --model {actual.name or 'MODEL'} ...`, "
                "or load the base model the critic was made for"
            )
        named = actual.name and expected.name
        if named and _short_name(actual.name) != _short_name(expected.name):
            raise CriticMismatchError(
                f"this critic was trained on {expected.name!r}, not on {actual.name!r}: the "
                "architecture config is the same, but a fine-tune or another checkpoint has "
                "other hidden states. Train a critic for it with `safeguard train-critic "
                f"--model {actual.name} ...`; if it is the same model saved under another "
                f"name, call critic.set_base_model_name({actual.name!r}) first"
            )

    def set_base_model_name(self, name: str) -> None:
        """Record `name` as the base model's name: for the same model saved under another
        name (the architecture config and vocabulary are still checked)."""
        fingerprint = self.config.fingerprint.model_copy(update={"name": name})
        self.config = self.config.model_copy(update={"fingerprint": fingerprint})

    # --------------------------------------------------------------- save/load
    def save(
        self, directory: str | os.PathLike[str], training: dict[str, Any] | None = None
    ) -> Path:
        """Write `critic.safetensors` and `critic.json` into `directory` (created if needed).

        Args:
            training: training statistics to store (replacing the config's).

        Returns:
            The directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        weights = directory / WEIGHTS_FILE
        save_file(tensors, weights, metadata={"format": "pt"})
        update: dict[str, Any] = {"weights_sha256": _sha256(weights), "config_sha256": ""}
        if training is not None:
            update["training"] = training
        config = self.config.model_copy(update=update)
        checksum = config_sha256(json.loads(config.model_dump_json()))
        self.config = config.model_copy(update={"config_sha256": checksum})
        (directory / CONFIG_FILE).write_text(self.config.model_dump_json(indent=1) + "\n")
        return directory

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], device: str | torch.device | None = None
    ) -> LatentCritic:
        """Load a critic saved by `save`.

        Nothing is allocated before the file's tensors are known to fit the config: the
        critic is built on the meta device and takes the loaded tensors as its own.

        Raises:
            CriticFileError: a file is missing, not valid JSON or safetensors, fails its
                checksum, declares sizes beyond `MAX_SIZE`, or holds tensors that do not
                fit the config or are not finite.
        """
        directory = Path(directory)
        config = _read_config(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise CriticFileError(
                f"no {WEIGHTS_FILE} in {directory}; a critic directory holds {WEIGHTS_FILE} "
                f"and {CONFIG_FILE} as written by LatentCritic.save or `safeguard train-critic`"
            )
        if _sha256(weights) != config.weights_sha256:
            raise CriticFileError(
                f"{weights} is corrupted: its SHA-256 does not match the one recorded in "
                f"{CONFIG_FILE}; copy the critic again or retrain it"
            )
        try:
            tensors = load_file(weights)
        except (SafetensorError, OSError, ValueError) as error:
            raise CriticFileError(
                f"{weights} is not a readable safetensors file ({error}); copy the critic "
                "again or retrain it"
            ) from error
        _check_tensors(tensors, weights)
        tensors = {name: tensor.float() for name, tensor in tensors.items()}
        with torch.device("meta"):
            critic = cls(config)
        try:
            critic.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as error:
            raise CriticFileError(
                f"the tensors in {weights} do not fit {CONFIG_FILE} (hidden_size "
                f"{config.hidden_size}, width {config.width}, cost_probe {config.cost_probe}): "
                f"{_first_line(error)}; the two files come from different critics"
            ) from error
        if not bool((critic.hidden_std > 0).all()):
            raise CriticFileError(
                f"{weights} holds a hidden_std that is not positive, so the critic would "
                "divide by zero; the file is corrupted: copy the critic again or retrain it"
            )
        return critic.to(resolve_device(device) or "cpu").eval()


def config_sha256(entries: dict[str, Any]) -> str:
    """SHA-256 of a critic config's JSON entries, its own `config_sha256` left out.

    The entries are hashed as canonical JSON (sorted keys, no spaces), so the checksum
    does not depend on how the file is indented.
    """
    rest = {key: value for key, value in entries.items() if key != "config_sha256"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Reject tensors that are not floating point or hold NaN or inf values."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CriticFileError(
                f"{path} holds {name} as {tensor.dtype}, not floating point; the file is "
                "corrupted or not a critic: copy the critic again or retrain it"
            )
    bad = sorted(name for name, tensor in tensors.items() if not torch.isfinite(tensor).all())
    if bad:
        raise CriticFileError(
            f"{path} holds non-finite values (NaN or inf) in {', '.join(bad)}; a critic "
            "with them would score every candidate NaN. Retrain the critic (a diverged fit "
            "writes them) or copy an intact one"
        )


def _read_config(directory: Path) -> CriticConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CriticFileError(
            f"no {CONFIG_FILE} in {directory}; pass the directory written by "
            "LatentCritic.save or `safeguard train-critic --out DIR`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CriticFileError(f"{path} is not valid JSON ({error}); it is corrupted") from error
    if not isinstance(data, dict):
        raise CriticFileError(
            f"{path} holds a JSON {type(data).__name__}, not a critic config object; it is "
            "corrupted or was not written by LatentCritic.save"
        )
    version = data.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CriticFileError(
            f"{path} has format version {version}, this version of the package reads "
            f"version {FORMAT_VERSION} (whose {CONFIG_FILE} carries its own checksum); "
            "retrain the critic"
        )
    if data.get("config_sha256") != config_sha256(data):
        raise CriticFileError(
            f"{path} is corrupted: its SHA-256 does not match the config_sha256 recorded "
            "in it; copy the critic again or retrain it"
        )
    try:
        return CriticConfig.model_validate(data)
    except ValidationError as error:
        raise CriticFileError(
            f"{path} is not a valid critic config: {_first_line(error)}; it is corrupted "
            "or was not written by LatentCritic.save"
        ) from error


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _described(name: str) -> str:
    return repr(name) if name else "a model built in memory"


def _short_name(name: str) -> str:
    return Path(name.rstrip("/")).name


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return " ".join(lines[:3]) if lines else type(error).__name__
