"""Unit tests for logits warping and per-prompt seeded sampling in
`inference_safeguard.sampling`."""

from __future__ import annotations

import pytest
import torch

from inference_safeguard.sampling import (
    PromptSamplers,
    RepetitionPenalty,
    model_sampling_defaults,
    penalize_tokens,
    warp_logits,
)

CPU = torch.device("cpu")


def _logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def _nucleus_reference(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep mask of the smallest set of likeliest tokens whose probability reaches `top_p`."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    probs = logits.double().softmax(-1)
    for row in range(logits.shape[0]):
        order = torch.argsort(probs[row], descending=True)
        mass = 0.0
        for token in order.tolist():
            keep[row, token] = True
            mass += probs[row, token].item()
            if mass >= top_p:
                break
    return keep


# --- warp_logits ----------------------------------------------------------------------------


def test_warp_logits_divides_by_temperature_and_returns_a_float_copy() -> None:
    logits = _logits(3, 7).half()
    warped = warp_logits(logits, temperature=0.5, top_k=0, top_p=1.0)
    assert warped.dtype == torch.float32
    torch.testing.assert_close(warped, logits.float() / 0.5)


@pytest.mark.parametrize("k", [1, 3, 9])
def test_top_k_keeps_exactly_the_k_likeliest_tokens(k: int) -> None:
    logits = _logits(5, 10)
    warped = warp_logits(logits, temperature=1.0, top_k=k, top_p=1.0)
    finite = torch.isfinite(warped)
    assert finite.sum(-1).tolist() == [k] * 5
    expected = torch.zeros_like(finite).scatter(-1, torch.topk(logits, k, dim=-1).indices, True)
    assert torch.equal(finite, expected)
    torch.testing.assert_close(warped[finite], logits[finite])
    assert torch.all(warped[~finite] == float("-inf"))


@pytest.mark.parametrize("k", [0, 10, 50])
def test_top_k_zero_or_at_least_vocab_keeps_every_token(k: int) -> None:
    logits = _logits(2, 10)
    assert torch.isfinite(warp_logits(logits, 1.0, top_k=k, top_p=1.0)).all()


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    # Vocabulary order deliberately differs from probability order.
    probs = torch.tensor([[0.15, 0.5, 0.1, 0.25]])
    logits = probs.log()
    kept = {
        p: torch.isfinite(warp_logits(logits, 1.0, 0, p))[0].nonzero().flatten().tolist()
        for p in (0.3, 0.7, 0.8, 0.95)
    }
    assert kept == {0.3: [1], 0.7: [1, 3], 0.8: [0, 1, 3], 0.95: [0, 1, 2, 3]}


def test_top_p_stops_as_soon_as_the_mass_is_reached_exactly() -> None:
    # Uniform over 4 tokens: the cumulative mass is exactly 0.25, 0.5, 0.75, 1.
    logits = torch.zeros(3, 4)
    for top_p, size in ((0.25, 1), (0.5, 2), (0.75, 3), (0.76, 4)):
        kept = torch.isfinite(warp_logits(logits, 1.0, 0, top_p)).sum(-1)
        assert kept.tolist() == [size] * 3, top_p


def test_top_p_matches_reference_nucleus_on_random_rows() -> None:
    logits = _logits(64, 20, seed=3)
    for top_p in (0.2, 0.5, 0.9):
        finite = torch.isfinite(warp_logits(logits, 1.0, 0, top_p))
        assert torch.equal(finite, _nucleus_reference(logits, top_p)), top_p


def test_top_p_always_keeps_at_least_the_likeliest_token() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 0.0, 9.0]])
    warped = warp_logits(logits, 1.0, 0, top_p=1e-9)
    finite = torch.isfinite(warped)
    assert finite.sum(-1).tolist() == [1, 1]
    assert finite[1, 3]


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 1e-9])
def test_a_top_p_that_rounds_to_zero_still_samples_the_likeliest_token(top_p: float) -> None:
    logits = _logits(4, 32)
    warped = warp_logits(logits, 1.0, 0, top_p=top_p)
    assert torch.isfinite(warped).sum(-1).tolist() == [1, 1, 1, 1]
    sampled = PromptSamplers([0], CPU).sample(logits, [4], [0], 1.0, top_p=top_p)
    assert torch.equal(sampled, logits.argmax(-1))


def test_top_p_applies_to_the_mass_left_after_top_k() -> None:
    # After top-2 the renormalised mass is [4/7, 3/7]: top_p=0.5 keeps one token, although
    # the unrenormalised nucleus of 0.5 would need two.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    combined = warp_logits(logits, 1.0, top_k=2, top_p=0.5)
    assert torch.isfinite(combined)[0].tolist() == [True, False, False, False]
    random = _logits(32, 12, seed=5)
    combined = warp_logits(random, 1.0, top_k=6, top_p=0.8)
    after_k = warp_logits(random, 1.0, top_k=6, top_p=1.0)
    assert torch.equal(torch.isfinite(combined), _nucleus_reference(after_k, 0.8))
    assert torch.isfinite(combined).sum(-1).max() <= 6


def test_temperature_is_applied_before_nucleus_filtering() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sharp = torch.isfinite(warp_logits(logits, 0.25, 0, 0.9)).sum().item()
    flat = torch.isfinite(warp_logits(logits, 4.0, 0, 0.9)).sum().item()
    assert sharp == 1
    assert flat == 4


def test_warp_logits_does_not_modify_its_input() -> None:
    logits = _logits(4, 9)
    before = logits.clone()
    warp_logits(logits, 0.7, top_k=3, top_p=0.6).fill_(0.0)
    assert torch.equal(logits, before)


# --- penalize_tokens ------------------------------------------------------------------------


def test_penalize_tokens_subtracts_penalty_only_on_masked_tokens() -> None:
    logits = _logits(3, 6)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[2, 0] = True
    got = penalize_tokens(logits, mask, penalty=2.5)
    torch.testing.assert_close(got[mask], logits[mask] - 2.5)
    assert torch.equal(got[~mask], logits[~mask])


@pytest.mark.parametrize("penalty", [1e6, 1e39, float("inf")])
def test_a_huge_penalty_leaves_unmasked_logits_untouched(penalty: float) -> None:
    logits = _logits(2, 8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :3] = True
    got = penalize_tokens(logits, mask, penalty)
    assert torch.equal(got[~mask], logits[~mask])
    assert (got[mask] < logits.min()).all()


def test_penalize_tokens_does_not_modify_its_inputs() -> None:
    logits = _logits(2, 5)
    mask = torch.tensor([[True, False, True, False, False], [False] * 5])
    before = (logits.clone(), mask.clone())
    penalize_tokens(logits, mask, 3.0).fill_(0.0)
    assert torch.equal(logits, before[0])
    assert torch.equal(mask, before[1])


# --- PromptSamplers -------------------------------------------------------------------------


def test_temperature_zero_samples_greedily_without_drawing_randomness() -> None:
    logits = _logits(6, 11)
    samplers = PromptSamplers([5, 6], CPU)
    greedy = samplers.sample(logits, [4, 2], [0, 1], temperature=0)
    assert torch.equal(greedy, logits.argmax(-1))
    # The generators are untouched: the next draw matches a fresh sampler's first draw.
    after = samplers.sample(logits, [4, 2], [0, 1], temperature=1.0)
    fresh = PromptSamplers([5, 6], CPU).sample(logits, [4, 2], [0, 1], temperature=1.0)
    assert torch.equal(after, fresh)


def test_same_seeds_draw_the_same_tokens() -> None:
    logits = _logits(8, 30)
    draws = [
        [samplers.sample(logits, [5, 3], [0, 1], temperature=1.0) for _ in range(3)]
        for samplers in (PromptSamplers([1, 2], CPU), PromptSamplers([1, 2], CPU))
    ]
    for first, second in zip(*draws, strict=True):
        assert torch.equal(first, second)
    other = PromptSamplers([3, 4], CPU)
    assert any(
        not torch.equal(other.sample(logits, [5, 3], [0, 1], 1.0), step) for step in draws[0]
    )


def test_a_prompts_draws_do_not_depend_on_other_prompts_in_the_batch() -> None:
    logits_a = _logits(4, 25, seed=1)
    logits_b = _logits(3, 25, seed=2)
    alone = PromptSamplers([101], CPU)
    together = PromptSamplers([202, 101], CPU)  # A is prompt 1 here, and comes after B
    for _ in range(3):
        tokens_alone = alone.sample(logits_a, [4], [0], temperature=0.9, top_k=10, top_p=0.95)
        tokens_batch = together.sample(
            torch.cat([logits_b, logits_a]), [3, 4], [0, 1], temperature=0.9, top_k=10, top_p=0.95
        )
        assert torch.equal(tokens_batch[3:], tokens_alone)


def test_each_prompt_draws_the_uniforms_of_its_own_seed() -> None:
    # The noise of a group is `torch.rand` of a generator seeded with its prompt's seed,
    # draw after draw, whatever the other groups of the batch: Gumbel-max on it picks
    # the same tokens as this reference, call after call.
    logits = _logits(7, 19, seed=3)
    group_sizes, prompt_ids, seeds = [3, 4], [1, 0], [11, 12]
    samplers = PromptSamplers(seeds, CPU)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    for _ in range(3):
        uniforms = torch.cat(
            [
                torch.rand(size, 19, generator=generators[prompt])
                for size, prompt in zip(group_sizes, prompt_ids, strict=True)
            ]
        )
        gumbel = -torch.log(-torch.log(uniforms.clamp_min(1e-20)))
        expected = (logits / 0.8 + gumbel).argmax(-1)
        assert torch.equal(samplers.sample(logits, group_sizes, prompt_ids, 0.8), expected)


def test_group_sizes_that_do_not_cover_the_rows_are_rejected() -> None:
    with pytest.raises(ValueError, match="group sizes sum to 5, but the logits have 6 rows"):
        PromptSamplers([1, 2], CPU).sample(_logits(6, 10), [2, 3], [0, 1], temperature=1.0)


def test_sampled_tokens_never_fall_outside_top_k() -> None:
    logits = _logits(200, 40, seed=4)
    allowed = torch.topk(logits, 3, dim=-1).indices
    samplers = PromptSamplers([0, 1], CPU)
    for _ in range(5):
        tokens = samplers.sample(logits, [120, 80], [0, 1], temperature=2.0, top_k=3)
        assert (allowed == tokens[:, None]).any(-1).all()


def test_sampled_tokens_stay_inside_the_nucleus() -> None:
    logits = _logits(200, 40, seed=6)
    nucleus = _nucleus_reference(logits, 0.5)
    tokens = PromptSamplers([9], CPU).sample(logits, [200], [0], temperature=1.0, top_p=0.5)
    assert nucleus.gather(-1, tokens[:, None]).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_empirical_frequencies_follow_the_softmax(temperature: float) -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    draws = 2000
    logits = probs.log().expand(draws, 3)
    tokens = PromptSamplers([42], CPU).sample(logits, [draws], [0], temperature=temperature)
    frequencies = torch.bincount(tokens, minlength=3).float() / draws
    expected = (probs.log() / temperature).softmax(-1)
    assert torch.allclose(frequencies, expected, atol=0.05), (frequencies, expected)


def test_sample_never_picks_a_token_with_zero_probability() -> None:
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]]).expand(500, 4)
    tokens = PromptSamplers([3], CPU).sample(logits, [500], [0], temperature=1.0)
    assert set(tokens.tolist()) == {0, 2}


def test_sample_does_not_modify_its_inputs() -> None:
    logits = _logits(5, 12)
    group_sizes, prompt_ids = [2, 3], [1, 0]
    before = (logits.clone(), list(group_sizes), list(prompt_ids))
    PromptSamplers([7, 8], CPU).sample(logits, group_sizes, prompt_ids, 0.8, top_k=4, top_p=0.9)
    PromptSamplers([7, 8], CPU).sample(logits, group_sizes, prompt_ids, 0.0)
    assert torch.equal(logits, before[0])
    assert (group_sizes, prompt_ids) == before[1:]


# --- min_p and the repetition penalty, against transformers' own processors ----------------


@pytest.mark.parametrize("min_p", [0.05, 0.3, 1.0])
def test_min_p_keeps_what_transformers_min_p_warper_keeps(min_p: float) -> None:
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = _logits(4, 50, seed=3)
    warped = warp_logits(logits, temperature=0.7, top_k=0, top_p=1.0, min_p=min_p)
    expected = MinPLogitsWarper(min_p)(torch.zeros(4, 1, dtype=torch.long), logits / 0.7)
    assert torch.equal(warped.isinf(), expected.isinf())
    assert (~warped.isinf()).sum(-1).min() >= 1


def test_repetition_penalty_matches_transformers_and_does_not_modify_its_input() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = _logits(3, 20, seed=4)
    before = logits.clone()
    histories = [[1, 2, 2, 5], [0], [19, 3, 7, 7, 7]]
    penalty = RepetitionPenalty(1.7, histories, vocab_size=20, device=CPU)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(
        torch.tensor([h + [h[-1]] * (5 - len(h)) for h in histories]), logits.clone()
    )
    torch.testing.assert_close(penalty(logits), expected)
    assert torch.equal(logits, before)


def test_repetition_penalty_observes_the_chosen_tokens_per_row() -> None:
    penalty = RepetitionPenalty(2.0, [[], [1]], vocab_size=4, device=CPU)
    penalty.observe(torch.tensor([3, -1]))
    logits = torch.full((2, 4), 4.0)
    assert penalty(logits).tolist() == [[4.0, 4.0, 4.0, 2.0], [4.0, 2.0, 4.0, 4.0]]


def test_repetition_penalty_must_be_positive() -> None:
    with pytest.raises(ValueError, match="> 0"):
        RepetitionPenalty(0.0, [[1]], vocab_size=4, device=CPU)


# --- the model's own sampling settings ----------------------------------------------------


def test_model_sampling_defaults_are_the_fields_its_author_set() -> None:
    from transformers import GenerationConfig

    assert model_sampling_defaults(GenerationConfig()) == {}
    assert model_sampling_defaults(None) == {}
    shipped = GenerationConfig(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
    assert model_sampling_defaults(shipped) == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "min_p": 0.0,
    }
    with pytest.warns(UserWarning, match="top_p"):
        assert model_sampling_defaults(GenerationConfig(top_p=0.0, repetition_penalty=1.1)) == {
            "repetition_penalty": 1.1
        }
