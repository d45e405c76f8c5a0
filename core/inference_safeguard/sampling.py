"""Next-token sampling: logits processors and per-prompt seeded samplers.

Each prompt owns a `torch.Generator`, so the tokens drawn for a prompt depend only on
its seed and its own rows: a prompt decodes the same alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Apply temperature, top-k and nucleus filtering; returns a new tensor.

    Args:
        logits: `(rows, vocab)` next-token logits.
        temperature: > 0 (greedy decoding does not warp).
        top_k: keep the k likeliest tokens; 0 keeps all.
        top_p: keep the smallest set of likeliest tokens with mass >= top_p (at least the
            likeliest token); 1 keeps all.

    Returns:
        `(rows, vocab)` float logits with filtered tokens at `-inf`.
    """
    warped = logits.float() / temperature
    vocab = warped.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(warped, top_k, dim=-1).values[..., -1:]
        warped = warped.masked_fill(warped < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(warped, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p. The likeliest token
        # always stays: a top_p that rounds to 0 in float32 must not drop every token.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        warped = warped.masked_fill(drop, float("-inf"))
    return warped


def penalize_tokens(logits: torch.Tensor, token_mask: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the logits of masked tokens; returns a new tensor.

    Args:
        logits: `(rows, vocab)`.
        token_mask: `(rows, vocab)` bool, True where a token is penalised.
        penalty: non-negative amount subtracted.
    """
    # `where`, not `penalty * mask`: a huge penalty times 0 must not turn other logits NaN.
    return torch.where(token_mask, logits - penalty, logits)


class PromptSamplers:
    """One seeded generator per prompt; samples rows grouped contiguously by prompt.

    Args:
        seeds: one seed per prompt.
        device: device of the logits the samplers will see.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.generators = []
        for seed in seeds:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))
            self.generators.append(generator)

    def sample(
        self,
        logits: torch.Tensor,
        group_sizes: Sequence[int],
        prompt_ids: Sequence[int],
        temperature: float,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> torch.Tensor:
        """Draw one token per row with the Gumbel-max trick.

        Args:
            logits: `(rows, vocab)` next-token logits, rows grouped by prompt.
            group_sizes: rows of each group, in order; they sum to `rows`.
            prompt_ids: the prompt (index into the seeds) that owns each group.
            temperature: 0 for greedy decoding (no randomness drawn).

        Returns:
            `(rows,)` long token ids.
        """
        if temperature == 0:
            return logits.argmax(dim=-1)
        warped = warp_logits(logits, temperature, top_k, top_p)
        noise = torch.cat(
            [
                torch.rand(
                    size, warped.shape[-1], generator=self.generators[prompt], device=warped.device
                )
                for size, prompt in zip(group_sizes, prompt_ids, strict=True)
            ]
        )
        gumbel = -torch.log(-torch.log(noise.clamp_min(1e-20)))
        return (warped + gumbel).argmax(dim=-1)
