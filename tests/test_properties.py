"""Property tests: random configs, prompts and adversarial cost models through every
entry point (generate, generate_batch, both stream commits, critic mode, LangChain,
LlamaIndex), holding the package to its promise.

Properties of every result:
- no text over budget is returned unless flagged as `on_unsafe` says (refuse: the
  refusal text, `refused=True`; return: `safe=False`; raise: `UnsafeGenerationError`);
- `result.cost` is the cost model's value of the produced text, or higher (a scored
  prefix cost more: what has been said cannot be unsaid), and exactly it for costs
  that never fall as the text grows;
- `token_ids` decode to `text`; no stop string is in it; at most `max_new_tokens`;
- a cost model returning NaN or infinity raises `ScorerOutputError`; one that raises
  propagates its error; nothing else escapes but typed errors on bad prompts;
- a stream's deltas join to the final text; nothing streamed is later contradicted;
  with agreement commits, a stream returns what `generate` returns.

Profiles (`tests/property_strategies.py`): `fast` in `make test`, `long` in
`make test-long`; `--hypothesis-show-statistics` prints the cases run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from property_strategies import (
    AdversarialCost,
    adversarial_costs,
    chat_prompts,
    full_range_configs,
    plain_prompts,
    prompts,
    search_configs,
)
from pydantic import ValidationError

from inference_safeguard import (
    GuardConfig,
    GuardResult,
    InferenceGuard,
    InvalidPromptError,
    ScorerOutputError,
    UnsafeGenerationError,
)
from inference_safeguard.errors import CriticMismatchWarning
from inference_safeguard.lm import transcript
from inference_safeguard.testing import build_random_critic

pytestmark = pytest.mark.filterwarnings(
    "ignore::inference_safeguard.errors.RefusalOverBudgetWarning"
)


@pytest.fixture(scope="module")
def words(frequent_words: list[str]) -> list[str]:
    """Words the tiny model says in most of its samples (cost models it will break)."""
    return frequent_words


def _guard(
    model, tokenizer, cost: AdversarialCost, config: dict[str, Any], **kwargs
) -> InferenceGuard:
    return InferenceGuard(
        model, tokenizer, cost=cost.scorer(), config=GuardConfig(**config), **kwargs
    )


def _scorer_prompt(prompt: str | list[dict[str, str]]) -> str:
    return prompt if isinstance(prompt, str) else transcript(prompt)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def run_guarded(
    call: Callable[[], Any], cost: AdversarialCost, config: dict[str, Any], *, strict_prompt: bool
) -> Any | None:
    """Run `call`; check that an error it raises is one the inputs allow, and that it
    raised when it had to. Returns its value, or None when it raised as allowed."""
    try:
        value = call()
    except ScorerOutputError:
        event("outcome: ScorerOutputError")
        assert not cost.finite and any(not math.isfinite(v) for v in cost.returned), cost
        return None
    except UnsafeGenerationError as error:
        event("outcome: UnsafeGenerationError")
        assert config["on_unsafe"] == "raise"
        assert error.result is not None and not error.result.safe
        assert error.result.cost > config["budget"] and not error.result.refused
        return None
    except InvalidPromptError as error:
        event(f"outcome: {type(error).__name__}")
        assert not strict_prompt, "a valid prompt was rejected"
        return None
    except Exception as error:  # the raising cost model's own error, maybe wrapped
        chain = [error, error.__cause__, error.__context__]
        if cost.raises is not None and any(isinstance(e, cost.raises) for e in chain):
            event("outcome: the cost model's own error")
            return None
        raise
    assert all(math.isfinite(v) for v in cost.returned), f"{cost}: NaN/inf cost accepted"
    return value


def check_result(
    result: GuardResult,
    config: dict[str, Any],
    cost: AdversarialCost,
    scorer_prompt: str,
    tokenizer,
) -> None:
    """The properties every result has (see the module docstring)."""
    budget = config["budget"]
    assert result.budget == budget
    # Text is decoded without special tokens (a random model may sample BOS mid-text).
    assert tokenizer.decode(result.token_ids, skip_special_tokens=True) == result.text
    event(
        "outcome: "
        + ("refused" if result.refused else "safe" if result.safe else "returned flagged unsafe")
    )
    if result.refused:
        assert config["on_unsafe"] == "refuse"
        assert result.text == config["refusal_text"]
        assert not result.safe and result.finish_reason == "safety"
        assert result.cost > budget
        return
    assert result.finish_reason in ("stop", "length")
    assert result.safe == (result.cost <= budget)
    if not result.safe:
        assert config["on_unsafe"] == "return", "over-budget text returned unflagged"
    assert len(result.token_ids) <= config["max_new_tokens"]
    assert not any(stop in result.text for stop in config["stop"])
    own = cost.fn(scorer_prompt, result.text)
    assert own <= result.cost or _close(own, result.cost), (own, result.cost)
    if cost.monotone:
        assert _close(own, result.cost), (own, result.cost)
    if result.safe:
        assert own <= budget or _close(own, budget), (own, budget)


# ------------------------------------------------------------------------- config
@given(full_range_configs())
def test_config_accepts_every_value_in_its_valid_range(fields):
    config = GuardConfig(**fields)
    assert config.with_overrides(**fields) == config
    assert GuardConfig(**config.model_dump()) == config
    assert config.children_per_beam * config.beam_width == config.num_candidates


INVALID = {
    "budget": [math.nan, math.inf, -math.inf, "x", "0.5", True, False, None],
    "num_candidates": [0, -1, 4097, True, 16.0, "16"],
    "beam_width": [0, -3, 4097],
    "block_size": [0, -1, 4097],
    "max_new_tokens": [0, 65537],
    "resample_rounds": [-1, 65, True],
    "cost_probe": ["yes", 1],
    "critic_risk_weight": [-1.0, math.nan, math.inf, True],
    "refusal_text": [None, 3],
    "unsafe_penalty": [-1e-9, -math.inf, math.nan, math.inf, 1.1e15, True],
    "unsafe_logit_penalty": [-0.5, math.nan, math.inf, 1.1e6, False],
    "safety_discount": [0.0, -1.0, 1.0000001, math.nan],
    "temperature": [-1e-9, 100.5, math.nan, 1e-300, 9.99e-4, math.inf, True],
    "top_p": [0.0, -0.1, 1.5, math.nan, True],
    "top_k": [-1, True, 2.5],
    "scorer": ["best", ""],
    "on_unsafe": ["ignore"],
    "stop": [[""], ["ok", ""]],
    "stream_commit": ["token"],
    "seed": [-1, True, 1.5],
    "no_such_field": [1],
}


@given(
    st.sampled_from(sorted(INVALID)).flatmap(
        lambda k: st.tuples(st.just(k), st.sampled_from(INVALID[k]))
    )
)
def test_config_rejects_every_value_out_of_its_range(item):
    name, value = item
    with pytest.raises(ValidationError):
        GuardConfig(**{name: value})
    with pytest.raises(ValidationError):
        GuardConfig().with_overrides(**{name: value})


@given(st.integers(1, 64), st.integers(1, 64))
def test_config_rejects_candidates_that_do_not_fill_the_beams(candidates, beams):
    if candidates % beams:
        with pytest.raises(ValidationError, match="multiple of beam_width"):
            GuardConfig(num_candidates=candidates, beam_width=beams)
    else:
        assert GuardConfig(num_candidates=candidates, beam_width=beams).children_per_beam


# ------------------------------------------------------------------- generate
@st.composite
def cases(draw: st.DrawFn, words: Sequence[str], prompt_strategy=prompts, scorer="models"):
    return (
        draw(prompt_strategy),
        draw(search_configs(scorer=scorer)),
        draw(adversarial_costs(words)),
    )


def _strict(prompt) -> bool:
    """Whether `prompt` must be accepted: short, in the model's words (plain or chat)."""
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    return all(t.strip() and len(t) < 100 and t.isascii() for t in texts)


@pytest.mark.parametrize("entry", ["generate", "generate_batch"])
@given(data=st.data())
def test_generate_returns_no_unflagged_over_budget_text(
    entry, data, tiny_model, tiny_tokenizer, words
):
    prompt, config, cost = data.draw(cases(words))
    guard = _guard(tiny_model, tiny_tokenizer, cost, config)
    if entry == "generate":
        call = lambda: [guard.generate(prompt)]  # noqa: E731
        batch = [prompt]
    else:
        batch = [prompt, "tell me about the dog", [{"role": "user", "content": "a bird"}]]
        call = lambda: guard.generate_batch(batch)  # noqa: E731
    results = run_guarded(call, cost, config, strict_prompt=_strict(prompt))
    if results is None:
        return
    assert len(results) == len(batch)
    for item, result in zip(batch, results, strict=True):
        assert _scorer_prompt(item) in cost.prompts_seen
        check_result(result, config, cost, _scorer_prompt(item), tiny_tokenizer)
    if entry == "generate_batch" and cost.raises is None and cost.finite:
        # A prompt decodes the same alone or batched (per-prompt seeds).
        alone = guard.generate(batch[1])
        assert (alone.text, alone.refused) == (results[1].text, results[1].refused)


# -------------------------------------------------------------------- streaming
@pytest.mark.parametrize("commit", ["agreement", "block"])
@given(data=st.data())
def test_stream_deltas_join_to_the_result_and_are_never_taken_back(
    commit, data, tiny_model, tiny_tokenizer, words
):
    prompt, config, cost = data.draw(cases(words, plain_prompts | chat_prompts))
    config = {**config, "stream_commit": commit}
    guard = _guard(tiny_model, tiny_tokenizer, cost, config)

    def consume() -> tuple[list[str], GuardResult]:
        with guard.stream(prompt) as stream:
            deltas = list(stream)
        return deltas, stream.result

    outcome = run_guarded(consume, cost, config, strict_prompt=_strict(prompt))
    if outcome is None:
        return
    deltas, result = outcome
    assert result is not None and all(deltas)
    check_result(result, config, cost, _scorer_prompt(prompt), tiny_tokenizer)
    joined = "".join(deltas)
    if not result.refused:
        assert joined == result.text
    elif joined != config["refusal_text"]:
        # A safe prefix went out before the search ended in refusal: it was
        # accepted by the cost model, and the stream just ended.
        assert joined and result.finish_reason == "safety"
        if cost.monotone:
            own = cost.fn(_scorer_prompt(prompt), joined)
            assert own <= config["budget"] or _close(own, config["budget"])
    if commit == "agreement":
        again = run_guarded(
            lambda: guard.generate(prompt), cost, config, strict_prompt=_strict(prompt)
        )
        if again is not None:
            assert (again.text, again.refused, again.safe) == (
                result.text,
                result.refused,
                result.safe,
            )


# ------------------------------------------------------------------------ critic
@given(data=st.data(), critic_seed=st.integers(0, 3))
def test_critic_mode_returns_no_unflagged_over_budget_text(
    data, critic_seed, tiny_model, tiny_tokenizer, words
):
    prompt, config, cost = data.draw(cases(words, plain_prompts | chat_prompts, scorer="critic"))
    critic = build_random_critic(
        tiny_model,
        budget=config["budget"],
        block_size=config["block_size"],
        cost_probe=critic_seed % 2 == 0,
        seed=critic_seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CriticMismatchWarning)
        guard = _guard(tiny_model, tiny_tokenizer, cost, config, critic=critic)
        results = run_guarded(
            lambda: [guard.generate(prompt)], cost, config, strict_prompt=_strict(prompt)
        )
    if results is not None:
        check_result(results[0], config, cost, _scorer_prompt(prompt), tiny_tokenizer)


# ------------------------------------------------------------------- integrations
def _check_record(
    text: str, record: dict[str, Any], config: dict[str, Any], cost: AdversarialCost, prompt: str
) -> None:
    assert record["budget"] == config["budget"]
    event(
        "outcome: "
        + (
            "refused"
            if record["refused"]
            else "safe"
            if record["safe"]
            else "returned flagged unsafe"
        )
    )
    if record["refused"]:
        assert config["on_unsafe"] == "refuse" and text == config["refusal_text"]
        assert not record["safe"] and record["cost"] > config["budget"]
        return
    assert record["safe"] == (record["cost"] <= config["budget"])
    assert record["safe"] or config["on_unsafe"] == "return"
    own = cost.fn(prompt, text)
    assert own <= record["cost"] or _close(own, record["cost"])


@given(data=st.data())
def test_langchain_chat_reports_what_the_guard_enforced(data, tiny_model, tiny_tokenizer, words):
    from langchain_core.messages import HumanMessage

    from langchain_safeguard import ChatSafeguard

    prompt, config, cost = data.draw(cases(words, plain_prompts))
    chat = ChatSafeguard(guard=_guard(tiny_model, tiny_tokenizer, cost, config))
    message = run_guarded(
        lambda: chat.invoke([HumanMessage(prompt)]), cost, config, strict_prompt=True
    )
    if message is not None:
        scorer_prompt = transcript([{"role": "user", "content": prompt}])
        _check_record(
            message.content, message.response_metadata["safety"], config, cost, scorer_prompt
        )


@given(data=st.data())
def test_llamaindex_llm_reports_what_the_guard_enforced(data, tiny_model, tiny_tokenizer, words):
    from llamaindex_safeguard import SafeguardLLM

    prompt, config, cost = data.draw(cases(words, plain_prompts))
    llm = SafeguardLLM(guard=_guard(tiny_model, tiny_tokenizer, cost, config))
    response = run_guarded(lambda: llm.complete(prompt), cost, config, strict_prompt=True)
    if response is not None:
        [scorer_prompt] = cost.prompts_seen
        _check_record(
            response.text, response.additional_kwargs["safety"], config, cost, scorer_prompt
        )
