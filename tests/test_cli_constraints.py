"""`--constraint NAME BUDGET SCORER` of `safeguard generate` and `serve`."""

from __future__ import annotations

import json

import pytest

from inference_safeguard.cli import main
from inference_safeguard.scorers import KeywordCost, RegexCost

PROMPT = "Tell me about the dog and the garden."
SMALL = "--num-candidates 8 --beam-width 2 --block-size 8 --max-new-tokens 16 --seed 0".split()


def generate(model_dir, *flags: str) -> list[str]:
    return ["generate", "--model", str(model_dir), "--prompt", PROMPT, *SMALL, *flags]


def test_each_constraint_holds_and_is_reported_with_its_budget(
    tiny_model_dir, frequent_words, capsys
):
    words = ",".join(frequent_words)
    argv = generate(
        tiny_model_dir,
        "--constraint", "words", "0", f"keywords:{words}",
        "--constraint", "vowels", "1000", "regex:[aeiou]",
        "--json",
    )  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["constraints"]) == {"words", "vowels"}
    assert data["constraints"]["words"]["budget"] == 0.0
    assert data["constraints"]["vowels"]["budget"] == 1000.0
    assert KeywordCost(frequent_words)([PROMPT], [data["text"]]).item() == 0.0
    vowels = RegexCost("[aeiou]")([PROMPT], [data["text"]]).item()
    assert data["constraints"]["vowels"]["cost"] == vowels
    assert data["safe"] is True


def test_budgets_by_name_override_a_constraint(tiny_model_dir, capsys):
    argv = generate(
        tiny_model_dir,
        "--constraint", "vowels", "0", "regex:[aeiou]",
        "--constraint", "digits", "0", r"regex:\d",
        "--budgets", '{"vowels": 1000}',
        "--json",
    )  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["constraints"]["vowels"]["budget"] == 1000.0
    assert data["constraints"]["digits"]["budget"] == 0.0


def test_text_output_has_a_line_per_constraint(tiny_model_dir, capsys):
    argv = generate(tiny_model_dir, "--constraint", "vowels", "1000", "regex:[aeiou]")
    assert main(argv) == 0
    record = capsys.readouterr().out.rstrip("\n").rsplit("\n\n", 1)[1]
    [line] = [line for line in record.splitlines() if line.startswith("constraint[vowels]")]
    assert line.split()[-1] == "safe" and "/ 1000" in line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--constraint", "a", "lots", "regex:x"], "finite number"),
        (["--constraint", "a", "0", "magic:x"], "SCORER must be"),
        (["--constraint", "a", "0", "keywords:"], "SCORER must be"),
        (["--constraint", "a", "0", "regex:x", "--constraint", "a", "1", "regex:y"], "distinct"),
        (["--constraint", "a", "0", "regex:x", "--cost-keywords", "dog"], "--cost-keywords"),
        (["--constraint", "a", "0", "regex:x", "--budget", "1"], "--budget"),
        (["--constraint", "a", "0", "world"], "demo world"),
        (["--constraint", "a", "0", "regex:x", "--budgets", '{"b": 1}'], "not constraints"),
    ],
)
def test_malformed_constraints_fail_with_one_line(tiny_model_dir, capsys, flags, message):
    assert main(generate(tiny_model_dir, *flags)) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("safeguard: error: ") and message in err
