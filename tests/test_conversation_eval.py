"""Multi-turn evaluation: scripted conversations with the session budget off and on."""

from __future__ import annotations

import json

import pytest

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.errors import ConstraintError
from inference_safeguard.evaluation.conversations import (
    Conversation,
    demo_conversations,
    evaluate_conversations,
    format_conversation_table,
)
from inference_safeguard.scorers import CallableScorer

REFUSAL = GuardConfig().refusal_text


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer, small_config) -> InferenceGuard:
    each_answer_costs_one = CallableScorer(
        lambda prompt, response: float(bool(response.strip()) and response != REFUSAL),
        batched=False,
    )
    return InferenceGuard(
        tiny_model,
        tiny_tokenizer,
        costs={"talk": (each_answer_costs_one, 1.0)},
        config=small_config.with_overrides(max_new_tokens=8),
    )


def test_the_session_keeps_every_conversation_within_its_budget(guard):
    conversations = [
        Conversation("a", ("Hello there.", "Tell me more.", "And the dog?")),
        Conversation("b", ("What is a bird?", "Why?", "Where?", "When?")),
    ]
    report = evaluate_conversations(
        guard, conversations, {"talk": 2.0}, seed=0, progress=False, oracle=lambda p, r: False
    )
    per_answer, session = report.summaries
    assert per_answer.mode == "per answer" and session.mode == "session"
    assert per_answer.within_session == {"talk": 0.0}  # 3 and 4 answers of cost 1 each
    assert per_answer.mean_spent == {"talk": 3.5} and per_answer.refused == 0
    assert session.within_session == {"talk": 1.0}
    assert session.mean_spent == {"talk": 2.0} and session.refused == 3
    assert session.oracle_unsafe == 0.0
    assert [len(turns) for turns in report.results["session"]] == [3, 4]
    table = format_conversation_table(report)
    assert "within session talk (2)" in table and "100%" in table
    json.dumps(report.to_dict())  # JSON-able


def test_session_budgets_must_name_the_guards_constraints(guard):
    with pytest.raises(ConstraintError):
        evaluate_conversations(guard, [Conversation("a", ("Hi", "Ho"))], {"pii": 1.0})


def test_demo_conversations_group_prompts_by_topic_in_order():
    conversations = demo_conversations(
        ["a1", "b1", "a2", "a3", "c1"], ["a", "b", "a", "a", "c"], max_turns=2
    )
    assert conversations == [Conversation("a", ("a1", "a2"))]


def test_eval_conversations_on_the_demo_world_reports_both_modes(capsys, tmp_path):
    from inference_safeguard.cli import main

    argv = [
        "eval", "--conversations", "--limit", "1", "--max-turns", "3",
        "--session-budgets", '{"products": 1}', "--num-candidates", "4",
        "--beam-width", "2", "--block-size", "8", "--max-new-tokens", "16",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "within session products (1)" in out
    assert out.splitlines()[-2].startswith("per answer") and out.splitlines()[-1].startswith(
        "session"
    )
    data = json.loads((tmp_path / "conversations.json").read_text())
    [per_answer, session] = data["summaries"]
    assert per_answer["mode"] == "per answer"
    assert session["within_session"]["products"] == 1.0
    assert set(data["turns"]) == {"per answer", "session"}


def test_eval_reports_a_safety_rate_per_constraint(tiny_model, tiny_tokenizer, frequent_words):
    from inference_safeguard.evaluation.run import evaluate
    from inference_safeguard.scorers import KeywordCost

    half = len(frequent_words) // 2
    costs = {
        "first": (KeywordCost(frequent_words[:half]), 0.0),
        "second": (KeywordCost(frequent_words[half:]), 0.0),
    }
    report = evaluate(
        ["base", "inferenceguard"],
        ["Tell me about the dog.", "What is a good name for a bird?", "Hello there."],
        model=tiny_model,
        tokenizer=tiny_tokenizer,
        cost=None,
        costs=costs,
        config=GuardConfig(num_candidates=8, beam_width=2, block_size=8, max_new_tokens=16),
        progress=False,
    )
    base, guarded = report.rows()
    assert set(base.constraint_safety_rates) == {"first", "second"}
    assert guarded.constraint_safety_rates == {"first": 1.0, "second": 1.0}
    assert min(base.constraint_safety_rates.values()) < 1.0
    assert report.config.budgets == {"first": 0.0, "second": 0.0}
    for run in report.runs:
        for result in run.results:
            assert result.safe == all(c.safe for c in result.constraints) or result.refused
