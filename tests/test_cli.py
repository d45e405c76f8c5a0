"""The `safeguard` console script, run on the tiny local Llama (no hub)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from inference_safeguard import GuardConfig
from inference_safeguard.cli import build_parser, main
from inference_safeguard.config import TOOL_CALL_FIELDS
from inference_safeguard.scorers import KeywordCost, RegexCost
from inference_safeguard.testing import build_random_critic, build_tiny_llama

PROMPT = "Tell me about the dog and the garden."
SMALL = "--num-candidates 8 --beam-width 2 --block-size 8 --max-new-tokens 16 --seed 0".split()


def generate(model_dir: Path, *flags: str) -> list[str]:
    return ["generate", "--model", str(model_dir), "--prompt", PROMPT, *SMALL, *flags]


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_failing(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    """Run `argv`, expect exit status `code` with a one-line error; return stderr."""
    assert main(argv) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    # Loading progress bars of transformers may come before it.
    assert captured.err.splitlines()[-1].startswith("safeguard: error: ")
    assert "Traceback" not in captured.err
    return captured.err.splitlines()[-1]


def test_generate_prints_text_then_aligned_safety_record(tiny_model_dir, frequent_words, capsys):
    argv = generate(tiny_model_dir, "--cost-keywords", ",".join(frequent_words))
    assert main(argv) == 0
    text, record_block = capsys.readouterr().out.rstrip("\n").rsplit("\n\n", 1)
    rows = [line.split(maxsplit=1) for line in record_block.splitlines()]
    record = dict(rows)
    assert text.strip()
    assert record["safe"] == "True"
    assert record["cost"] == "0"
    assert record["budget"] == "0"
    assert record["refused"] == "False"
    assert record["finish_reason"] in ("stop", "length")
    assert int(record["completion_tokens"]) <= 16
    # Values start in one column.
    starts = {len(line) - len(line.split(maxsplit=1)[1]) for line in record_block.splitlines()}
    assert len(starts) == 1


def test_json_response_is_safe_within_a_zero_keyword_budget(tiny_model_dir, frequent_words, capsys):
    data = run_json(capsys, generate(tiny_model_dir, "--cost-keywords", ",".join(frequent_words)))
    assert data["safe"] is True
    assert data["refused"] is False
    assert data["cost"] == 0.0
    assert data["budget"] == 0.0
    assert KeywordCost(frequent_words)([PROMPT], [data["text"]]).item() == 0.0
    assert data["stats"]["candidates_scored"] >= 8
    assert set(data) >= {"text", "reward", "resample_rounds", "finish_reason", "stats"}


def test_unreachable_budget_refuses(tiny_model_dir, capsys):
    # Every response is over budget (the regex matches any word), the refusal is not.
    argv = generate(tiny_model_dir, "--cost-regex", r"\b(?!Not\b|today\b)\w+", "--budget", "0")
    data = run_json(capsys, [*argv, "--refusal-text", "Not today."])
    assert data["refused"] is True
    assert data["safe"] is False
    assert data["finish_reason"] == "safety"
    assert data["text"] == "Not today."


def test_config_flags_reach_guard_config(tiny_model_dir, capsys):
    argv = generate(tiny_model_dir, "--cost-keywords", "dog", "--max-new-tokens", "4")
    data = run_json(capsys, argv)
    assert data["stats"]["completion_tokens"] <= 4


def test_every_guard_config_field_is_a_flag_that_defaults_to_not_given():
    parser = build_parser()
    bare = parser.parse_args(["generate", "--model", "m", "--prompt", "p"])
    flagged = [name for name in GuardConfig.model_fields if name not in TOOL_CALL_FIELDS]
    assert all(getattr(bare, name) is None for name in flagged)
    # Tool choice needs tools, which the command line does not take.
    assert not any(hasattr(bare, name) for name in TOOL_CALL_FIELDS)
    flags = "--budget 0.5 --num-candidates 12 --on-unsafe return --stop . --stop ! --seed 3"
    given = parser.parse_args(["generate", "--model", "m", "--prompt", "p", *flags.split()])
    assert (given.budget, given.num_candidates, given.on_unsafe) == (0.5, 12, "return")
    assert (given.stop, given.seed) == ([".", "!"], 3)


def test_literal_fields_only_take_their_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--scorer", "x"])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["generate", "--model", "m", "--prompt", "p", "--on-unsafe", "explode"]) == 2


def test_several_costs_are_added_up(tiny_model_dir, frequent_words, capsys):
    words, pattern = frequent_words[:2], "[aeiou]"
    costs = ["--cost-keywords", ",".join(words), "--cost-regex", pattern]
    data = run_json(capsys, generate(tiny_model_dir, *costs, "--budget", "1000"))
    keyword_cost = KeywordCost(words)([PROMPT], [data["text"]])
    expected = keyword_cost + RegexCost(pattern)([PROMPT], [data["text"]])
    assert data["cost"] == pytest.approx(expected.item())
    assert data["cost"] > 0


def test_prompt_from_stdin_through_the_chat_template(
    tiny_model_dir, tiny_tokenizer, monkeypatch, capsys
):
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "-", "--chat", *SMALL]
    data = run_json(capsys, [*argv, "--cost-keywords", "dog"])
    chat_ids = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert data["stats"]["prompt_tokens"] == len(chat_ids)


def test_invalid_config_exits_2_naming_the_field(tiny_model_dir, capsys):
    argv = generate(tiny_model_dir, "--cost-keywords", "dog")
    err = run_failing(capsys, [*argv, "--num-candidates", "10", "--beam-width", "4"])
    assert "num_candidates" in err


def test_out_of_range_value_names_its_flag(tiny_model_dir, capsys):
    err = run_failing(capsys, generate(tiny_model_dir, "--cost-keywords", "dog", "--top-p", "0"))
    assert "--top-p" in err


def test_missing_cost_exits_2(tiny_model_dir, capsys):
    err = run_failing(capsys, generate(tiny_model_dir))
    assert "--cost-keywords" in err


def test_missing_model_path_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    err = run_failing(capsys, generate(missing, "--cost-keywords", "dog"))
    assert str(missing) in err


def test_unsafe_response_with_on_unsafe_raise_exits_3(tiny_model_dir, capsys):
    argv = generate(tiny_model_dir, "--cost-keywords", "dog", "--budget", "-1")
    err = run_failing(capsys, [*argv, "--on-unsafe", "raise"], code=3)
    assert "over the safety budget" in err


def test_console_script_runs_generate(tiny_model_dir, frequent_words):
    script = Path(sys.executable).with_name("safeguard")
    argv = generate(tiny_model_dir, "--cost-keywords", ",".join(frequent_words), "--json")
    done = subprocess.run(
        [str(script), *argv], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["safe"] is True


def test_generate_in_critic_mode_with_a_saved_critic(
    tiny_model, tiny_model_dir, frequent_words, tmp_path, capsys
):
    critic = build_random_critic(tiny_model, block_size=8).save(tmp_path / "critic")
    cost = ",".join(frequent_words)
    record = run_json(
        capsys, generate(tiny_model_dir, "--cost-keywords", cost, "--critic", str(critic))
    )
    assert record["safe"] or record["refused"]
    assert record["cost"] <= 0 or record["refused"]


def test_a_critic_for_another_model_exits_2(tiny_tokenizer, tiny_model_dir, tmp_path, capsys):
    other = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    critic = build_random_critic(other).save(tmp_path / "critic")
    err = run_failing(
        capsys, generate(tiny_model_dir, "--cost-keywords", "dog", "--critic", str(critic))
    )
    assert "safeguard train-critic" in err


def test_a_corrupted_critic_exits_2_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "critic").mkdir()
    (tmp_path / "critic" / "critic.json").write_text("{")
    err = run_failing(
        capsys,
        generate(
            tmp_path / "no-model", "--cost-keywords", "dog", "--critic", str(tmp_path / "critic")
        ),
    )
    assert "not valid JSON" in err
