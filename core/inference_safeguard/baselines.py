"""Baseline decoders with InferenceGuard's interface: sampling, Best-of-N, beam, ARGS.

They exist for the evaluation table and for users who want them; none of them
enforces the budget (every result carries its cost and `safe` flag, but nothing is
refused). Each takes `allow_special_tokens_in_content` like `InferenceGuard`. The scorings:
- "reward": rank by R(x, y);
- "lagrangian": rank by R(x, y) - lambda * C(x, y);
- "augmented": the safety-augmented objective of InferenceGuard (R if within
  budget, else -n + z), without its resampling and final refusal.

Each takes several named constraints (`costs={name: (scorer, budget)}`) as
`InferenceGuard` does: "augmented" ranks by the worst violation, "lagrangian" and ARGS's
cost term by the sum of the constraints' costs, and every result reports each one.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard.cancellation import raise_if_cancelled
from inference_safeguard.config import GuardConfig
from inference_safeguard.constraints import CostsInput
from inference_safeguard.decoder import Decoder, Response, ToolsInput
from inference_safeguard.errors import OutputFormatError
from inference_safeguard.lm import CausalLM, EncodedPrompt, PromptInput, TokenChooser
from inference_safeguard.scorers import Scorer
from inference_safeguard.search import (
    BlockSearch,
    CandidateEvaluator,
    ModelsEvaluator,
    Scoring,
    cut_before_stop,
)
from inference_safeguard.tools import call_is_required


class _BlockSearchBaseline(Decoder):
    """A baseline that is the block search under a fixed shape and scoring."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cost: Scorer | None = None,
        reward: Scorer | None = None,
        config: GuardConfig | None = None,
        *,
        scoring: Scoring = "reward",
        lagrange_multiplier: float = 1.0,
        allow_special_tokens_in_content: bool = False,
        costs: CostsInput | None = None,
    ) -> None:
        lm = CausalLM(
            model, tokenizer, allow_special_tokens_in_content=allow_special_tokens_in_content
        )
        super().__init__(lm, cost, reward, config, costs=costs)
        self.search = BlockSearch(
            self.lm,
            ModelsEvaluator(self.constraints, reward),
            scoring=scoring,
            lagrange_multiplier=lagrange_multiplier,
            resample=False,
        )

    def _search_config(self, config: GuardConfig) -> GuardConfig:
        return config

    def search_plan(self, config: GuardConfig) -> tuple[GuardConfig, CandidateEvaluator | None]:
        """The settings and evaluator (None: the search's own) `self.search` runs a call
        under `config` with."""
        return self._search_config(config), None

    def _identity_settings(self) -> dict[str, Any]:
        return {
            "scoring": self.search.scoring,
            "lagrange_multiplier": self.search.lagrange_multiplier,
            "resample": self.search.resample,
        }

    def _decode(
        self,
        prompts: list[EncodedPrompt],
        config: GuardConfig,
        seeds: list[int],
        cancel: threading.Event | None = None,
    ) -> list[Response]:
        searches = self.search.search(prompts, self._search_config(config), seeds, cancel=cancel)
        return [Response.of(search) for search in searches]


class SamplingDecoder(_BlockSearchBaseline):
    """Plain sampling from the base model: one response, nothing ranked or pruned."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cost: Scorer | None = None,
        reward: Scorer | None = None,
        config: GuardConfig | None = None,
        *,
        allow_special_tokens_in_content: bool = False,
        costs: CostsInput | None = None,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            cost,
            reward,
            config,
            scoring="reward",
            allow_special_tokens_in_content=allow_special_tokens_in_content,
            costs=costs,
        )

    def _search_config(self, config: GuardConfig) -> GuardConfig:
        return config.with_overrides(
            num_candidates=1, beam_width=1, block_size=config.max_new_tokens
        )


class BestOfN(_BlockSearchBaseline):
    """Sample `num_candidates` whole responses and return the best under `scoring`.

    Args:
        scoring: "reward", "lagrangian" or "augmented" (see the module docstring).
        lagrange_multiplier: lambda of the Lagrangian scoring.
    """

    def _search_config(self, config: GuardConfig) -> GuardConfig:
        return config.with_overrides(beam_width=1, block_size=config.max_new_tokens)


class BlockBeamSearch(_BlockSearchBaseline):
    """Block-wise beam search (`num_candidates` blocks, `beam_width` beams) under `scoring`,
    without InferenceGuard's resampling or final refusal.

    Args:
        scoring: "reward", "lagrangian" or "augmented" (see the module docstring).
        lagrange_multiplier: lambda of the Lagrangian scoring.
    """


class ARGS(Decoder):
    """ARGS (Khanov et al., 2024): token-level reward-guided greedy decoding.

    At each token, the `num_tokens` likeliest next tokens are scored
    `log p(v) + reward_weight * R(x, y + v) - cost_weight * C(x, y + v)` and the best
    is taken. With `cost_weight > 0` this is "ARGS with cost" (with several constraints,
    C is the sum of their costs).

    Args:
        num_tokens: candidate tokens per step (ARGS's k).
        reward_weight: w on the reward model's score; needs a reward model when > 0.
        cost_weight: weight of the cost term; 0 gives plain ARGS.
    """

    lm: CausalLM  # ARGS decodes token by token: the Hugging Face backend only

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cost: Scorer | None = None,
        reward: Scorer | None = None,
        config: GuardConfig | None = None,
        *,
        num_tokens: int = 10,
        reward_weight: float = 1.0,
        cost_weight: float = 0.0,
        allow_special_tokens_in_content: bool = False,
        costs: CostsInput | None = None,
    ) -> None:
        lm = CausalLM(
            model, tokenizer, allow_special_tokens_in_content=allow_special_tokens_in_content
        )
        super().__init__(lm, cost, reward, config, costs=costs)
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if reward_weight < 0 or cost_weight < 0:
            raise ValueError(
                f"reward_weight and cost_weight must be >= 0, got {reward_weight}, {cost_weight}"
            )
        if reward is None and reward_weight > 0:
            raise ValueError(
                "ARGS needs a reward model when reward_weight > 0; pass reward=... "
                "or reward_weight=0 (with cost_weight > 0 for cost-guided decoding)"
            )
        self.num_tokens = num_tokens
        self.reward_weight = reward_weight
        self.cost_weight = cost_weight

    def _identity_settings(self) -> dict[str, Any]:
        return {
            "num_tokens": self.num_tokens,
            "reward_weight": self.reward_weight,
            "cost_weight": self.cost_weight,
        }

    @torch.inference_mode()
    def encode_prompts(
        self, prompts: Sequence[PromptInput], config: GuardConfig, tools: ToolsInput = None
    ) -> list[EncodedPrompt]:
        """As `Decoder.encode_prompts`, without a grammar: ARGS picks every token by its own
        reward-guided scores, which have no place for a token mask. Tools the model may
        call or not ("auto") are offered as text, their calls parsed as written; a
        response format or a required call, which only a grammar guarantees, is refused."""
        encoded = super().encode_prompts(prompts, config, tools)
        constrained = next((p.constraint for p in encoded if p.constraint is not None), None)
        if constrained is None:
            return encoded
        if config.response_format is None and not call_is_required(config.tool_choice):
            return [dataclasses.replace(p, constraint=None) for p in encoded]
        raise OutputFormatError(
            f"ARGS cannot enforce {constrained.description}: it has no grammar-constrained "
            "sampling; use InferenceGuard or a block-search baseline (BestOfN, "
            "BlockBeamSearch, SamplingDecoder), or leave response_format and tool_choice unset"
        )

    def _decode(
        self,
        prompts: list[EncodedPrompt],
        config: GuardConfig,
        seeds: list[int],
        cancel: threading.Event | None = None,
    ) -> list[Response]:
        state = self.lm.prefill([p.ids for p in prompts])
        k = min(self.num_tokens, self.lm.vocab_size)
        token_ids: list[list[int]] = [[] for _ in prompts]
        reasons: list[Any] = [None] * len(prompts)
        live = list(range(len(prompts)))
        for _ in range(config.max_new_tokens):
            raise_if_cancelled(cancel)
            logprobs = state.logits.log_softmax(-1)
            top = logprobs.topk(k, dim=-1)
            options = [
                token_ids[p] + [t]
                for p, row in zip(live, top.indices.tolist(), strict=True)
                for t in row
            ]
            texts = self.lm.decode(options)
            prompt_texts = [prompts[p].text for p in live for _ in range(k)]
            score = top.values.flatten().cpu()
            if self.reward_weight > 0:
                if self.reward is None:  # __init__ checks it; only a reward set to None later
                    raise ValueError("ARGS needs a reward model when reward_weight > 0")
                score = score + self.reward_weight * self.reward(prompt_texts, texts)
            if self.cost_weight > 0:
                total = self.constraints.score(prompt_texts, texts).sum(-1)
                score = score - self.cost_weight * total
            best = score.view(len(live), k).argmax(-1).to(top.indices.device)
            chosen = top.indices.gather(-1, best[:, None]).squeeze(-1)
            block = self.lm.decode_block(state, 1, _constant_chooser(chosen))
            still = []
            for row, prompt in enumerate(live):
                if bool(block.ended[row]):
                    reasons[prompt] = "stop"
                    continue
                token_ids[prompt].append(int(chosen[row]))
                text = self.lm.decode([token_ids[prompt]])[0]
                if any(s in text for s in config.stop):
                    reasons[prompt] = "stop"
                elif len(token_ids[prompt]) >= config.max_new_tokens:
                    reasons[prompt] = "length"
                else:
                    still.append(row)
            if not still:
                break
            if len(still) < len(live):
                self.lm.select_rows(state, torch.tensor(still))
            live = [live[row] for row in still]
        responses = []
        for ids, reason in zip(token_ids, reasons, strict=True):
            text = self.lm.decode([ids])[0]
            ids, text = cut_before_stop(self.lm, ids, text, config.stop) or (ids, text)
            responses.append(Response(token_ids=ids, text=text, finish_reason=reason or "length"))
        return responses


def _constant_chooser(tokens: torch.Tensor) -> TokenChooser:
    """A chooser that picks `tokens` (`(rows,)`) whatever the logits and step."""
    return lambda _logits, _step: tokens
