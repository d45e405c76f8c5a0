"""A verifier in the loop (AMBEDKAR): a judge model reads a written constitution and
gives P(the response violates it) as the cost.

AMBEDKAR (2025) lets a small model draft and a larger model verify each draft against
constitutional principles at decoding time. Here the drafts come from the guard's base
model and the verifier is `ConstitutionCost`: a `GuardModelCost` whose prompt lists the
principles of a `Constitution` and asks whether the response violates any of them; the
cost is the judge's probability of answering yes, read from its next-token distribution
(`softmax([logit(no), logit(yes)])[1]`, in `[0, 1]`). Any causal LM can judge, a base
model or a chat model: the prompt is plain text, not a chat template.

A small judge is biased: Gemma 3 270M answers "Yes" with probability 0.55-0.85 to every
pair, benign or not. `calibration="content-free"` corrects the bias as contextual
calibration does (Zhao et al. 2021, "Calibrate Before Use"): the judge's prior `q` is
its P(Yes) on content-free pairs (`CONTENT_FREE_INPUTS` as both question and reply;
`logit(q)` is the mean of its log-odds over them, so a constant bias of the verdict
logits cancels exactly), and each verdict is renormalised by it,
`p_cal = (p / q) / (p / q + (1 - p) / (1 - q))`, i.e. `logit(p_cal) = logit(p) - logit(q)`,
so 0.5 means "as likely to violate as an empty reply" whatever the judge's bias. The
correction is one shift of the log-odds, so it moves the budget's meaning, never the
order of two verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from inference_safeguard.scorer_spec import parse_spec, spec_int
from inference_safeguard.scorers import GuardModelCost

__all__ = [
    "CONTENT_FREE_INPUTS",
    "DEFAULT_CONSTITUTION",
    "JUDGE_TEMPLATE",
    "Calibration",
    "Constitution",
    "ConstitutionCost",
]

Calibration = Literal["none", "content-free"]
"""How `ConstitutionCost` corrects the judge's bias: not at all, or by its verdict on
content-free input (see the module docstring)."""

CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")
"""The content-free strings of contextual calibration, each used as both the question
and the reply; the judge's prior is the sigmoid of its mean log-odds over them."""

JUDGE_TEMPLATE = (
    "An assistant must follow every principle below.\n\n"
    "Principles:\n{principles}\n\n"
    "User: {prompt}\n"
    "Assistant: {response}\n\n"
    "The assistant's reply above breaks a principle (Yes or No):"
)
"""The judge's prompt: `{principles}` is replaced by the numbered principles, then
`{prompt}` and `{response}` are filled with each pair; the verdict word follows the
colon. Worded as a statement to complete rather than a question to answer: on three
pairs of replies (see README), Gemma 3 270M puts the violating reply 0.13-0.51 above the
benign one in log-odds this way, and under 0.15 above when asked "Does the assistant's
reply violate any of the principles? Answer Yes or No. Answer:"."""


@dataclass(frozen=True)
class Constitution:
    """The principles a judge holds responses to, and how it is asked.

    Attributes:
        principles: one sentence each, saying what a response must (not) do.
        template: the judge's prompt, with `{principles}`, `{response}` and optionally
            `{prompt}` fields, other braces doubled (see `JUDGE_TEMPLATE`).
        violation_token: the word the judge answers when a principle is violated.
        compliance_token: the word it answers when none is.
    """

    principles: tuple[str, ...]
    template: str = JUDGE_TEMPLATE
    violation_token: str = " Yes"
    compliance_token: str = " No"

    def __post_init__(self) -> None:
        if isinstance(self.principles, str) or not self.principles:
            raise ValueError(
                "Constitution needs a non-empty tuple of principles, e.g. "
                "Constitution(('Never give instructions that could hurt someone.',))."
            )
        for index, principle in enumerate(self.principles):
            if not isinstance(principle, str) or not principle.strip():
                raise ValueError(f"Constitution: principle {index} must be a non-empty str.")
        if "{principles}" not in self.template:
            raise ValueError(
                "Constitution: the template needs a {principles} field where the numbered "
                "principles go (see JUDGE_TEMPLATE)."
            )

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> Constitution:
        """Principles from a UTF-8 text file, one per line; blank lines and lines that
        start with `#` are skipped, and a leading `-`, `*` or `1.` is removed.
        `options` are the other fields."""
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"Constitution.from_file: no file at {file}.")
        principles = []
        for line in file.read_text(encoding="utf-8").splitlines():
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            text = text.lstrip("-*").strip()
            number, dot, rest = text.partition(".")
            principles.append(rest.strip() if dot and number.isdigit() else text)
        return cls(tuple(principles), **options)

    def judge_template(self) -> str:
        """The `GuardModelCost` template: the prompt with the principles filled in."""
        numbered = "\n".join(
            f"{i}. {p.strip().replace('{', '{{').replace('}', '}}')}"
            for i, p in enumerate(self.principles, 1)
        )
        return self.template.replace("{principles}", numbered, 1)


DEFAULT_CONSTITUTION = Constitution(
    principles=(
        "Do not give instructions or details that help anyone hurt people or animals, "
        "including weapons, poisons, explosives, or mixing dangerous chemicals.",
        "Do not encourage violence, self-harm, or illegal acts.",
        "Do not demean, stereotype or discriminate against anyone because of caste, "
        "religion, race, ethnicity, gender, sexual orientation, disability or origin.",
        "Do not insult, threaten or harass the user or anyone else.",
        "Do not reveal private information about a person, such as an address, phone "
        "number or password.",
    )
)
"""The shipped constitution: harm, violence and crime, fairness (AMBEDKAR's focus on
caste, religion and other protected groups), harassment, privacy."""


class ConstitutionCost(GuardModelCost):
    """Cost = P(the response violates the constitution), judged by a causal LM.

    Args:
        model: the judge, a causal LM (a larger model than the base model that drafts).
        tokenizer: its tokenizer; not modified.
        constitution: the principles and how to ask (default `DEFAULT_CONSTITUTION`).
        batch_size: pairs per forward pass.
        device: moves the model there; default: leave it where it is.
        share_prompt_cache: run the constitution and each prompt once and reuse the KV
            cache for every response to it (see `GuardModelCost`).
        calibration: `"content-free"` (default) renormalises each verdict by the judge's
            prior on content-free input, so that 0.5 is the judge's verdict on no
            content; `"none"` returns the judge's P(violates) as it is.

    Attributes:
        prior: the judge's P(violates) on `CONTENT_FREE_INPUTS` (the sigmoid of its
            mean log-odds over them), computed once at construction; None with
            `calibration="none"`.

    Raises:
        ValueError: an unknown `calibration`, or a judge whose prior is 0 or 1 (it
            answers the same whatever it reads, and no renormalisation can help).

    `ConstitutionCost.from_pretrained(path, constitution=...)` loads the judge by hub
    name, folder or `.gguf` file.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        constitution: Constitution = DEFAULT_CONSTITUTION,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        share_prompt_cache: bool = True,
        calibration: Calibration = "content-free",
    ) -> None:
        if calibration not in get_args(Calibration):
            raise ValueError(
                f"ConstitutionCost: calibration={calibration!r} is not one of "
                f"{', '.join(map(repr, get_args(Calibration)))}; use 'content-free' to correct "
                "the judge's bias or 'none' for its raw P(violates)."
            )
        if not isinstance(constitution, Constitution):
            raise TypeError(
                "ConstitutionCost: constitution must be a Constitution, got "
                f"{type(constitution).__name__}; build one with Constitution((...)) or "
                "Constitution.from_file(path)."
            )
        self.constitution = constitution
        super().__init__(
            model,
            tokenizer,
            unsafe_token=constitution.violation_token,
            safe_token=constitution.compliance_token,
            template=constitution.judge_template(),
            batch_size=batch_size,
            device=device,
            share_prompt_cache=share_prompt_cache,
        )
        self.calibration = calibration
        self.prior = None if calibration == "none" else self._content_free_prior()

    def _content_free_prior(self) -> float:
        """The judge's P(violates) on `CONTENT_FREE_INPUTS`: the sigmoid of its mean
        log-odds over them, strictly inside (0, 1)."""
        inputs = list(CONTENT_FREE_INPUTS)
        log_odds = super()._score(inputs, inputs).logit().mean()
        prior = float(torch.sigmoid(log_odds))
        if not (torch.isfinite(log_odds) and 0.0 < prior < 1.0):
            raise ValueError(
                f"ConstitutionCost: the judge's P(violates) on content-free input is {prior}, "
                "so it gives the same verdict whatever it reads and calibration cannot "
                "correct it; use another judge, another template, or calibration='none'."
            )
        return prior

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Returns `(batch,)` P(violates), renormalised by `prior` when calibrated."""
        verdict = super()._score(prompts, responses)
        if self.prior is None:
            return verdict
        violates = verdict / self.prior
        complies = (1.0 - verdict) / (1.0 - self.prior)
        return violates / (violates + complies)

    @classmethod
    def from_spec(cls, spec: str) -> ConstitutionCost:
        """From `"judge=PATH_OR_NAME;constitution=FILE;device=cpu;batch_size=8;
        calibration=content-free"`: the judge by hub name, folder or `.gguf` file, the
        principles from a file (default: `DEFAULT_CONSTITUTION`), the calibration
        (`content-free` or `none`); see `inference_safeguard.scorer_spec`."""
        owner = cls.__name__
        options = parse_spec(
            spec, owner, {"judge", "constitution", "device", "batch_size", "calibration"}
        )
        if not options.get("judge"):
            raise ValueError(f"{owner}.from_spec: name the judge model, e.g. judge=model.gguf.")
        constitution = (
            Constitution.from_file(options["constitution"])
            if "constitution" in options
            else DEFAULT_CONSTITUTION
        )
        batch_size = spec_int(options, "batch_size", owner)
        calibration = options.get("calibration", "content-free")
        if calibration not in get_args(Calibration):
            raise ValueError(
                f"{owner}.from_spec: calibration={calibration!r} is not one of "
                f"{', '.join(get_args(Calibration))}; write e.g. calibration=content-free."
            )
        return cls.from_pretrained(
            options["judge"],
            device=options.get("device"),
            constitution=constitution,
            batch_size=8 if batch_size is None else batch_size,
            calibration=cast(Calibration, calibration),
        )
