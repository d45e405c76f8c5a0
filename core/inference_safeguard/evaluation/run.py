"""`evaluate`: run each method over a prompt set, with a progress bar, and collect a report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard.config import GuardConfig
from inference_safeguard.constraints import CostsInput, worst
from inference_safeguard.decoder import Decoder
from inference_safeguard.errors import UnsafeGenerationError
from inference_safeguard.evaluation.methods import METHODS, MethodOptions, build_decoder
from inference_safeguard.evaluation.report import EvaluationReport, MethodRun
from inference_safeguard.lm import PromptInput
from inference_safeguard.results import GuardResult
from inference_safeguard.scorers import Scorer

Oracle = Callable[[str, str], bool]
"""`is_unsafe(prompt, response) -> bool`: an independent judge of a response's text."""

DEFAULT_SEED = 0
"""Seed of every prompt when the config has none, so that evaluations are reproducible."""


def evaluate(
    methods: Sequence[str],
    prompts: Sequence[PromptInput],
    *,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cost: Scorer | None,
    reward: Scorer | None = None,
    oracle: Oracle | None = None,
    config: GuardConfig | None = None,
    batch_size: int = 8,
    options: MethodOptions | None = None,
    progress: bool = True,
    costs: CostsInput | None = None,
) -> EvaluationReport:
    """Run every method over `prompts` and collect their results.

    Every method gets the same config (so the same N, K, block size, max tokens and
    budget) and the same seed: each prompt's sampler is seeded with `config.seed`
    (`DEFAULT_SEED` when None), so a prompt's response depends neither on the run nor
    on `batch_size`. Prompts are decoded `batch_size` at a time with `generate_batch`.
    A refused result is re-scored on the refusal text it returns (see
    `inference_safeguard.evaluation.metrics`); with `on_unsafe="raise"`, the results the
    error carries are kept, flagged unsafe.

    Args:
        methods: names from `inference_safeguard.evaluation.methods.METHODS`, in table order.
        prompts: plain-text prompts or chat message lists.
        model, tokenizer: the base model every method decodes with.
        cost: cost model C(x, y); `config.budget` is its budget. Or None, with `costs`.
        reward: reward model R(x, y), or None.
        oracle: `is_unsafe(prompt, response)`, given the prompt as plain text (a message
            list flattened to a `role: content` transcript) and the returned text.
        config: shared `GuardConfig`; default `GuardConfig()`.
        batch_size: prompts per `generate_batch` call.
        options: settings of individual methods (Lagrange multiplier, ARGS weights).
        progress: show a tqdm progress bar on standard error.
        costs: instead of `cost`, named constraints `{name: (scorer, budget)}`; every
            method is held to (and reports) each.

    Raises:
        ValueError: no methods or prompts, a repeated or unknown method, a method that
            needs the missing reward model, or a batch size below 1.
        InvalidPromptError: a prompt the decoders cannot take (checked before any decoding).
    """
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"give each method once and at least one, got {list(methods)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate; give at least one")
    config = config or GuardConfig()
    if config.seed is None:
        config = config.with_overrides(seed=DEFAULT_SEED)
    decoders = {
        name: build_decoder(
            name,
            model=model,
            tokenizer=tokenizer,
            cost=cost,
            reward=reward,
            config=config,
            options=options,
            costs=costs,
        )
        for name in methods
    }
    first = decoders[methods[0]]
    prompt_texts = [encoded.text for encoded in first.encode_prompts(prompts, config)]

    runs = []
    with tqdm(total=len(methods) * len(prompts), unit="response", disable=not progress) as bar:
        for name, decoder in decoders.items():
            bar.set_description(name)
            results: list[GuardResult] = []
            seconds = 0.0
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                started = time.perf_counter()
                results += _generate(decoder, chunk)
                seconds += time.perf_counter() - started
                bar.update(len(chunk))
            results = _scored_as_returned(results, prompt_texts, decoder, reward)
            verdicts = None
            if oracle is not None:
                verdicts = [
                    bool(oracle(prompt, result.text))
                    for prompt, result in zip(prompt_texts, results, strict=True)
                ]
            runs.append(MethodRun(name, METHODS[name].label, results, seconds, verdicts))
    # The config with each constraint's budget, as the decoders hold them.
    reported = first.constraints.configure(config)
    return EvaluationReport(prompts=prompt_texts, config=reported, runs=runs)


def _generate(decoder: Decoder, prompts: list[PromptInput]) -> list[GuardResult]:
    """`decoder.generate_batch(prompts)`, keeping the results of an `on_unsafe="raise"`."""
    try:
        return decoder.generate_batch(prompts)
    except UnsafeGenerationError as error:
        return error.results


def _scored_as_returned(
    results: list[GuardResult], prompts: list[str], decoder: Decoder, reward: Scorer | None
) -> list[GuardResult]:
    """`results` with the costs (each constraint's; the worst one's as `cost`) and
    reward of each refusal's own text."""
    refused = [i for i, result in enumerate(results) if result.refused]
    if not refused:
        return results
    refused_prompts = [prompts[i] for i in refused]
    texts = [results[i].text for i in refused]
    costs = decoder.constraints.score(refused_prompts, texts, finished=True).tolist()
    rewards = [None] * len(refused) if reward is None else reward(refused_prompts, texts).tolist()
    rescored = list(results)
    for i, new_costs, new_reward in zip(refused, costs, rewards, strict=True):
        outcomes = tuple(
            dataclasses.replace(old, cost=new, safe=new <= old.budget)
            for old, new in zip(results[i].constraints, new_costs, strict=True)
        )
        rescored[i] = dataclasses.replace(
            results[i], cost=worst(outcomes).cost, reward=new_reward, constraints=outcomes
        )
    return rescored
