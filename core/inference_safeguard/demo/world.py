"""`load_demo_world`: the shipped demo world, loaded offline through the public paths.

The base assistant loads with `CausalLM.from_pretrained` and the cost and reward models
with `ClassifierScorer.from_pretrained(..., template=BEAVER_TEMPLATE)`, exactly as a
real model and a Beaver-style cost model would.
"""

from __future__ import annotations

import json
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
from inference_safeguard.guard import InferenceGuard
from inference_safeguard.lm import CausalLM, PromptInput
from inference_safeguard.scorers import BEAVER_TEMPLATE, ClassifierScorer


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
    """
    root = Path(path)
    missing = [n for n in ("base", "cost", "reward", "prompts.json") if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"no demo world in {root} (missing {', '.join(missing)}); build it with "
            "`safeguard demo --rebuild`"
        )
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
    splits = json.loads((root / "prompts.json").read_text())
    info = {split: [Prompt(**record) for record in records] for split, records in splits.items()}
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    critic = LatentCritic.load(root / "critic") if (root / "critic").exists() else None
    return DemoWorld(
        model=lm.model,
        tokenizer=lm.tokenizer,
        cost=scorers["cost"],
        reward=scorers["reward"],
        prompts={split: [as_messages(p.text) for p in prompts] for split, prompts in info.items()},
        prompt_info=info,
        budget=float(manifest.get("budget", 0.5)),
        manifest=manifest,
        critic=critic,
    )
