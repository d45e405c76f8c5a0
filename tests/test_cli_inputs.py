"""Bad inputs on the command line: each exits 2 with a one-line message and no
traceback, before anything long runs (no network: everything is built locally)."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from inference_safeguard.cli import main

PROMPT = "Tell me about the dog and the garden."
SMALL = "--num-candidates 4 --beam-width 2 --block-size 4 --max-new-tokens 8 --seed 0".split()


def generate(model_dir: Path | str, *flags: str) -> list[str]:
    return ["generate", "--model", str(model_dir), "--prompt", PROMPT, *SMALL, *flags]


def run_failing(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run `argv`, expect exit status 2 with a one-line error; return that line."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    return captured.err.strip().splitlines()[-1]


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    return path


# ------------------------------------------------------------ wrong-kind checkpoints
def test_a_classifier_as_the_base_model_exits_2(tiny_reward_model_dir, capsys):
    err = run_failing(capsys, generate(tiny_reward_model_dir, "--cost-keywords", "dog"))
    assert err.startswith("safeguard: error: cannot load --model")
    assert "holds a sequence classifier (LlamaForSequenceClassification)" in err


def test_a_causal_lm_as_the_cost_model_exits_2(tiny_model_dir, capsys):
    err = run_failing(capsys, generate(tiny_model_dir, "--cost-model", str(tiny_model_dir)))
    assert "cannot load --cost-model" in err
    assert "ClassifierScorer needs a sequence-classification checkpoint" in err


def test_a_causal_lm_as_the_reward_model_of_eval_exits_2(tiny_model_dir, prompts_file, capsys):
    argv = ["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts_file)]
    argv += ["--cost-keywords", "dog", "--reward-model", str(tiny_model_dir)]
    assert "cannot load --reward-model" in run_failing(capsys, argv)


# ----------------------------------------------------------------- device and dtype
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2(tiny_model_dir, capsys):
    argv = generate(tiny_model_dir, "--cost-keywords", "dog", "--device", "cuda")
    assert "'cuda' is not available on this machine" in run_failing(capsys, argv)


def test_a_device_this_machine_lacks_exits_2(tiny_model_dir, capsys):
    argv = generate(tiny_model_dir, "--cost-keywords", "dog", "--device", "cuda:99")
    assert "--device" in run_failing(capsys, argv)


def test_an_unknown_dtype_exits_2(tiny_model_dir, capsys):
    argv = generate(tiny_model_dir, "--cost-keywords", "dog", "--dtype", "float33")
    assert "--dtype" in run_failing(capsys, argv)


# --------------------------------------------------------------------- model paths
def test_a_missing_model_path_says_no_such_directory(tmp_path, capsys):
    err = run_failing(capsys, generate(tmp_path / "nope", "--cost-keywords", "dog"))
    assert "no such directory" in err and "Repo id" not in err


def test_truncated_safetensors_exit_2(tiny_model_dir, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = run_failing(capsys, generate(copy, "--cost-keywords", "dog"))
    assert "incomplete or corrupted" in err


# ------------------------------------------------------------------------ prompts
@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe\x00\x00binary", b'{"prompt": "caf\xe9"}\n', bytes(range(256))],
    ids=["binary", "latin-1", "all-bytes"],
)
def test_a_prompt_file_that_is_not_utf8_exits_2(tiny_model_dir, tmp_path, capsys, content):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    argv = ["eval", "--model", str(tiny_model_dir), "--prompts", str(path)]
    err = run_failing(capsys, [*argv, "--cost-keywords", "dog"])
    assert f"{path}:" in err and ": not UTF-8 text (byte 0x" in err


def test_a_utf8_prompt_file_with_a_byte_order_mark_is_read(tmp_path):
    from inference_safeguard.cli_options import read_prompt_file

    path = tmp_path / "prompts.jsonl"
    path.write_bytes("\ufeff".encode() + json.dumps({"prompt": "caf\u00e9 \u2028 ok"}).encode())
    assert read_prompt_file(path) == ["caf\u00e9 \u2028 ok"]


def test_a_prompt_on_stdin_that_is_not_utf8_exits_2(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), "utf-8"))
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "-", "--cost-keywords", "x"]
    assert "standard input is not UTF-8 text" in run_failing(capsys, argv)


# ---------------------------------------------------------------------- demo world
def _fake_world(root: Path, prompts: object) -> Path:
    for name in ("base", "cost", "reward"):
        (root / name).mkdir(parents=True)
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([{"text": "hi", "topic": "x", "risky": False}], "holds a JSON list"),
        ({"test": [{"text": "hi"}]}, r"test[0] must be an object"),
        ({"test": "hi"}, "holds a JSON dict"),
    ],
)
def test_a_malformed_demo_world_prompts_file_exits_2(tmp_path, capsys, prompts, message):
    world = _fake_world(tmp_path / "world", prompts)
    err = run_failing(capsys, ["demo", "--world", str(world), "--limit", "0"])
    assert message in err and "prompts.json" in err


def test_a_demo_world_prompts_file_that_is_not_json_is_a_typed_error(tmp_path):
    from inference_safeguard.demo import load_demo_world
    from inference_safeguard.errors import DemoWorldError

    world = _fake_world(tmp_path / "world", [])
    (world / "prompts.json").write_bytes(b"\xff\xfe")
    with pytest.raises(DemoWorldError, match="not UTF-8 JSON"):
        load_demo_world(world)


@pytest.mark.parametrize("flag", ["--examples", "--limit"])
def test_negative_demo_counts_exit_2(capsys, flag):
    assert main(["demo", flag, "-1"]) == 2
    assert "expected an integer >= 0" in capsys.readouterr().err


def test_a_negative_eval_limit_exits_2(capsys):
    assert main(["eval", "--limit", "-3"]) == 2
    assert "expected a positive integer" in capsys.readouterr().err


# -------------------------------------------------------------- output directories
@pytest.mark.parametrize("command", ["eval", "train-critic"])
def test_an_output_path_that_is_a_file_fails_before_anything_loads(
    command, tmp_path, prompts_file, capsys
):
    taken = tmp_path / "taken"
    taken.write_text("")
    # The model does not exist either: the output is checked first, so no run is lost.
    base = [command, "--model", str(tmp_path / "no-model"), "--prompts", str(prompts_file)]
    base += ["--cost-keywords", "dog"]
    for out in (taken, taken / "sub"):
        err = run_failing(capsys, [*base, "--out", str(out)])
        assert "--out" in err and "is a file" in err


@pytest.mark.parametrize(
    ("command", "inside"), [("eval", "results.json"), ("train-critic", "critic.json")]
)
def test_an_output_file_name_taken_by_a_directory_fails_first(
    command, inside, tmp_path, prompts_file, capsys
):
    (tmp_path / "out" / inside).mkdir(parents=True)
    argv = [command, "--model", str(tmp_path / "no-model"), "--prompts", str(prompts_file)]
    argv += ["--cost-keywords", "dog", "--out", str(tmp_path / "out")]
    assert f"{inside} would be overwritten but is a directory" in run_failing(capsys, argv)
