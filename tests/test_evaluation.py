"""The evaluation harness: metrics math, the method registry, `evaluate`, the report's
formats and `safeguard eval`, on synthetic results and the tiny local Llama (no hub)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import types
from pathlib import Path

import pytest
from conftest import OTHER_PROMPT, PROMPT
from rich.console import Console

from inference_safeguard import GuardConfig, GuardResult, InferenceGuard
from inference_safeguard.baselines import ARGS, BestOfN, BlockBeamSearch, SamplingDecoder
from inference_safeguard.cli import CommandLineError
from inference_safeguard.evaluation import (
    METHODS,
    EvaluationReport,
    MethodOptions,
    MethodRun,
    build_decoder,
    evaluate,
    render_table,
    summarize,
    write_csv,
    write_json,
    write_plot,
)
from inference_safeguard.evaluation.cli import add_eval_command
from inference_safeguard.evaluation.methods import runnable_methods
from inference_safeguard.evaluation.metrics import mean_and_sd
from inference_safeguard.scorers import CallableScorer
from inference_safeguard.testing import build_random_critic

REFUSAL = "Sorry."
"""A refusal with none of the tiny model's words, so no keyword cost or oracle flags it."""

PROMPTS = [
    PROMPT,
    OTHER_PROMPT,
    "Where is the river and the old house?",
    [{"role": "user", "content": "Tell me a story about a cat."}],
]


def result(
    *, cost: float = 0.0, reward: float | None = 1.0, safe: bool = True, refused: bool = False
) -> GuardResult:
    return GuardResult(
        text=REFUSAL if refused else "some text",
        token_ids=[1, 2],
        safe=safe,
        cost=cost,
        reward=reward,
        refused=refused,
        finish_reason="safety" if refused else "stop",
        budget=0.0,
    )


def synthetic_report(*, oracle: bool = True) -> EvaluationReport:
    runs = [
        MethodRun(
            "base",
            "Base (sampling)",
            [result(cost=2.0, reward=1.0, safe=False), result(reward=3.0)],
            seconds=1.0,
            oracle_unsafe=[True, False] if oracle else None,
        ),
        MethodRun(
            "inferenceguard",
            "InferenceGuard",
            [result(reward=2.0, safe=False, refused=True), result(reward=4.0)],
            seconds=3.0,
            oracle_unsafe=[False, False] if oracle else None,
        ),
    ]
    return EvaluationReport(prompts=["p0", "p1"], config=GuardConfig(), runs=runs)


@pytest.fixture()
def parts(tiny_model, tiny_tokenizer, keyword_cost, length_reward):
    return {
        "model": tiny_model,
        "tokenizer": tiny_tokenizer,
        "cost": keyword_cost,
        "reward": length_reward,
    }


@pytest.fixture()
def eval_config(small_config) -> GuardConfig:
    return small_config.with_overrides(refusal_text=REFUSAL)


# ------------------------------------------------------------------------- metrics
def test_summary_row_holds_the_paper_columns():
    results = [
        result(cost=0.0, reward=1.0),
        result(cost=3.0, reward=2.0, safe=False),
        result(cost=1.0, reward=3.0, safe=False, refused=True),
        result(cost=0.0, reward=6.0),
    ]
    row = summarize("m", results, seconds=2.0, oracle_unsafe=[False, True, False, True])
    assert row.num_responses == 4
    assert row.reward_mean == pytest.approx(3.0)
    assert row.reward_sd == pytest.approx((14 / 3) ** 0.5)  # sample sd
    assert row.cost_mean == pytest.approx(1.0)
    assert row.oracle_safety_rate == pytest.approx(0.5)
    assert row.refusal_rate == pytest.approx(0.25)
    assert row.seconds_per_response == pytest.approx(0.5)
    assert row.label == "m"


def test_a_refusal_counts_as_safe_but_an_unflagged_over_budget_response_does_not():
    returned_unsafe = result(cost=3.0, safe=False)
    refused = result(cost=3.0, safe=False, refused=True)
    assert summarize("m", [returned_unsafe], seconds=1.0).safety_rate == 0.0
    assert summarize("m", [refused], seconds=1.0).safety_rate == 1.0
    assert summarize("m", [result(), returned_unsafe], seconds=1.0).safety_rate == 0.5


def test_reward_and_oracle_columns_are_empty_without_their_models():
    row = summarize("m", [result(reward=None)], seconds=1.0)
    assert row.reward_mean is None and row.reward_sd is None
    assert row.oracle_safety_rate is None


def test_one_value_has_sd_zero_and_none_is_an_error():
    assert mean_and_sd([2.5]) == (2.5, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        mean_and_sd([])


def test_summary_rejects_no_results_and_mismatched_verdicts():
    with pytest.raises(ValueError, match="no results"):
        summarize("m", [], seconds=1.0)
    with pytest.raises(ValueError, match="one verdict per result"):
        summarize("m", [result()], seconds=1.0, oracle_unsafe=[True, False])


# ------------------------------------------------------------------------- methods
def test_every_method_builds_its_decoder_with_the_shared_config(parts, eval_config):
    critic = build_random_critic(
        parts["model"], budget=eval_config.budget, block_size=eval_config.block_size
    )
    options = MethodOptions(
        lagrange_multiplier=3.0, args_num_tokens=4, args_cost_weight=2.0, critic=critic
    )
    expected = {
        "base": (SamplingDecoder, None),
        "bon-reward": (BestOfN, "reward"),
        "bon-lagrangian": (BestOfN, "lagrangian"),
        "bon-lagrangian-calibrated": (BestOfN, "lagrangian"),
        "bon-augmented": (BestOfN, "augmented"),
        "beam-reward": (BlockBeamSearch, "reward"),
        "beam-lagrangian": (BlockBeamSearch, "lagrangian"),
        "beam-lagrangian-calibrated": (BlockBeamSearch, "lagrangian"),
        "beam-augmented": (BlockBeamSearch, "augmented"),
        "args": (ARGS, None),
        "args-cost": (ARGS, None),
        "inferenceguard": (InferenceGuard, "augmented"),
        "inferenceguard-critic": (InferenceGuard, "augmented"),
    }
    assert list(METHODS) == list(expected)
    for name, (kind, scoring) in expected.items():
        decoder = build_decoder(name, **parts, config=eval_config, options=options)
        assert type(decoder) is kind, name
        # Decoders fill the sampling fields left unset from the model's defaults.
        shared = eval_config.with_sampling_defaults(decoder.lm.sampling_defaults)
        if name == "inferenceguard-critic":
            assert decoder.config == shared.with_overrides(scorer="critic")
            assert decoder.critic is critic
        elif name.endswith("-calibrated"):
            assert decoder.config == shared.with_overrides(reward_calibration="quantile")
        else:
            assert decoder.config == shared
        if scoring is not None:
            assert decoder.search.scoring == scoring
        if kind in (BestOfN, BlockBeamSearch):
            assert decoder.search.lagrange_multiplier == 3.0
    plain, with_cost = (
        build_decoder(n, **parts, config=eval_config) for n in ("args", "args-cost")
    )
    assert plain.cost_weight == 0.0 and with_cost.cost_weight == 10.0


def test_methods_that_need_a_reward_model_are_left_out_without_one(parts, eval_config):
    assert "args" not in runnable_methods(has_reward=False)
    assert runnable_methods(has_reward=True, has_critic=True) == list(METHODS)
    assert "inferenceguard-critic" not in runnable_methods(has_reward=True)
    with pytest.raises(ValueError, match="needs a reward model"):
        build_decoder("args", **{**parts, "reward": None}, config=eval_config)


def test_unknown_method_and_bad_options_are_rejected(parts, eval_config):
    with pytest.raises(ValueError, match="choose from base, bon-reward"):
        build_decoder("greedy", **parts, config=eval_config)
    with pytest.raises(ValueError, match="args_num_tokens"):
        MethodOptions(args_num_tokens=0)
    with pytest.raises(ValueError, match="lagrange_multiplier"):
        MethodOptions(lagrange_multiplier=-1.0)


# ------------------------------------------------------------------------ evaluate
def test_inferenceguard_is_as_safe_as_best_of_n_which_is_safer_than_sampling(
    parts, keyword_cost, eval_config
):
    seen_prompts = []

    def oracle(prompt: str, response: str) -> bool:
        seen_prompts.append(prompt)
        return float(keyword_cost([prompt], [response])[0]) > 0

    report = evaluate(
        ["base", "bon-augmented", "inferenceguard"],
        PROMPTS,
        **parts,
        oracle=oracle,
        config=eval_config,
        batch_size=3,
        progress=False,
    )
    base, best_of_n, guard = report.rows()
    assert guard.safety_rate >= best_of_n.safety_rate > base.safety_rate
    assert guard.oracle_safety_rate >= best_of_n.oracle_safety_rate > base.oracle_safety_rate
    assert guard.safety_rate == 1.0
    assert [row.num_responses for row in report.rows()] == [4, 4, 4]
    # The oracle judges plain text: a message list arrives as its transcript.
    assert report.prompts[3] == "user: Tell me a story about a cat."
    assert set(seen_prompts) == set(report.prompts)
    assert report.config.seed == 0  # fixed when the config has none


def test_responses_do_not_depend_on_the_batch_size(parts, eval_config):
    texts = [
        [r.text for r in evaluate(["bon-augmented"], PROMPTS, **parts, config=eval_config,
                                  batch_size=size, progress=False).runs[0].results]
        for size in (1, 4)
    ]  # fmt: skip
    assert texts[0] == texts[1]


def test_refusals_are_scored_on_the_refusal_text(tiny_model, tiny_tokenizer, eval_config):
    # Every text but the refusal costs 1, so the guard must refuse every prompt.
    cost = CallableScorer(lambda prompts, responses: [float(r != REFUSAL) for r in responses])
    reward = CallableScorer(lambda prompts, responses: [len(r) for r in responses])
    report = evaluate(
        ["inferenceguard"],
        PROMPTS[:2],
        model=tiny_model,
        tokenizer=tiny_tokenizer,
        cost=cost,
        reward=reward,
        config=eval_config,
        progress=False,
    )
    [row] = report.rows()
    assert row.refusal_rate == 1.0 and row.safety_rate == 1.0
    assert row.cost_mean == 0.0
    assert row.reward_mean == len(REFUSAL)


def test_results_raised_with_on_unsafe_raise_are_kept_as_unsafe(parts, eval_config):
    report = evaluate(
        ["inferenceguard"],
        PROMPTS[:2],
        **parts,
        config=eval_config.with_overrides(budget=-1.0, on_unsafe="raise"),
        progress=False,
    )
    [row] = report.rows()
    assert row.num_responses == 2
    assert row.safety_rate == 0.0 and row.refusal_rate == 0.0


def test_evaluate_rejects_repeated_methods_empty_prompts_and_bad_batch_size(parts):
    with pytest.raises(ValueError, match="each method once"):
        evaluate(["base", "base"], PROMPTS, **parts, progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        evaluate(["base"], [], **parts, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(["base"], PROMPTS, **parts, batch_size=0, progress=False)


# -------------------------------------------------------------------------- report
def test_table_has_a_row_per_method_and_an_oracle_column_only_with_an_oracle():
    def text(report: EvaluationReport) -> str:
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(render_table(report))
        return console.export_text()

    with_oracle = text(synthetic_report())
    assert "Base (sampling)" in with_oracle and "InferenceGuard" in with_oracle
    assert "Safe (oracle)" in with_oracle
    assert "2.000 (1.414)" in with_oracle  # reward (sd) of base
    assert "Safe (oracle)" not in text(synthetic_report(oracle=False))


def test_json_and_csv_hold_every_method_and_response(tmp_path):
    report = synthetic_report()
    write_json(report, tmp_path / "results.json")
    write_csv(report, tmp_path / "results.csv")

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["budget"] == 0.0
    assert data["prompts"] == ["p0", "p1"]
    base, guard = data["methods"]
    assert base["method"] == "base" and base["safety_rate"] == 0.5
    assert guard["responses"][0] == {
        "prompt": 0,
        "text": REFUSAL,
        "reward": 2.0,
        "cost": 0.0,
        "safe": True,
        "refused": True,
        "oracle_unsafe": False,
        "finish_reason": "safety",
    }

    with open(tmp_path / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["method"] for row in rows] == ["base", "inferenceguard"]
    assert float(rows[1]["refusal_rate"]) == 0.5
    assert float(rows[1]["seconds_per_response"]) == 1.5


def test_plot_is_a_png(tmp_path):
    write_plot(synthetic_report(), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_needs_rewards(tmp_path):
    runs = [MethodRun("base", "Base", [result(reward=None)], seconds=1.0)]
    report = EvaluationReport(prompts=["p"], config=GuardConfig(), runs=runs)
    with pytest.raises(ValueError, match="reward model"):
        write_plot(report, tmp_path / "plot.png")


# ---------------------------------------------------------------- safeguard eval
SMALL = "--num-candidates 8 --beam-width 2 --block-size 8 --max-new-tokens 16".split()


def safeguard_eval(*flags: str) -> int:
    """Run `safeguard eval` with `flags` through a parser holding only that command."""
    parser = argparse.ArgumentParser(prog="safeguard")
    add_eval_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *flags])
    return args.run(args)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [json.dumps({"prompt": p, "id": i}) for i, p in enumerate(PROMPTS)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    return path


def test_eval_command_runs_every_method_and_writes_the_report(
    tiny_model, tiny_model_dir, tiny_reward_model_dir, prompt_file, frequent_words, tmp_path, capsys
):
    out = tmp_path / "out"
    critic = build_random_critic(tiny_model, block_size=8).save(tmp_path / "critic")
    code = safeguard_eval(
        "--model", str(tiny_model_dir),
        "--cost-keywords", ",".join(frequent_words),
        "--reward-model", str(tiny_reward_model_dir),
        "--critic", str(critic),
        "--prompts", str(prompt_file),
        "--limit", "3",
        "--batch-size", "2",
        *SMALL,
        "--out", str(out),
        "--plot",
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    for method in METHODS.values():
        assert method.label in printed
    data = json.loads((out / "results.json").read_text())
    assert [m["method"] for m in data["methods"]] == list(METHODS)
    assert all(len(m["responses"]) == 3 for m in data["methods"])
    with open(out / "results.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == len(METHODS)
    assert (out / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_eval_command_defaults_to_the_demo_world(
    tiny_model, tiny_tokenizer, keyword_cost, length_reward, monkeypatch, capsys
):
    world = types.SimpleNamespace(
        model=tiny_model,
        tokenizer=tiny_tokenizer,
        cost=keyword_cost,
        reward=length_reward,
        oracle=lambda prompt, response: False,
        prompts={"test": PROMPTS[:2], "validation": PROMPTS[2:]},
        budget=2.5,
        critic=build_random_critic(tiny_model, budget=2.5, block_size=8),
    )
    demo = types.ModuleType("inference_safeguard.demo")
    demo.load_demo_world = lambda: world
    monkeypatch.setitem(sys.modules, "inference_safeguard.demo", demo)

    assert safeguard_eval("--methods", "base,inferenceguard,inferenceguard-critic", *SMALL) == 0
    printed = capsys.readouterr().out
    assert "2 prompts · budget 2.5" in printed
    assert "InferenceGuard + critic" in printed
    assert "Safe (oracle)" in printed
    with pytest.raises(CommandLineError, match="no split 'train'; choose from test, validation"):
        safeguard_eval("--split", "train", *SMALL)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--plot"], "add --out DIR"),
        (["--model", "m"], "--model needs --prompts"),
        (["--model", "m", "--prompts", "{prompts}"], "--model needs a cost"),
        (
            ["--model", "{model}", "--prompts", "{prompts}", "--cost-keywords", "dog",
             "--methods", "base,args"],
            "'args' needs a reward model",
        ),
        (
            ["--model", "{model}", "--prompts", "{prompts}", "--cost-keywords", "dog",
             "--plot", "--out", "{out}"],
            "--plot puts reward on its x axis",
        ),
        (["--lagrange-multiplier", "-2"], "lagrange_multiplier must be"),
    ],
)  # fmt: skip
def test_eval_command_explains_what_is_missing(
    flags, message, tiny_model_dir, prompt_file, tmp_path
):
    paths = {"model": str(tiny_model_dir), "prompts": str(prompt_file), "out": str(tmp_path)}
    with pytest.raises(CommandLineError, match=message):
        safeguard_eval(*(flag.format(**paths) for flag in flags), *SMALL)


def test_prompt_file_errors_name_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n{"text": "no prompt key"}\n')
    with pytest.raises(CommandLineError, match=r"prompts\.jsonl:2: needs a \"prompt\""):
        safeguard_eval("--prompts", str(path))
    path.write_text("not json\n")
    with pytest.raises(CommandLineError, match=r"prompts\.jsonl:1: not JSON"):
        safeguard_eval("--prompts", str(path))
