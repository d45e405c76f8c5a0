"""`load_demo_world`: the shipped demo world, loaded offline through the public paths.

The base assistant loads with `CausalLM.from_pretrained` and the cost and reward models
with `ClassifierScorer.from_pretrained(..., template=BEAVER_TEMPLATE)`, exactly as a
real model and a Beaver-style cost model would.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard.config import GuardConfig
from inference_safeguard.critic import LatentCritic
from inference_safeguard.demo.build import ASSETS
from inference_safeguard.demo.corpus import Prompt, as_messages
from inference_safeguard.demo.oracle import is_unsafe
from inference_safeguard.errors import DemoWorldError
from inference_safeguard.guard import InferenceGuard
from inference_safeguard.lm import CausalLM, PromptInput
from inference_safeguard.scorers import BEAVER_TEMPLATE, ClassifierScorer

DEFAULT_BUDGET = 0.5
"""The budget of a world whose manifest does not give one."""


@dataclass(frozen=True)
class DemoWorld:
    """The demo world: a small assistant, its cost and reward models, an oracle, prompts.

    Attributes:
        model, tokenizer: the base assistant.
        cost: P(unsafe) of a (partial) response, a `ClassifierScorer`.
        reward: helpfulness, a `ClassifierScorer`.
        prompts: by split ("train", "validation", "test"), each a one-message chat.
        prompt_info: the same prompts with their topic and whether they are risky.
        budget: the cost budget the world is built for.
        manifest: how it was built (settings, losses, sizes, seconds).
        critic: the latent critic trained on the world's base model (None in a world
            built without one).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cost: ClassifierScorer
    reward: ClassifierScorer
    prompts: dict[str, list[PromptInput]]
    prompt_info: dict[str, list[Prompt]]
    budget: float
    manifest: dict[str, Any] = field(default_factory=dict)
    critic: LatentCritic | None = None

    def oracle(self, prompt: str, response: str) -> bool:
        """Whether `response` is unsafe, judged by the hazard lexicon (not by a model)."""
        return is_unsafe(prompt, response)

    def guard(self, *, critic: bool = False, **config: Any) -> InferenceGuard:
        """An `InferenceGuard` on this world; `config` overrides `GuardConfig` fields.

        Args:
            critic: guide the search with the world's latent critic (critic mode).
        """
        if critic and self.critic is None:
            raise FileNotFoundError(
                "this demo world has no critic; rebuild it with `safeguard demo --rebuild`"
            )
        return InferenceGuard(
            self.model,
            self.tokenizer,
            cost=self.cost,
            reward=self.reward,
            critic=self.critic if critic else None,
            config=GuardConfig(**{"budget": self.budget, **config}),
        )


def load_demo_world(
    path: str | Path = ASSETS, *, device: str | torch.device | None = "cpu"
) -> DemoWorld:
    """Load the demo world from `path` (default: the files shipped with the package).

    Raises:
        FileNotFoundError: the world has not been built there; `safeguard demo --rebuild`
            builds it.
        DemoWorldError: its `prompts.json` or `manifest.json` is malformed.
    """
    root = Path(path)
    missing = [n for n in ("base", "cost", "reward", "prompts.json") if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"no demo world in {root} (missing {', '.join(missing)}); build it with "
            "`safeguard demo --rebuild`"
        )
    info = _read_splits(root / "prompts.json")
    manifest_path = root / "manifest.json"
    manifest = _read_manifest(manifest_path) if manifest_path.exists() else {}
    lm = CausalLM.from_pretrained(str(root / "base"), device=device, dtype=torch.float32)
    scorers = {
        name: ClassifierScorer.from_pretrained(
            str(root / name),
            template=BEAVER_TEMPLATE,
            output=output,
            dtype=torch.float32,
            device=device,
        )
        for name, output in (("cost", "probability"), ("reward", "logit"))
    }
    critic = LatentCritic.load(root / "critic") if (root / "critic").exists() else None
    return DemoWorld(
        model=lm.model,
        tokenizer=lm.tokenizer,
        cost=scorers["cost"],
        reward=scorers["reward"],
        prompts={split: [as_messages(p.text) for p in prompts] for split, prompts in info.items()},
        prompt_info=info,
        budget=float(manifest.get("budget", DEFAULT_BUDGET)),
        manifest=manifest,
        critic=critic,
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DemoWorldError(
            f"{path} is not UTF-8 JSON ({error}); rebuild the world with `safeguard demo --rebuild`"
        ) from error


def _read_splits(path: Path) -> dict[str, list[Prompt]]:
    """The prompts of `prompts.json`: `{split: [{"text", "topic", "risky"}, ...]}`."""
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DemoWorldError(
            f"{path} holds a JSON {type(data).__name__}; it must map each split name to a "
            'list of prompts, {"test": [{"text": "...", "topic": "...", "risky": false}]}; '
            "rebuild the world with `safeguard demo --rebuild`"
        )
    splits = {}
    for split, records in data.items():
        prompts = []
        for index, record in enumerate(records):
            fields = (
                isinstance(record, dict)
                and set(record) == {"text", "topic", "risky"}
                and isinstance(record["text"], str)
                and isinstance(record["topic"], str)
                and isinstance(record["risky"], bool)
            )
            if not fields or not record["text"].strip():
                raise DemoWorldError(
                    f"{path}: {split}[{index}] must be an object "
                    '{"text": non-empty string, "topic": string, "risky": bool}; rebuild the '
                    "world with `safeguard demo --rebuild`"
                )
            prompts.append(Prompt(**record))
        splits[split] = prompts
    return splits


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = _read_json(path)
    budget = manifest.get("budget", DEFAULT_BUDGET) if isinstance(manifest, dict) else None
    if (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not math.isfinite(budget)
    ):
        raise DemoWorldError(
            f"{path} must be a JSON object whose budget is a finite number; rebuild the "
            "world with `safeguard demo --rebuild`"
        )
    return manifest
