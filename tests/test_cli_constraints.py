"""`--constraint NAME BUDGET SCORER` of `safeguard generate`, `serve` and `eval`, scorers
written as one-line specs among them, and `--reward keywords-reward:...`."""

from __future__ import annotations

import json

import pytest

from inference_safeguard.cli import build_parser, main
from inference_safeguard.cli_constraints import constraint_specs, load_constraints
from inference_safeguard.programmatic import LengthCost, RequiredKeywordsCost, ShapeCost
from inference_safeguard.provenance import ProvenanceCost
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


# ------------------------------------------------------------ scorers by their specs
def parsed_constraints(*flags: str) -> dict:
    argv = ["generate", "--model", "unused", "--prompt", PROMPT, *flags]
    args = build_parser().parse_args(argv)
    return load_constraints(constraint_specs(args), args)


def test_spec_written_scorers_build_the_scorer_they_name(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["a"]}), encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("it was the best of times it was the worst of times", encoding="utf-8")
    costs = parsed_constraints(
        "--constraint", "size", "0", "length:min_words=3;max_words=30;weight=2",
        "--constraint", "city", "0", "required:words=Paris,Seine",
        "--constraint", "digits", "0", r"shape-regex:\d+;\d+",
        "--constraint", "json", "0", f"json-schema:{schema}",
        "--constraint", "copy", "0", f"provenance:corpus={corpus};min_span=4",
    )  # fmt: skip
    size, city, digits, shaped, copy = (costs[name][0] for name in costs)
    assert isinstance(size, LengthCost) and (size.min_length, size.max_length) == (3, 30)
    assert size.weight == 2.0
    assert isinstance(city, RequiredKeywordsCost) and city.words == ("paris", "seine")
    assert isinstance(digits, ShapeCost) and isinstance(shaped, ShapeCost)
    assert digits.score_complete(["p", "p"], ["12;34", "12"]).tolist() == [0.0, 1.0]
    assert shaped.score_complete(["p", "p"], ['{"a": 1}', '{"b": 1}']).tolist() == [0.0, 1.0]
    assert isinstance(copy, ProvenanceCost)
    assert copy(["p", "p"], ["it was the best of", "it was a dog"]).tolist() == [2.0, 0.0]


def test_generate_enforces_finished_costs_of_spec_written_constraints(tiny_model_dir, capsys):
    word = "wind"  # the tiny model says it to PROMPT now and then
    length, required = LengthCost(40, 10), RequiredKeywordsCost([word])
    answered = []
    for seed in ("0", "1"):
        argv = generate(
            tiny_model_dir,
            "--constraint", "size", "0", "length:min_words=10;max_words=40",
            "--constraint", "word", "0", f"required:words={word}",
            "--reward", f"keywords-reward:words={word}",
            "--seed", seed,
            "--json",
        )  # fmt: skip
        assert main(argv) == 0
        data = json.loads(capsys.readouterr().out)
        if data["refused"]:  # the record keeps the refused response's costs
            assert not data["safe"] and any(c["cost"] > 0 for c in data["constraints"].values())
            continue
        text = data["text"]
        costs = {name: c["cost"] for name, c in data["constraints"].items()}
        assert costs == {
            "size": length.score_complete([PROMPT], [text]).item(),
            "word": required.score_complete([PROMPT], [text]).item(),
        }
        assert data["safe"] and costs == {"size": 0.0, "word": 0.0}
        answered.append(text)
    assert answered  # not a refusal every time: the search found such a response


@pytest.mark.parametrize(
    ("scorer", "message"),
    [
        ("length:max_words=lots", "max_words='lots' is not an integer"),
        ("length:colour=red", "unknown option 'colour'"),
        ("length:", "SCORER must be"),
        ("required:weight=1", "at least one word"),
        ("shape-regex:(", "cannot build the regex"),
        ("json-schema:/no/such/schema.json", "no schema file"),
        ("provenance:min_span=8", "name the corpus"),
        ("constitution:device=cpu", "name the judge"),
        ("constitution:judge=j.gguf;calibration=platt", "calibration='platt' is not one of"),
    ],
)
def test_malformed_scorer_specs_fail_with_one_line(tiny_model_dir, capsys, scorer, message):
    assert main(generate(tiny_model_dir, "--constraint", "a", "0", scorer)) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("safeguard: error: --constraint a") and message in err


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "--model", "/no/such/model", "--port", "8199"],
        ["eval", "--prompts", "2"],
        ["generate", "--model", "/no/such/model", "--prompt", PROMPT],
    ],
    ids=["serve", "eval", "generate"],
)
def test_each_command_checks_scorer_specs_before_loading(command, capsys):
    argv = [*command, "--constraint", "size", "0", "length:max_words=-1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "--constraint size length:" in err and "max_length must be an int >= 0" in err


def test_a_malformed_keywords_reward_fails_with_one_line(tiny_model_dir, capsys):
    argv = generate(tiny_model_dir, "--cost-keywords", "dog", "--reward", "keywords-reward:w=1")
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("safeguard: error: --reward") and "unknown option 'w'" in err
