"""Speculative candidates: drafted by a small model, verified by the base model, and
distributed exactly as the base model's own samples."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from scipy import stats

from inference_safeguard import InferenceGuard, speculative
from inference_safeguard.cli import main
from inference_safeguard.errors import (
    BackendCapabilityError,
    DraftModelError,
    GenerationCancelledError,
)
from inference_safeguard.lm import BlockRequest, CausalLM
from inference_safeguard.quantized_draft import KERNELS, missing_kernels, quantized_draft
from inference_safeguard.sampling import (
    PromptSamplers,
    RepetitionPenalty,
    SamplingSettings,
    penalize_tokens,
    warp_logits,
)
from inference_safeguard.speculative import SpeculativeCausalLM
from inference_safeguard.testing import build_tiny_llama, build_tiny_tokenizer

PROMPT = "The safe cat"
SAMPLES = 6000
SETTINGS = SamplingSettings(temperature=0.9, top_k=3, top_p=1.0, min_p=0.0, repetition_penalty=1.4)
UNSAFE_PENALTY = 2.0
DRAFT_NOISE = 0.5


@pytest.fixture(scope="module")
def base(tiny_tokenizer, tiny_model) -> CausalLM:
    return CausalLM(tiny_model, tiny_tokenizer)


@pytest.fixture(scope="module")
def draft(tiny_tokenizer, tiny_model) -> CausalLM:
    """A smaller random model whose output layer is the base model's, perturbed: its
    distributions overlap the base model's (as a real draft model's do) without
    matching them, so drafts are kept, rejected and corrected alike."""
    model = build_tiny_llama(tiny_tokenizer, seed=7, num_layers=1)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.model.load_state_dict(tiny_model.model.state_dict(), strict=False)
        head = tiny_model.lm_head.weight
        noise = torch.randn(head.shape, generator=generator) * head.std() * DRAFT_NOISE
        model.lm_head.weight.copy_(head + noise)
    return CausalLM(model, tiny_tokenizer)


@pytest.fixture(scope="module")
def lm(base, draft) -> SpeculativeCausalLM:
    return SpeculativeCausalLM(base, draft, draft_tokens=2)


def _request(count: int, num_tokens: int, seeds: list[int], **kwargs) -> BlockRequest:
    group_sizes = kwargs.pop("group_sizes", [count])
    return BlockRequest(
        num_tokens=num_tokens,
        rows=kwargs.pop("rows", torch.arange(count)),
        prompt_ids=kwargs.pop("prompt_ids", list(range(len(group_sizes)))),
        group_sizes=group_sizes,
        samplers=PromptSamplers(seeds, torch.device("cpu")),
        sampling=kwargs.pop("sampling", SETTINGS),
        **kwargs,
    )


def _exact_distribution(base: CausalLM, ids: list[int], unsafe: torch.Tensor, length: int) -> dict:
    """The base model's exact distribution of its first `length` tokens, built from the
    ordinary path's own pieces (repetition penalty, unsafe penalty, warping)."""
    eos = base.tokenizer.eos_token_id
    exact: dict[tuple[int, ...], float] = {}

    def expand(prefix: tuple[int, ...], mass: float) -> None:
        if len(prefix) == length or (prefix and prefix[-1] == eos):
            exact[prefix + (-1,) * (length - len(prefix))] = mass
            return
        with torch.inference_mode():
            logits = base.model(torch.tensor([ids + list(prefix)])).logits[:, -1].float()
        logits = RepetitionPenalty(
            SETTINGS.repetition_penalty, [ids + list(prefix)], logits.shape[-1], logits.device
        )(logits)
        logits = penalize_tokens(logits, unsafe[None], UNSAFE_PENALTY)
        probs = warp_logits(logits, SETTINGS.temperature, SETTINGS.top_k, SETTINGS.top_p).softmax(
            -1
        )[0]
        for token in probs.nonzero().flatten().tolist():
            expand((*prefix, token), mass * probs[token].item())

    expand((), 1.0)
    return exact


def _sampled_distribution(lm: CausalLM, ids: list[int], unsafe: torch.Tensor, length: int) -> dict:
    state = lm.prefill([ids])
    lm.fan_out(state, SAMPLES)
    block = lm.sample_block(
        state,
        _request(
            SAMPLES,
            length + 1,
            [11],
            histories=[ids] * SAMPLES,
            unsafe_mask=unsafe[None].expand(SAMPLES, -1),
            unsafe_penalty=UNSAFE_PENALTY,
        ),
    )
    counts: dict[tuple[int, ...], float] = {}
    for row in block.tokens[:, :length].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts


def _chi_square_p_value(exact: dict, counts: dict) -> float:
    """p-value of the counts under the exact distribution (cells the exact distribution
    gives no mass make it 0)."""
    if any(cell not in exact for cell in counts):
        return 0.0
    cells = sorted(exact)
    observed = [counts.get(cell, 0) for cell in cells]
    total = sum(exact.values())
    expected = [exact[cell] / total * SAMPLES for cell in cells]
    return float(stats.chisquare(observed, expected).pvalue)


def _total_variation(exact: dict, counts: dict) -> float:
    cells = set(exact) | set(counts)
    return 0.5 * sum(abs(exact.get(c, 0.0) - counts.get(c, 0) / SAMPLES) for c in cells)


@pytest.fixture(scope="module")
def exact_setting(base, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPT).input_ids
    unsafe = torch.zeros(base.vocab_size, dtype=torch.bool)
    with torch.inference_mode():
        first = base.model(torch.tensor([ids])).logits[0, -1].argmax().item()
    unsafe[first] = True  # the likeliest first token loses UNSAFE_PENALTY
    return ids, unsafe, _exact_distribution(base, ids, unsafe, 3)


def test_candidates_follow_the_base_models_distribution(lm, exact_setting) -> None:
    ids, unsafe, exact = exact_setting
    counts = _sampled_distribution(lm, ids, unsafe, 3)
    assert _chi_square_p_value(exact, counts) > 1e-3
    assert _total_variation(exact, counts) < 0.06


def test_the_draft_models_own_distribution_is_far_from_it(draft, exact_setting) -> None:
    """The check has power: the draft model's own samples fail it (total variation
    about 0.98 here)."""
    ids, unsafe, exact = exact_setting
    counts = _sampled_distribution(draft, ids, unsafe, 3)
    assert _chi_square_p_value(exact, counts) < 1e-6
    assert _total_variation(exact, counts) > 0.2


@pytest.mark.parametrize(
    ("name", "wrong"),
    [
        ("accept_probability", lambda p, q: torch.ones_like(p)),  # keep every draft: q's samples
        ("residual_distribution", lambda p, q: p),  # on rejection, resample from p itself
    ],
)
def test_a_wrong_verification_fails_the_check(lm, exact_setting, monkeypatch, name, wrong) -> None:
    """Keeping every draft (total variation about 0.87 here) or resampling rejections
    from p instead of the residual (about 0.19) fails where the exact rule passes
    (about 0.02, p-value about 0.7)."""
    ids, unsafe, exact = exact_setting
    monkeypatch.setattr(speculative, name, wrong)
    counts = _sampled_distribution(lm, ids, unsafe, 3)
    assert _chi_square_p_value(exact, counts) < 1e-6


# ------------------------------------------------------------------ the backend seam
def test_greedy_blocks_match_the_base_model_and_the_state_stays_in_step(
    lm, base, tiny_tokenizer
) -> None:
    ids = tiny_tokenizer(PROMPT).input_ids
    greedy = SamplingSettings(0.0, 0, 1.0, 0.0, 1.0)
    spec_state, base_state = lm.prefill([ids]), base.prefill([ids])
    lm.fan_out(spec_state, 3)
    base.fan_out(base_state, 3)
    for _ in range(3):  # later blocks read caches with rejected drafts as holes
        spec = lm.sample_block(spec_state, _request(3, 7, [0], sampling=greedy))
        plain = base.sample_block(base_state, _request(3, 7, [0], sampling=greedy))
        assert torch.equal(spec.tokens, plain.tokens)
        torch.testing.assert_close(spec.logprob, plain.logprob, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(spec_state.logits, base_state.logits, rtol=1e-4, atol=1e-4)
    assert spec_state.draft.attention_mask.shape == spec_state.attention_mask.shape


def test_state_after_sampled_blocks_is_the_base_models_on_the_same_text(
    lm, base, tiny_tokenizer
) -> None:
    ids = tiny_tokenizer(PROMPT).input_ids
    state = lm.prefill([ids])
    lm.fan_out(state, 4)
    blocks = [lm.sample_block(state, _request(4, 6, [5])).tokens for _ in range(2)]
    tokens = torch.cat(blocks, dim=1)
    for row in range(4):
        text = ids + [t for t in tokens[row].tolist() if t >= 0]
        fresh = base.prefill([text])
        torch.testing.assert_close(state.logits[row], fresh.logits[0], rtol=1e-4, atol=1e-4)
        assert int(state.next_position[row]) == len(text)


def test_a_prompts_tokens_do_not_depend_on_its_batch(lm, tiny_tokenizer) -> None:
    ids, other = (
        tiny_tokenizer(PROMPT).input_ids,
        tiny_tokenizer("A kind dog ran home today").input_ids,
    )
    alone = lm.prefill([ids])
    lm.fan_out(alone, 2)
    alone_block = lm.sample_block(alone, _request(2, 8, [3]))
    batched = lm.prefill([ids, other])
    lm.fan_out(batched, 2)
    batched_block = lm.sample_block(batched, _request(4, 8, [3, 9], group_sizes=[2, 2]))
    assert torch.equal(batched_block.tokens[:2], alone_block.tokens)


def test_replayed_rows_keep_their_block_and_rewind_resamples_alike(lm, tiny_tokenizer) -> None:
    ids = tiny_tokenizer(PROMPT).input_ids
    state = lm.prefill([ids])
    lm.fan_out(state, 4)
    checkpoint = lm.checkpoint(state, 6)
    first = lm.sample_block(state, _request(4, 6, [1]))
    checkpoint.rewind(state)
    again = lm.sample_block(state, _request(4, 6, [1]))
    assert torch.equal(first.tokens, again.tokens)
    checkpoint.rewind(state)
    resampled = lm.sample_block(
        state,
        _request(2, 6, [2], rows=torch.tensor([1, 3]), replay=first, group_sizes=[2]),
    )
    assert torch.equal(resampled.tokens[[0, 2]], first.tokens[[0, 2]])
    assert not torch.equal(resampled.tokens[[1, 3]], first.tokens[[1, 3]])


def test_limits_and_eos_end_rows(lm, tiny_tokenizer) -> None:
    ids = tiny_tokenizer(PROMPT).input_ids
    state = lm.prefill([ids])
    lm.fan_out(state, 3)
    eos = tiny_tokenizer.eos_token_id
    unsafe = torch.ones(3, lm.vocab_size, dtype=torch.bool)
    unsafe[:, eos] = False  # every token but EOS loses a huge penalty on row 2 only
    unsafe[:2] = False
    block = lm.sample_block(
        state,
        _request(3, 8, [4], limits=torch.tensor([8, 3, 8]), unsafe_mask=unsafe, unsafe_penalty=1e4),
    )
    assert (block.tokens[0] >= 0).all()
    assert (block.tokens[1, :3] >= 0).all() and (block.tokens[1, 3:] == -1).all()
    assert block.tokens[2, 0] == eos and (block.tokens[2, 1:] == -1).all()
    assert block.ended.tolist() == [False, False, True]


def test_cancelling_stops_within_a_round(lm, tiny_tokenizer) -> None:
    """The event set during the first round's drafting: that round's verification runs,
    no further forward does."""
    ids = tiny_tokenizer(PROMPT).input_ids
    state = lm.prefill([ids])
    cancel = threading.Event()
    calls = {"base": 0, "draft": 0}

    def count(owner):
        def hook(module, args, output):
            calls[owner] += 1
            cancel.set()

        return hook

    handles = [
        lm.model.register_forward_hook(count("base")),
        lm.draft.model.register_forward_hook(count("draft")),
    ]
    try:
        with pytest.raises(GenerationCancelledError):
            lm.sample_block(state, _request(1, 32, [0], cancel=cancel))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"base": 1, "draft": lm.draft_tokens + 1}


def test_grammar_and_mismatched_drafts_are_refused(lm, base, tiny_tokenizer) -> None:
    state = lm.prefill([tiny_tokenizer(PROMPT).input_ids])
    with pytest.raises(BackendCapabilityError, match="grammar"):
        lm.sample_block(state, _request(1, 4, [0], grammar=object()))
    other = build_tiny_tokenizer(vocab_size=600)
    stranger = CausalLM(build_tiny_llama(other, seed=1), other)
    with pytest.raises(DraftModelError, match="tokenizer"):
        SpeculativeCausalLM(base, stranger)
    with pytest.raises(DraftModelError, match="draft_tokens"):
        SpeculativeCausalLM(base, lm.draft, draft_tokens=0)


def test_the_guard_keeps_its_budget_with_speculative_candidates(
    lm, keyword_cost, small_config
) -> None:
    guard = InferenceGuard(lm, cost=keyword_cost, config=small_config)
    results = [guard.generate(PROMPT, seed=seed) for seed in range(8)]
    costs = keyword_cost([PROMPT] * len(results), [r.text for r in results])
    assert (costs <= guard.config.budget).all()
    assert all(r.safe and not r.refused and r.token_ids for r in results)


# ------------------------------------------------------------------------------ CLI
def generate_argv(model_dir: Path, draft_model: str, avoided: list[str], *extra: str) -> list[str]:
    """`safeguard generate` with `draft_model`, avoiding `avoided`, printing JSON."""
    return [
        "generate",
        "--model",
        str(model_dir),
        "--draft-model",
        draft_model,
        *extra,
        "--cost-keywords",
        ",".join(avoided),
        "--max-new-tokens",
        "16",
        "--seed",
        "0",
        "--json",
        "--prompt",
        "The safe cat",
    ]


def test_cli_generates_with_a_draft_model(
    tiny_model_dir, frequent_words, tiny_tokenizer, tmp_path, capsys
) -> None:
    draft_dir = tmp_path / "draft"
    build_tiny_llama(tiny_tokenizer, seed=5, hidden_size=32, num_layers=1).save_pretrained(
        draft_dir
    )
    tiny_tokenizer.save_pretrained(draft_dir)
    assert (
        main(generate_argv(tiny_model_dir, str(draft_dir), frequent_words, "--draft-tokens", "3"))
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert record["safe"] and record["cost"] <= 0 and record["text"]


def test_cli_refuses_a_draft_model_with_another_tokenizer(tiny_model_dir, tmp_path, capsys) -> None:
    other = build_tiny_tokenizer(vocab_size=600)
    draft_dir = tmp_path / "draft"
    build_tiny_llama(other, seed=5, hidden_size=32, num_layers=1).save_pretrained(draft_dir)
    other.save_pretrained(draft_dir)
    assert main(generate_argv(tiny_model_dir, str(draft_dir), ["x"])) == 2
    assert "tokenizer" in capsys.readouterr().err


# ------------------------------------------------------------------- self-drafts
def _mean_total_variation(first: CausalLM, second: CausalLM, ids: list[int]) -> float:
    """Mean total variation between the two models' next-token distributions at every
    position of `ids` (temperature 1, no warping)."""
    with torch.inference_mode():
        p = first.model(torch.tensor([ids])).logits[0].float().softmax(-1)
        q = second.model(torch.tensor([ids])).logits[0].float().softmax(-1)
    return float(0.5 * (p - q).abs().sum(-1).mean())


INT4_KERNELS = pytest.mark.skipif(
    bool(missing_kernels("int4")), reason="this torch has no int4 CPU kernels (torch >= 2.6)"
)


@pytest.mark.parametrize(
    ("kind", "bound"),
    [("bf16", 0.02), ("int8", 0.03), pytest.param("int4", 0.3, marks=INT4_KERNELS)],
)
def test_a_self_draft_predicts_nearly_what_the_base_model_does(
    base, draft, tiny_tokenizer, kind, bound
) -> None:
    """The self-draft's next-token distributions lie within `bound` of the base model's
    (total variation), far closer than the perturbed one-layer draft's."""
    ids = tiny_tokenizer("The safe cat sat on the warm mat and looked at the door").input_ids
    before = {name: value.clone() for name, value in base.model.state_dict().items()}
    self_draft = quantized_draft(base, kind)
    distance = _mean_total_variation(base, self_draft, ids)
    assert 0 < distance < bound < _mean_total_variation(base, draft, ids)
    assert self_draft.tokenizer is base.tokenizer
    after = base.model.state_dict()
    assert all(torch.equal(value, after[name]) for name, value in before.items())


def test_candidates_with_a_quantized_self_draft_follow_the_base_model(base, exact_setting) -> None:
    lm = SpeculativeCausalLM(base, quantized_draft(base, "int8"), draft_tokens=3)
    ids, unsafe, exact = exact_setting
    counts = _sampled_distribution(lm, ids, unsafe, 3)
    assert _chi_square_p_value(exact, counts) > 1e-3
    assert _total_variation(exact, counts) < 0.06
    assert lm.stats.acceptance_rate > 0.3  # the flat tiny model under top-k 3: about 0.45


def test_bad_self_drafts_are_refused(base, tiny_tokenizer) -> None:
    with pytest.raises(DraftModelError, match="self:int8"):
        quantized_draft(base, "int3")
    with pytest.raises(DraftModelError, match="self:bf16"):
        speculative.with_draft_model(base, "self:fp8")
    if not missing_kernels("int4"):
        narrow = CausalLM(build_tiny_llama(tiny_tokenizer, hidden_size=40), tiny_tokenizer)
        with pytest.raises(DraftModelError, match="multiple of 32"):
            quantized_draft(narrow, "int4")
    half = CausalLM(build_tiny_llama(tiny_tokenizer, hidden_size=32).bfloat16(), tiny_tokenizer)
    with pytest.raises(DraftModelError, match="already in bfloat16"):
        quantized_draft(half, "self:bf16")
    with pytest.raises(DraftModelError, match="Hugging Face backend"):
        quantized_draft(object(), "int8")  # type: ignore[arg-type]


def test_from_pretrained_drafts_with_the_base_model_itself(
    tiny_model_dir, keyword_cost, small_config
) -> None:
    guard = InferenceGuard.from_pretrained(
        str(tiny_model_dir), draft_model="self:int8", cost=keyword_cost, config=small_config
    )
    assert isinstance(guard.lm, SpeculativeCausalLM)
    result = guard.generate(PROMPT, seed=0)
    assert result.safe and result.token_ids
    assert keyword_cost([PROMPT], [result.text]).item() <= guard.config.budget
    assert guard.lm.stats.drafted > 0


def test_a_self_draft_without_its_kernels_is_refused(base, monkeypatch) -> None:
    monkeypatch.setitem(KERNELS, "int4", ("_no_such_int4_kernel",))
    with pytest.raises(DraftModelError, match=r"_no_such_int4_kernel.*self:int8 or self:bf16"):
        quantized_draft(base, "self:int4")


@pytest.mark.parametrize(
    ("draft_model", "status"),
    [pytest.param("self:int4", 0, marks=INT4_KERNELS), ("self:int8", 0), ("self:fp8", 2)],
)
def test_cli_drafts_with_the_base_model_itself(
    tiny_model_dir, frequent_words, capsys, draft_model, status
) -> None:
    assert main(generate_argv(tiny_model_dir, draft_model, frequent_words)) == status
    captured = capsys.readouterr()
    if status:
        assert "self:int8" in captured.err
    else:
        record = json.loads(captured.out)
        assert record["safe"] and record["cost"] <= 0 and record["text"]
