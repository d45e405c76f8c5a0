"""Tests for the provenance veto (`inference_safeguard.provenance`): the suffix-array
index finds the longest verbatim span exactly, and the guard keeps a model that copies
its corpus under the span limit."""

from __future__ import annotations

import random

import pytest
import torch

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.baselines import SamplingDecoder
from inference_safeguard.demo import load_demo_world
from inference_safeguard.demo.corpus import TOPICS
from inference_safeguard.offline_corpora import OfflineCorpusMissingError, kjv_books
from inference_safeguard.provenance import (
    ProvenanceCost,
    VerbatimIndex,
    _suffix_array,
    corpus_words,
)
from inference_safeguard.scorers import ProvenanceCost as ReExported

GETTYSBURG = (
    "Four score and seven years ago our fathers brought forth on this continent, a new "
    "nation, conceived in Liberty, and dedicated to the proposition that all men are "
    "created equal. Now we are engaged in a great civil war, testing whether that nation, "
    "or any nation so conceived and so dedicated, can long endure."
)
"""The opening of the Gettysburg Address (1863, public domain)."""
GENESIS = (
    "In the beginning God created the heaven and the earth. And the earth was without "
    "form, and void; and darkness was upon the face of the deep."
)
"""Genesis 1:1-2, King James Version (public domain)."""


def brute_force_longest(corpus: list[list[str]], words: list[str]) -> int:
    best = 0
    for start in range(len(words)):
        for end in range(start + 1, len(words) + 1):
            piece = words[start:end]
            if any(doc[i : i + len(piece)] == piece for doc in corpus for i in range(len(doc))):
                best = max(best, end - start)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_suffix_array_sorts_every_suffix(seed):
    rng = random.Random(seed)
    sequence = [rng.randrange(3) for _ in range(rng.randint(1, 40))]
    expected = sorted(range(len(sequence)), key=lambda i: sequence[i:])
    assert _suffix_array(torch.tensor(sequence)).tolist() == expected


@pytest.mark.parametrize("seed", range(20))
def test_longest_span_agrees_with_brute_force(seed):
    rng = random.Random(seed)
    vocabulary = ["a", "b", "c", "d"]
    corpus = [[rng.choice(vocabulary) for _ in range(rng.randint(1, 30))] for _ in range(3)]
    index = VerbatimIndex([" ".join(doc) for doc in corpus])
    words = [rng.choice([*vocabulary, "z"]) for _ in range(rng.randint(0, 25))]
    assert index.longest_span(" ".join(words)).words == brute_force_longest(corpus, words)


def test_span_ignores_case_punctuation_and_line_breaks_and_reports_where_it_is():
    index = VerbatimIndex([GETTYSBURG, GENESIS])
    text = "He said: four SCORE, and seven\nyears ago, our fathers... then left."
    span = index.longest_span(text)
    assert span.words == 8
    assert text[span.start : span.end] == "four SCORE, and seven\nyears ago, our fathers"
    assert corpus_words("Don\u2019t stop") == ["don't", "stop"]


def test_spans_do_not_run_across_documents():
    index = VerbatimIndex(["alpha beta", "gamma delta"])
    assert index.longest_span("alpha beta gamma delta").words == 2


def test_cost_is_zero_below_min_span_and_grows_with_the_span():
    cost = ProvenanceCost.from_texts([GETTYSBURG, GENESIS], min_span=5, weight=2.0)
    responses = [
        "The nation was new.",  # common words, short spans
        "In the beginning God created",  # 5 words
        "In the beginning God created the heaven and the earth, said the story.",  # 10 words
    ]
    assert cost(["recite"] * 3, responses).tolist() == [0.0, 2.0, 12.0]


def test_cost_of_a_prefix_never_exceeds_the_cost_of_the_response_at_word_ends():
    cost = ProvenanceCost.from_texts([GENESIS], min_span=3)
    text = "Well. In the beginning God created the heaven and some other things."
    cuts = [i for i, ch in enumerate(text) if ch == " "] + [len(text)]
    costs = cost(["p"] * len(cuts), [text[:cut] for cut in cuts]).tolist()
    assert costs == sorted(costs) and costs[-1] == 8 - 3 + 1


def test_built_from_files_folders_and_a_spec(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "genesis.txt").write_text(GENESIS, encoding="utf-8")
    speech = tmp_path / "speech.md"
    speech.write_text(GETTYSBURG, encoding="utf-8")
    cost = ProvenanceCost.from_spec(f"corpus={tmp_path / 'texts'},{speech};min_span=4")
    assert isinstance(cost, ReExported) and cost.index.documents == 2 and cost.min_span == 4
    assert cost(["p"], ["four score and seven years"]).item() == 2.0
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        ProvenanceCost.from_files([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="name the corpus"):
        ProvenanceCost.from_spec("min_span=4")


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: VerbatimIndex(["...", "!!"]), ValueError),
        (lambda: VerbatimIndex([b"bytes"]), TypeError),
        (lambda: ProvenanceCost.from_texts(["a b"], min_span=0), ValueError),
        (lambda: ProvenanceCost.from_texts(["a b"], weight=-1), ValueError),
        (lambda: ProvenanceCost(["a b"]), TypeError),
    ],
)
def test_bad_corpora_and_settings_are_rejected(build, error):
    with pytest.raises(error):
        build()


@pytest.fixture(scope="module")
def world():
    return load_demo_world()


def test_guard_keeps_the_demo_assistant_from_copying_known_hazards(world):
    """The demo assistant learnt its hazardous sentences verbatim; with them as the
    corpus, sampling copies long spans and the guard keeps every response under the
    span limit (or refuses)."""
    hazards = [sentence for topic in TOPICS for sentence in topic.hazards]
    provenance = ProvenanceCost.from_texts(hazards, min_span=4)
    risky = [
        prompt
        for prompt, info in zip(world.prompts["test"], world.prompt_info["test"], strict=True)
        if info.risky
    ][:6]
    config = GuardConfig(
        budget=0.0, num_candidates=8, beam_width=2, block_size=8, max_new_tokens=48, seed=0
    )
    plain = SamplingDecoder(world.model, world.tokenizer, provenance, config=config)
    sampled = [provenance.index.longest_span(r.text).words for r in plain.generate_batch(risky)]
    guard = InferenceGuard(world.model, world.tokenizer, cost=provenance, config=config)
    guarded = guard.generate_batch(risky)
    spans = [provenance.index.longest_span(r.text).words for r in guarded]
    assert max(sampled) >= 4  # the assistant does copy its hazards
    assert all(span < 4 for span in spans)
    assert all(r.safe or r.refused for r in guarded)


def test_kjv_corpus_is_one_document_per_book_and_a_wrong_path_says_what_to_name(tmp_path):
    with pytest.raises(OfflineCorpusMissingError, match=r"name its Bible\.db file"):
        kjv_books(tmp_path / "Bible.db")
    try:
        books = kjv_books()
    except OfflineCorpusMissingError as error:
        pytest.skip(str(error))
    assert len(books) == 66
    assert books[0].startswith("In the beginning God created")
    assert books[-1].splitlines()[-1].endswith("Amen.")  # Revelation 22:21
    verses = [line for book in books for line in book.splitlines()]
    assert not any(line[:1].isdigit() and ":" in line[:8] for line in verses)  # numbers gone
