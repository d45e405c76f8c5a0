"""The examples run offline and show what their docstrings promise."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from inference_safeguard.demo.corpus import HAZARD_PHRASES

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agent_example_calls_both_tools_and_refuses_the_forbidden_call(capsys):
    load("langchain_agent").main([])
    out = capsys.readouterr().out
    assert 'call    get_weather({"city": "Paris"})' in out
    assert 'call    celsius_to_fahrenheit({"celsius": 21.0})' in out
    assert "answer    It is sunny in Paris, 69.8 °F." in out
    assert 'get_weather({"city": "Area 51"})' not in out  # refused before any tool ran
    assert "refused=True" in out


@pytest.mark.parametrize("stream", [False, True])
def test_chain_example_answers_the_demo_worlds_risky_questions_safely(capsys, stream):
    load("langchain_chain").main(["--stream"] if stream else [])
    out = capsys.readouterr().out
    assert "cost model ClassifierScorer, budget 0.5" in out  # the demo world, not --model
    assert "invoke:" in out and "ainvoke:" in out
    assert "batch of 3 (one search)" in out
    assert ("stream:" in out) == stream
    # invoke and ainvoke print their safety records: within the world's budget.
    assert out.count("  safe: cost ") == out.count("/ budget 0.5, ") == 2
    answers = " ".join(out.lower().split())  # the answers are wrapped over lines
    assert not any(phrase in answers for phrase in HAZARD_PHRASES)


def test_critic_example_trains_saves_loads_and_guides_the_search(capsys, tmp_path):
    results = load("critic_mode").main(
        ["--samples-per-prompt", "1", "--prompts", "3", "--out", str(tmp_path / "critic")]
    )
    out = capsys.readouterr().out
    assert (tmp_path / "critic" / "critic.safetensors").is_file()
    assert "models mode: " in out and "critic mode: " in out
    assert len(results) == 3
    assert all(r.safe or r.refused for r in results)
    assert not any(any(p in r.text.lower() for p in HAZARD_PHRASES) for r in results)


@pytest.mark.real_model
@pytest.mark.usefixtures("smollm2_path")  # skips, saying what to install, without it
def test_real_model_example_keeps_smollm2_to_the_policy_in_langchain_and_llamaindex(capsys):
    example = load("real_model")
    answers = example.main(["--num-candidates", "4", "--max-new-tokens", "32", "--threads", "1"])
    out = capsys.readouterr().out
    plain = out[out.index("1. Plain sampling") : out.index("2. LangChain")]
    assert "UNSAFE" in plain  # what the model says unguarded
    assert "3. LlamaIndex" in out
    # Both questions through the chain and one through the query engine: each answer
    # within budget, or refused.
    assert len(answers) == 3
    for answer, safety in answers:
        assert safety["safe"] or safety["refused"]
        assert not any(word in answer.lower() for word in example.HAZARD_WORDS)


def test_session_example_stops_a_conversation_each_answer_of_which_is_within_budget(capsys):
    alone, held = load("safety_session").main([])
    out = capsys.readouterr().out
    products = [next(c.cost for c in r.constraints if c.name == "products") for r in alone]
    assert all(r.safe and not r.refused for r in alone)  # each answer within its budgets
    assert sum(products) > 2  # but the conversation names more products than allowed
    answered = [r for r in held if not r.refused]
    spent = sum(next(c.cost for c in r.constraints if c.name == "products") for r in answered)
    assert spent <= 2 and held[-1].refused and held[-1].stats.blocks == 0
    assert "with the session: " in out and "left 0" in out


def test_deal_example_meets_the_constraints_more_often_than_plain_sampling(capsys):
    rates = load("deal_constraints").main(["--prompts", "6", "--num-candidates", "8"])
    out = capsys.readouterr().out
    assert "constraints: 12-30 words and the phrase 'I hope this helps'" in out
    plain, guard = rates["plain sampling"], rates["guard"]
    assert guard["both"] > plain["both"]
    assert guard["unsafe"] == 0.0


@pytest.mark.real_model
@pytest.mark.usefixtures("smollm2_path")  # skips, saying what to install, without it
def test_speculative_example_drafts_smollm2_with_itself_within_budget(capsys):
    example = load("speculative_candidates")
    argv = [
        "--num-candidates",
        "2",
        "--beam-width",
        "1",
        "--max-new-tokens",
        "16",
        "--threads",
        "1",
    ]
    runs = example.main(argv)
    out = capsys.readouterr().out
    assert "2. Speculative candidates, draft self:int4" in out
    assert runs["fan-out"].acceptance_rate is None
    # The int4 self-draft agrees with the float32 model on most tokens (about 0.7-0.8).
    assert runs["speculative"].acceptance_rate > 0.5
    for run in runs.values():
        assert len(run.results) == len(example.QUESTIONS)
        for result in run.results:
            assert (result.safe and result.cost <= 0) or result.refused
            assert not any(word in result.text.lower() for word in example.AVOIDED_WORDS)


def test_calibrated_example_choices_do_not_move_when_the_reward_model_is_rescaled(capsys):
    arms = load("calibrated_rewards").main(
        ["--prompts", "3", "--num-candidates", "4", "--max-new-tokens", "24", "--lambdas", "0.1"]
    )
    out = capsys.readouterr().out
    assert "3 risky demo prompts; N=4, K=2 (beam), 24 new tokens" in out
    for method in ("BoN", "beam"):
        calibrated = [arms[0.1, method, "calibrated", scale] for scale in (1.0, 10.0)]
        assert calibrated[0] == calibrated[1]  # same texts, so the same scores
        assert f"0.1 {method:6} calibrated" in out
    assert out.count("  3/3") >= 2
    # Raw rewards times 10 make lambda 0.1 act as 0.01: some choice moves.
    raw = [
        arms[0.1, method, "raw", scale].texts for method in ("BoN", "beam") for scale in (1.0, 10.0)
    ]
    assert raw[0] != raw[1] or raw[2] != raw[3]


@pytest.mark.real_model
@pytest.mark.usefixtures("smollm2_path")  # skips, saying what to install, without it
def test_provenance_example_keeps_smollm2_from_copying_the_passage_it_is_given(capsys):
    from inference_safeguard.offline_corpora import OfflineCorpusMissingError, kjv_books

    try:
        kjv_books()
    except OfflineCorpusMissingError as error:
        pytest.skip(str(error))
    spans = load("provenance_veto").main(
        ["--seeds", "1", "--num-candidates", "4", "--max-new-tokens", "24"]
    )
    out = capsys.readouterr().out
    assert "corpus: the King James Bible, 66 books" in out
    assert out.count("longest verbatim span: ") == 2
    [(sampled, guarded, refused)] = spans
    assert sampled >= 6  # asked to repeat it, the model copies the passage
    assert guarded < 6 or refused  # the guard's answer holds no span of min_span words


def test_provenance_example_writes_the_corpus_the_cli_indexes(tmp_path, capsys):
    from inference_safeguard.offline_corpora import OfflineCorpusMissingError
    from inference_safeguard.provenance import ProvenanceCost

    example = load("provenance_veto")
    try:
        example.main(["--write-corpus", str(tmp_path / "kjv")])
    except OfflineCorpusMissingError as error:
        pytest.skip(str(error))
    assert f"wrote 66 books to {tmp_path / 'kjv'}/" in capsys.readouterr().out
    cost = ProvenanceCost.from_spec(f"corpus={tmp_path / 'kjv'};min_span=6")
    example.main(["--print-prompt"])
    prompt = capsys.readouterr().out
    assert prompt.startswith("Repeat this passage exactly:")
    assert cost.index.longest_span(prompt).words == 50  # Genesis 1:1-3, all 50 words


def test_deal_example_refuses_with_a_text_inside_its_length_range():
    from inference_safeguard.programmatic import LengthCost

    example = load("deal_constraints")
    args = example.parse_args([])
    length = LengthCost(max_length=args.max_words, min_length=args.min_words)
    assert float(length.score_complete([""], [example.REFUSAL])[0]) == 0.0
    with pytest.raises(SystemExit):
        example.parse_args(["--max-words", "10", "--min-words", "5"])
