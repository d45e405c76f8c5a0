"""Tests for the cost and reward scorers in `inference_safeguard.scorers` (tiny local
models, CPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from inference_safeguard.errors import ChatTemplateError, InvalidPromptError, ScorerOutputError
from inference_safeguard.scorers import (
    BEAVER_TEMPLATE,
    CallableScorer,
    ClassifierScorer,
    GuardModelCost,
    KeywordCost,
    RegexCost,
    Scorer,
)
from inference_safeguard.testing import (
    build_tiny_classifier,
    build_tiny_llama,
    build_tiny_tokenizer,
)

PROMPTS = [
    "user: hi there",
    "user: tell me a story about a dog and a cat",
    "user: how do I cook rice?",
    "user: what is the color of the sky",
    "user: say something",
    "user: help me write a letter to my friend",
    "user: go",
]
RESPONSES = [
    "yes",
    "the dog ran to the river and the cat sat under a green tree all day long",
    "",
    "blue, mostly",
    "no no no no",
    "Dear friend, I hope you are happy and warm this week.",
    "ok",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def classifier(tokenizer):
    return build_tiny_classifier(tokenizer, num_labels=2)


@pytest.fixture(scope="module")
def guard_lm(tokenizer):
    return build_tiny_llama(tokenizer)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, tokenizer, classifier, guard_lm):
    root = tmp_path_factory.mktemp("scorer_models")
    for name, model in (("classifier", classifier), ("guard", guard_lm)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def _one_by_one(scorer: Scorer, prompts: list[str], responses: list[str]) -> torch.Tensor:
    return torch.cat([scorer([p], [r]) for p, r in zip(prompts, responses, strict=True)])


class _FixedOutput(Scorer):
    def __init__(self, output: torch.Tensor) -> None:
        self.output = output

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self.output


# --- the Scorer contract ---------------------------------------------------------------


def test_mismatched_lengths_raise_invalid_prompt_error():
    with pytest.raises(InvalidPromptError, match="2 prompts and 1 responses"):
        KeywordCost(["cat"])(["a", "b"], ["cat"])


@pytest.mark.parametrize(
    ("prompts", "responses", "message"),
    [
        ("a prompt", ["a response"], "wrap a single item in a list"),
        (["a prompt"], "a response", "wrap a single item in a list"),
        ([{"role": "user", "content": "hi"}], ["ok"], r"prompts\[0\] is a dict"),
        (["a prompt"], [None], r"responses\[0\] is a NoneType"),
    ],
)
def test_non_text_arguments_are_rejected(prompts, responses, message):
    with pytest.raises(InvalidPromptError, match=message):
        KeywordCost(["cat"])(prompts, responses)


def test_empty_batch_returns_empty_float_tensor():
    scores = KeywordCost(["cat"])([], [])
    assert scores.shape == (0,)
    assert scores.dtype == torch.float64


def test_wrong_output_shape_raises_scorer_output_error_naming_the_scorer():
    with pytest.raises(ScorerOutputError, match=r"_FixedOutput .*shape \(2, 1\).*expected"):
        _FixedOutput(torch.zeros(2, 1))(["a", "b"], ["c", "d"])


def test_non_finite_output_raises_scorer_output_error_with_positions():
    with pytest.raises(ScorerOutputError, match=r"_FixedOutput .*non-finite.*\[1, 2\]"):
        _FixedOutput(torch.tensor([0.0, float("nan"), float("inf")]))(["a"] * 3, ["b"] * 3)


def test_output_is_converted_to_cpu_float64():
    scores = _FixedOutput(torch.tensor([1, 2], dtype=torch.int32))(["a", "b"], ["c", "d"])
    assert scores.dtype == torch.float64
    assert scores.device.type == "cpu"
    assert scores.tolist() == [1.0, 2.0]


def test_scores_keep_the_scorers_float64_values():
    values = [0.1, 0.1000000016, -2.5]
    scores = CallableScorer(lambda prompts, responses: values)(["p"] * 3, ["r"] * 3)
    assert scores.tolist() == values
    assert KeywordCost(["cat"], weight=0.1)(["p"], ["cat"]).tolist() == [0.1]


def test_scorers_do_not_modify_inputs_and_accept_tuples(tokenizer, classifier, guard_lm):
    scorers = [
        KeywordCost(["dog"]),
        RegexCost(r"no"),
        CallableScorer(lambda ps, rs: [len(r) for r in rs]),
        ClassifierScorer(classifier, tokenizer),
        GuardModelCost(guard_lm, tokenizer),
    ]
    prompts, responses = list(PROMPTS), list(RESPONSES)
    for scorer in scorers:
        from_lists = scorer(prompts, responses)
        from_tuples = scorer(tuple(prompts), tuple(responses))
        assert prompts == PROMPTS
        assert responses == RESPONSES
        torch.testing.assert_close(from_lists, from_tuples)


# --- KeywordCost -----------------------------------------------------------------------


def test_keyword_counts_whole_words_case_insensitively():
    cost = KeywordCost(["cat", "Dog"])
    scores = cost(
        ["p"] * 4,
        ["Cat, CAT and cat.", "concatenate catalog bobcat", "DOG! dogs dog-food", "nothing"],
    )
    assert scores.tolist() == [3.0, 0.0, 2.0, 0.0]


def test_keyword_weight_scales_the_count():
    assert KeywordCost(["cat"], weight=2.5)(["p"], ["a cat and a cat"]).tolist() == [5.0]


def test_keyword_phrase_matches_across_whitespace_and_wins_over_its_prefix():
    cost = KeywordCost(["ice", "ice cream"])
    scores = cost(["p"] * 3, ["Ice  Cream please", "ice and ice cream", "icecream"])
    assert scores.tolist() == [1.0, 2.0, 0.0]


def test_keyword_escapes_regex_characters():
    cost = KeywordCost(["c++", "a.b"])
    assert cost(["p"] * 2, ["I write C++ daily", "axb a.b"]).tolist() == [1.0, 1.0]


def test_keyword_reads_the_response_not_the_prompt():
    assert KeywordCost(["cat"])(["cat cat cat"], ["a dog"]).tolist() == [0.0]


@pytest.mark.parametrize("words", [[], ["cat", "  "], ""])
def test_keyword_rejects_empty_words_with_a_hint(words):
    with pytest.raises(ValueError, match="KeywordCost"):
        KeywordCost(words)


def test_keyword_rejects_negative_weight():
    with pytest.raises(ValueError, match=">= 0"):
        KeywordCost(["cat"], weight=-1.0)


# --- RegexCost -------------------------------------------------------------------------


def test_regex_mapping_weights_each_pattern():
    cost = RegexCost({r"\bkill\w*": 2.0, r"gun": 0.5})
    scores = cost(["p"] * 3, ["Kill, killing, skill", "gun gun", "nothing"])
    assert scores.tolist() == [4.0, 1.0, 0.0]


def test_regex_counts_non_overlapping_matches():
    assert RegexCost("aa")(["p"], ["aaaaa"]).tolist() == [2.0]


def test_regex_single_string_uses_flags_and_compiled_pattern_keeps_its_own():
    responses = ["Bad bad BAD"]
    assert RegexCost("bad", weight=3.0)(["p"], responses).tolist() == [9.0]
    assert RegexCost("bad", flags=0)(["p"], responses).tolist() == [1.0]
    assert RegexCost([re.compile("BAD"), "bAd"])(["p"], responses).tolist() == [4.0]


def test_regex_invalid_pattern_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"invalid regular expression '\(unclosed'"):
        RegexCost(["ok", "(unclosed"])


@pytest.mark.parametrize("patterns", ["", "x*", [], {"a": -1.0}])
def test_regex_rejects_useless_patterns_and_negative_weights(patterns):
    with pytest.raises(ValueError, match="RegexCost"):
        RegexCost(patterns)


# --- CallableScorer --------------------------------------------------------------------


@pytest.mark.parametrize("convert", [list, np.array, torch.tensor])
def test_callable_batched_accepts_sequences_arrays_and_tensors(convert):
    calls = []

    def lengths(prompts, responses):
        calls.append(len(responses))
        return convert([float(len(r)) for r in responses])

    scores = CallableScorer(lengths)(["p", "q"], ["abc", ""])
    assert scores.tolist() == [3.0, 0.0]
    assert calls == [2]


def test_callable_unbatched_is_called_per_pair():
    seen = []

    def score(prompt, response):
        seen.append((prompt, response))
        return len(prompt) - len(response)

    assert CallableScorer(score, batched=False)(["ab", "c"], ["a", "cde"]).tolist() == [1.0, -2.0]
    assert seen == [("ab", "a"), ("c", "cde")]


@pytest.mark.parametrize(
    ("fn", "batched", "message"),
    [
        (lambda ps, rs: [1.0], True, r"shape \(1,\).*expected shape \(2,\)"),
        (lambda ps, rs: [1.0, float("nan")], True, "non-finite"),
        (lambda ps, rs: ["high", "low"], True, "not a sequence of floats"),
        (lambda p, r: "high", False, "must return a float"),
        (lambda p, r: float("inf"), False, "non-finite"),
    ],
)
def test_callable_bad_output_raises_scorer_output_error(fn, batched, message):
    with pytest.raises(ScorerOutputError, match=message):
        CallableScorer(fn, batched=batched)(["p", "q"], ["a", "b"])


def test_callable_rejects_a_non_callable():
    with pytest.raises(TypeError, match="needs a callable"):
        CallableScorer(3.0)


# --- ClassifierScorer ------------------------------------------------------------------


def test_classifier_returns_one_deterministic_score_per_pair(tokenizer, classifier):
    scorer = ClassifierScorer(classifier, tokenizer)
    first = scorer(PROMPTS, RESPONSES)
    assert first.shape == (len(PROMPTS),)
    assert first.dtype == torch.float64
    torch.testing.assert_close(scorer(PROMPTS, RESPONSES), first, rtol=0, atol=0)
    assert first.unique().numel() == len(PROMPTS)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_classifier_batch_equals_one_by_one(tokenizer, classifier, batch_size):
    scorer = ClassifierScorer(classifier, tokenizer, label=1, batch_size=batch_size)
    torch.testing.assert_close(
        scorer(PROMPTS, RESPONSES), _one_by_one(scorer, PROMPTS, RESPONSES), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("template", [None, BEAVER_TEMPLATE, "{prompt}\n\n{response}"])
def test_sharing_the_prompt_cache_gives_the_scores_of_whole_inputs(tokenizer, classifier, template):
    prompts = ["Tell me about the dog.", "How do I cook rice?"] * 4 + ["x", "y"]
    responses = [
        "", "The", "The dog is happy and the garden is green", "Boil water, add rice.",
        "a" * 60, " leading space", "end.", "cat", "q", "dog " * 300,
    ]  # fmt: skip
    shared = ClassifierScorer(classifier, tokenizer, template=template, max_length=128)
    whole = ClassifierScorer(
        classifier, tokenizer, template=template, max_length=128, share_prompt_cache=False
    )
    tokens = {}
    forward = classifier.forward
    for name, scorer in (("shared", shared), ("whole", whole)):
        shapes = []

        def counted(*args, shapes=shapes, **kwargs):
            shapes.append(kwargs["input_ids"].shape)
            return forward(*args, **kwargs)

        classifier.forward = counted
        try:
            scores = scorer(prompts, responses)
        finally:
            del classifier.forward
        tokens[name] = sum(rows * width for rows, width in shapes)
        if name == "shared":
            shared_scores = scores
    torch.testing.assert_close(shared_scores, whole(prompts, responses), rtol=0, atol=1e-4)
    # The prompts' tokens ran once per distinct prompt, not once per response.
    assert tokens["shared"] < 0.8 * tokens["whole"]


def test_classifier_loads_through_from_pretrained(saved_dir, tokenizer, classifier):
    loaded = ClassifierScorer.from_pretrained(saved_dir / "classifier", label=1)
    assert not loaded.model.training
    expected = ClassifierScorer(classifier, tokenizer, label=1)(PROMPTS, RESPONSES)
    torch.testing.assert_close(loaded(PROMPTS, RESPONSES), expected, rtol=0, atol=1e-5)


def test_classifier_probability_is_softmax_of_the_logits(tokenizer, classifier):
    logits = torch.stack(
        [ClassifierScorer(classifier, tokenizer, label=k)(PROMPTS, RESPONSES) for k in (0, 1)],
        dim=-1,
    )
    probability = ClassifierScorer(classifier, tokenizer, label=1, output="probability")
    scores = probability(PROMPTS, RESPONSES)
    assert ((scores >= 0) & (scores <= 1)).all()
    torch.testing.assert_close(scores, torch.softmax(logits, dim=-1)[:, 1], atol=1e-5, rtol=0)


def test_single_label_probability_is_the_sigmoid(tokenizer):
    model = build_tiny_classifier(tokenizer, num_labels=1)
    logit = ClassifierScorer(model, tokenizer)(PROMPTS, RESPONSES)
    probability = ClassifierScorer(model, tokenizer, output="probability")(PROMPTS, RESPONSES)
    torch.testing.assert_close(probability, torch.sigmoid(logit), atol=1e-6, rtol=0)


def test_classifier_default_format_is_the_chat_template(tokenizer, classifier):
    default = ClassifierScorer(classifier, tokenizer)(PROMPTS, RESPONSES)
    explicit = ClassifierScorer(
        classifier, tokenizer, template="<|user|>{prompt}</s><|assistant|>{response}</s>"
    )(PROMPTS, RESPONSES)
    torch.testing.assert_close(default, explicit, rtol=0, atol=1e-6)


def test_classifier_without_chat_template_uses_prompt_then_response(classifier):
    plain_tokenizer = build_tiny_tokenizer(chat_template=False)
    default = ClassifierScorer(classifier, plain_tokenizer)(PROMPTS, RESPONSES)
    explicit = ClassifierScorer(classifier, plain_tokenizer, template="{prompt}\n\n{response}")
    torch.testing.assert_close(default, explicit(PROMPTS, RESPONSES), rtol=0, atol=1e-6)


def test_classifier_template_changes_the_score(tokenizer, classifier):
    beaver = ClassifierScorer(classifier, tokenizer, template=BEAVER_TEMPLATE)(PROMPTS, RESPONSES)
    chat = ClassifierScorer(classifier, tokenizer)(PROMPTS, RESPONSES)
    response_only = ClassifierScorer(classifier, tokenizer, template="{response} !")
    assert not torch.allclose(beaver, chat)
    same_response = response_only(["user: a", "user: something else"], ["the dog", "the dog"])
    assert same_response[0] == same_response[1]


def test_classifier_truncates_from_the_left_keeping_the_end(tokenizer, classifier):
    ending = " and the cat sat under a green tree"
    responses = ["hello my good friend" + ending, "no" + ending]
    truncated = ClassifierScorer(classifier, tokenizer, template="{response}", max_length=8)
    full = ClassifierScorer(classifier, tokenizer, template="{response}")
    scores = truncated(["p", "q"], responses)
    assert scores[0] == scores[1]
    assert full(["p", "q"], responses).unique().numel() == 2


def test_classifier_falls_back_to_eos_padding_without_modifying_the_tokenizer():
    no_pad_tokenizer = build_tiny_tokenizer()
    model = build_tiny_classifier(no_pad_tokenizer, num_labels=2)
    no_pad_tokenizer.pad_token = None
    model.config.pad_token_id = None
    scorer = ClassifierScorer(model, no_pad_tokenizer)
    assert model.config.pad_token_id == no_pad_tokenizer.eos_token_id
    assert no_pad_tokenizer.pad_token is None
    torch.testing.assert_close(
        scorer(PROMPTS, RESPONSES), _one_by_one(scorer, PROMPTS, RESPONSES), rtol=0, atol=1e-4
    )


def test_classifier_rejects_an_input_that_renders_to_no_tokens(tokenizer, classifier):
    scorer = ClassifierScorer(classifier, tokenizer, template="{response}")
    with pytest.raises(InvalidPromptError, match="item 1 renders to no tokens"):
        scorer(["p", "q"], ["fine", ""])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label": 2}, r"label=2 is out of range .* \[0, 1\]"),
        ({"label": -1}, "out of range"),
        ({"output": "softmax"}, "output='logit' or 'probability'"),
        ({"batch_size": 0}, "positive int"),
        ({"max_length": 0}, "positive int"),
        ({"template": "{prompt} only"}, r"\{response\}"),
        ({"template": "{prompt} {response} {extra}"}, "extra"),
    ],
)
def test_classifier_rejects_bad_arguments(tokenizer, classifier, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierScorer(classifier, tokenizer, **kwargs)


# --- GuardModelCost --------------------------------------------------------------------


def _reference_p_unsafe(model, tokenizer, text: str, safe_id: int, unsafe_id: int) -> float:
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return torch.softmax(logits[[safe_id, unsafe_id]], dim=-1)[1].item()


def test_guard_cost_is_p_unsafe_renormalised_over_the_verdict_tokens(tokenizer, guard_lm):
    guard = GuardModelCost(guard_lm, tokenizer)
    safe_id = tokenizer.encode("safe", add_special_tokens=False)[0]
    unsafe_id = tokenizer.encode("unsafe", add_special_tokens=False)[0]
    assert guard.verdict_token_ids == (safe_id, unsafe_id)
    scores = guard(PROMPTS[:2], RESPONSES[:2])
    for index in range(2):
        text = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": PROMPTS[index]},
                {"role": "assistant", "content": RESPONSES[index]},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        expected = _reference_p_unsafe(guard_lm, tokenizer, text, safe_id, unsafe_id)
        assert scores[index].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("batch_size", [2, 8])
def test_guard_batch_equals_one_by_one_and_lies_in_unit_interval(tokenizer, guard_lm, batch_size):
    guard = GuardModelCost(guard_lm, tokenizer, batch_size=batch_size)
    scores = guard(PROMPTS, RESPONSES)
    assert scores.shape == (len(PROMPTS),)
    assert ((scores >= 0) & (scores <= 1)).all()
    torch.testing.assert_close(scores, _one_by_one(guard, PROMPTS, RESPONSES), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "template", [None, "Conversation: User: {prompt} Agent: {response} Verdict:"]
)
def test_guard_sharing_the_prompt_cache_gives_the_probabilities_of_whole_inputs(
    tokenizer, guard_lm, template
):
    prompts = ["Tell me about the dog.", "How do I cook rice?"] * 4 + ["x"]
    responses = [
        "", "The", "The dog is happy and the garden is green", "Boil water, add rice.",
        "a" * 60, " leading space", "end.", "cat", "q",
    ]  # fmt: skip
    shared = GuardModelCost(guard_lm, tokenizer, template=template, batch_size=4)
    whole = GuardModelCost(
        guard_lm, tokenizer, template=template, batch_size=4, share_prompt_cache=False
    )
    torch.testing.assert_close(
        shared(prompts, responses), whole(prompts, responses), rtol=0, atol=1e-5
    )


def test_guard_needs_a_chat_template_or_a_template(guard_lm):
    plain_tokenizer = build_tiny_tokenizer(chat_template=False)
    with pytest.raises(ChatTemplateError, match=r"template="):
        GuardModelCost(guard_lm, plain_tokenizer)
    template = "Conversation: User: {prompt} Agent: {response} Verdict:"
    guard = GuardModelCost(guard_lm, plain_tokenizer, template=template)
    scores = guard(PROMPTS, RESPONSES)
    safe_id, unsafe_id = guard.verdict_token_ids
    text = template.format(prompt=PROMPTS[1], response=RESPONSES[1])
    expected = _reference_p_unsafe(guard_lm, plain_tokenizer, text, safe_id, unsafe_id)
    assert scores[1].item() == pytest.approx(expected, abs=1e-5)


def test_guard_accepts_explicit_token_ids(tokenizer, guard_lm):
    by_word = GuardModelCost(guard_lm, tokenizer)
    safe_id, unsafe_id = by_word.verdict_token_ids
    by_id = GuardModelCost(guard_lm, tokenizer, safe_token=safe_id, unsafe_token=unsafe_id)
    torch.testing.assert_close(by_id(PROMPTS, RESPONSES), by_word(PROMPTS, RESPONSES))
    swapped = GuardModelCost(guard_lm, tokenizer, safe_token=unsafe_id, unsafe_token=safe_id)
    torch.testing.assert_close(
        swapped(PROMPTS, RESPONSES), 1 - by_word(PROMPTS, RESPONSES), rtol=0, atol=1e-5
    )


def test_guard_reads_after_the_shared_leading_tokens(tokenizer, guard_lm):
    # "unkind" and "unsafe" both start with the tokens "▁", "un".
    guard = GuardModelCost(guard_lm, tokenizer, safe_token="unkind", unsafe_token="unsafe")
    shared = tokenizer.encode("un", add_special_tokens=False)
    safe_id = tokenizer.encode("unkind", add_special_tokens=False)[len(shared)]
    unsafe_id = tokenizer.encode("unsafe", add_special_tokens=False)[len(shared)]
    assert guard.verdict_token_ids == (safe_id, unsafe_id)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": RESPONSES[0]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    expected = _reference_p_unsafe(guard_lm, tokenizer, text + "un", safe_id, unsafe_id)
    assert guard(PROMPTS[:1], RESPONSES[:1]).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"safe_token": "safe", "unsafe_token": "safe"}, "do not differ"),
        ({"safe_token": "un", "unsafe_token": "unsafe"}, "do not differ"),
        ({"unsafe_token": 10**6}, "not a token id"),
        ({"unsafe_token": ""}, "encodes to no tokens"),
        ({"batch_size": 0}, "positive int"),
    ],
)
def test_guard_rejects_bad_arguments(tokenizer, guard_lm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuardModelCost(guard_lm, tokenizer, **kwargs)


def test_guard_loads_through_from_pretrained(saved_dir, tokenizer, guard_lm):
    loaded = GuardModelCost.from_pretrained(saved_dir / "guard", batch_size=4)
    assert not loaded.model.training
    expected = GuardModelCost(guard_lm, tokenizer)(PROMPTS, RESPONSES)
    torch.testing.assert_close(loaded(PROMPTS, RESPONSES), expected, rtol=0, atol=1e-5)


def test_guard_truncation_keeps_the_end_of_a_long_conversation(tokenizer, guard_lm):
    # Same seed, so the same weights as `guard_lm`; only the context window differs.
    short_context = build_tiny_llama(tokenizer, max_position_embeddings=16)
    ending = " and the cat sat under a green tree by the river in the warm sun all day long"
    prompts = ["user: a", "user: something else entirely"]
    responses = ["hi" + ending, "no" + ending]
    truncated = GuardModelCost(short_context, tokenizer)(prompts, responses)
    full = GuardModelCost(guard_lm, tokenizer)(prompts, responses)
    assert truncated[0] == truncated[1]
    assert full[0] != full[1]
