"""Critic training: rollout collection, the fit, its saved critic, and `safeguard train-critic`.

Everything runs on the tiny local Llama with a keyword cost and a length reward: a few
seconds per test.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from inference_safeguard.cli import main
from inference_safeguard.critic import CONFIG_FILE, WEIGHTS_FILE, LatentCritic, ModelFingerprint
from inference_safeguard.errors import InvalidPromptError, PromptTooLongError
from inference_safeguard.lm import CausalLM
from inference_safeguard.scorers import CallableScorer, Scorer
from inference_safeguard.training import (
    CriticTrainingError,
    CriticTrainingSettings,
    RolloutSet,
    collect_rollouts,
    fit_critic,
    train_critic,
)
from inference_safeguard.training.fit import split_by_prompt

PROMPTS = [
    "Tell me about the dog and the garden.",
    "What is a good name for a small bird?",
    "Write a short story about a house.",
    "How do I plant a tree in the spring?",
    "Describe the city at night.",
    "What should I cook for my family tonight?",
]
SAMPLES, BLOCK, TOKENS = 4, 4, 16
SMALL_FIT = CriticTrainingSettings(width=32, epochs=40, patience=40, batch_size=16)


@pytest.fixture()
def lm(tiny_model, tiny_tokenizer) -> CausalLM:
    return CausalLM(tiny_model, tiny_tokenizer)


def roll_out(lm, cost, reward, **overrides) -> RolloutSet:
    prompts = overrides.pop("prompts", PROMPTS)
    settings = {
        "samples_per_prompt": SAMPLES,
        "block_size": BLOCK,
        "max_new_tokens": TOKENS,
        "progress": False,
        **overrides,
    }
    return collect_rollouts(lm, prompts, cost, reward, **settings)


def per_rollout(rollouts: RolloutSet) -> list[RolloutSet]:
    return [rollouts.subset(rollouts.rollout == r) for r in rollouts.rollout.unique()]


class CountingScorer(Scorer):
    """Wraps a scorer and records the batch size of every call."""

    def __init__(self, inner: Scorer) -> None:
        self.inner = inner
        self.calls: list[int] = []

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        self.calls.append(len(responses))
        return self.inner(prompts, responses)


# ---------------------------------------------------------------------- rollouts
def test_rollouts_record_every_generating_row_at_every_block_end(lm, keyword_cost, length_reward):
    rollouts = roll_out(lm, keyword_cost, length_reward)

    points = len(rollouts)
    assert rollouts.hidden.shape == (points, lm.model.config.hidden_size)
    assert rollouts.hidden.dtype == torch.float32
    for name in ("prefix_cost", "final_cost", "final_reward", "rollout", "prompt", "tokens"):
        assert getattr(rollouts, name).shape == (points,), name
    assert rollouts.num_prompts == len(PROMPTS)
    assert rollouts.num_rollouts == len(PROMPTS) * SAMPLES
    assert rollouts.hidden_size == lm.model.config.hidden_size
    assert torch.equal(rollouts.prompt, rollouts.rollout // SAMPLES)
    assert not rollouts.hidden.is_inference()  # usable for training
    for rollout in per_rollout(rollouts):
        blocks = len(rollout)
        assert 1 <= blocks <= TOKENS // BLOCK
        assert (rollout.tokens.diff() >= 0).all()
        assert (rollout.tokens <= BLOCK * torch.arange(1, blocks + 1)).all()
        assert (rollout.hidden.abs().sum(-1) > 0).all()  # a decoded token's state, not zeros
        assert (rollout.final_reward == rollout.final_reward[0]).all()


def eos_every(lm: CausalLM, step: int, monkeypatch: pytest.MonkeyPatch) -> CausalLM:
    """`lm`'s model and tokenizer with every `step`-th token id an EOS."""
    eos = list(range(0, lm.vocab_size, step))
    monkeypatch.setattr(lm.model.generation_config, "eos_token_id", eos)
    return CausalLM(lm.model, lm.tokenizer)


def test_rollouts_that_end_record_no_more_points(lm, keyword_cost, length_reward, monkeypatch):
    cost = CountingScorer(keyword_cost)
    rollouts = roll_out(eos_every(lm, 8, monkeypatch), cost, length_reward)
    blocks = [len(rollout) for rollout in per_rollout(rollouts)]
    assert min(blocks) < max(blocks)  # some end early, others go on
    assert len(cost.calls) == max(blocks)
    for rollout in per_rollout(rollouts):
        if rollout.tokens[-1] < TOKENS:  # it emitted EOS in its last recorded block
            assert rollout.tokens[-1] < BLOCK * len(rollout)


def test_a_batch_stops_once_every_rollout_has_ended(lm, keyword_cost, length_reward, monkeypatch):
    cost, reward = CountingScorer(keyword_cost), CountingScorer(length_reward)
    rollouts = roll_out(eos_every(lm, 1, monkeypatch), cost, reward)
    assert cost.calls == [len(PROMPTS) * SAMPLES]  # one block, then every row had ended
    assert reward.calls == [len(PROMPTS) * SAMPLES]
    assert len(rollouts) == rollouts.num_rollouts
    assert (rollouts.tokens == 0).all()


def test_prefix_cost_never_falls_and_final_cost_is_the_rollouts_highest(
    lm, keyword_cost, length_reward
):
    rollouts = roll_out(lm, keyword_cost, length_reward)
    assert rollouts.final_cost.max() > 0  # the keywords do occur
    for rollout in per_rollout(rollouts):
        assert (rollout.prefix_cost.diff() >= 0).all()
        assert (rollout.final_cost >= rollout.prefix_cost).all()
        assert (rollout.final_cost == rollout.prefix_cost[-1]).all()


def test_a_cost_that_falls_with_length_is_held_at_its_running_max(lm, length_reward):
    falling = CallableScorer(lambda prompts, responses: [100.0 - len(r) for r in responses])
    rollouts = roll_out(lm, falling, length_reward)
    for rollout in per_rollout(rollouts):
        assert (rollout.prefix_cost == rollout.prefix_cost[0]).all()
        assert (rollout.final_cost == rollout.prefix_cost[0]).all()


def test_one_cost_call_per_block_and_one_reward_call_per_batch(lm, keyword_cost, length_reward):
    cost, reward = CountingScorer(keyword_cost), CountingScorer(length_reward)
    rollouts = roll_out(lm, cost, reward, prompts_per_batch=3)

    blocks_per_batch = [
        max(len(r) for r in per_rollout(rollouts.subset(rollouts.prompt // 3 == batch)))
        for batch in range(2)
    ]
    assert len(cost.calls) == sum(blocks_per_batch)
    assert sum(cost.calls) == len(rollouts)
    assert reward.calls == [3 * SAMPLES, 3 * SAMPLES]


def test_rollouts_are_reproducible_with_a_seed(lm, keyword_cost, length_reward):
    first = roll_out(lm, keyword_cost, length_reward, seed=7)
    again = roll_out(lm, keyword_cost, length_reward, seed=7)
    other = roll_out(lm, keyword_cost, length_reward, seed=8)
    for name in RolloutSet.__dataclass_fields__:
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert len(first) != len(other) or not torch.equal(first.hidden, other.hidden)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"prompts": []}, InvalidPromptError, "no prompts given"),
        ({"prompts": "just one string"}, InvalidPromptError, "list of prompts"),
        ({"prompts": ["fine", "  "]}, InvalidPromptError, "empty"),
        ({"prompts": ["fine", 3]}, InvalidPromptError, "prompt 1 must be a string"),
        ({"samples_per_prompt": 0}, ValueError, "samples_per_prompt must be an int >= 1"),
        ({"block_size": 0}, ValueError, "block_size must be an int >= 1"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be an int >= 1"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number >= 0.001"),
        ({"temperature": 1e-300}, ValueError, "a smaller temperature overflows the logits"),
        ({"top_p": True}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, ValueError, "top_k must be an int >= 0"),
        ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"prompts_per_batch": 0}, ValueError, "prompts_per_batch must be an int >= 1"),
        ({"max_new_tokens": 600}, PromptTooLongError, "context window is 512 tokens"),
    ],
)
def test_rollouts_reject_bad_input_before_decoding(
    lm, keyword_cost, length_reward, overrides, error, message
):
    cost = CountingScorer(keyword_cost)
    with pytest.raises(error, match=message):
        roll_out(lm, cost, length_reward, **overrides)
    assert cost.calls == []


def test_rollout_set_checks_shapes_and_subsets_every_field(lm, keyword_cost, length_reward):
    rollouts = roll_out(lm, keyword_cost, length_reward)
    with pytest.raises(ValueError, match=r"final_cost has shape \(3,\)"):
        RolloutSet(**{**vars(rollouts), "final_cost": torch.zeros(3)})
    subset = rollouts.subset(rollouts.prompt == 2)
    assert subset.num_prompts == 1 and subset.num_rollouts == SAMPLES
    assert torch.equal(subset.hidden, rollouts.hidden[rollouts.prompt == 2])
    assert torch.equal(subset.tokens, rollouts.tokens[rollouts.prompt == 2])


# --------------------------------------------------------------------------- fit
def fit(rollouts: RolloutSet, model, settings=SMALL_FIT, budget: float = 1.0):
    return fit_critic(
        rollouts,
        budget=budget,
        block_size=BLOCK,
        fingerprint=ModelFingerprint.of(model),
        settings=settings,
        progress=False,
    )


def test_fit_lowers_the_training_loss_and_reports_metrics_in_range(
    lm, tiny_model, keyword_cost, length_reward
):
    rollouts = roll_out(lm, keyword_cost, length_reward)
    critic, report = fit(rollouts, tiny_model)

    assert min(report.train_loss) < 0.5 * report.train_loss[0]
    assert report.validation_loss[report.best_epoch - 1] == min(report.validation_loss)
    assert 1 <= report.best_epoch <= report.epochs_run <= SMALL_FIT.epochs
    assert len(report.train_loss) == len(report.validation_loss) == report.epochs_run
    assert report.train_points + report.validation_points == len(rollouts)
    assert report.train_rollouts + report.validation_rollouts == len(PROMPTS) * SAMPLES
    assert (report.train_prompts, report.validation_prompts) == (5, 1)
    for name in ("p_safe_brier", "p_safe_brier_baseline", "p_safe_ece", "safe_rate"):
        assert 0.0 <= getattr(report, name) <= 1.0, name
    assert 0.0 <= report.probe_over_budget_accuracy <= 1.0
    assert 0.0 <= report.r_hat_mae <= report.r_hat_rmse < 10 * report.reward_std + 1
    assert 0.0 <= report.probe_mae < 10
    assert report.seconds > 0
    document = json.loads(json.dumps(report.as_dict(), allow_nan=False))
    assert document["settings"] == SMALL_FIT.model_dump()
    assert not critic.training  # eval mode
    assert next(critic.parameters()).device.type == "cpu"


def test_split_holds_out_whole_prompts(lm, keyword_cost, length_reward):
    rollouts = roll_out(lm, keyword_cost, length_reward)
    splits = []
    for seed in range(4):
        is_train = split_by_prompt(rollouts.prompt, 0.34, seed)
        train, held_out = (
            set(rollouts.prompt[is_train].tolist()),
            set(rollouts.prompt[~is_train].tolist()),
        )
        assert not train & held_out
        assert train | held_out == set(range(len(PROMPTS)))
        assert len(held_out) == 2
        assert torch.equal(is_train, split_by_prompt(rollouts.prompt, 0.34, seed))
        splits.append(frozenset(held_out))
    assert len(set(splits)) > 1  # the seed decides which prompts are held out


def test_critic_is_standardised_with_training_split_statistics(
    lm, tiny_model, keyword_cost, length_reward
):
    rollouts = roll_out(lm, keyword_cost, length_reward)
    critic, _ = fit(rollouts, tiny_model, budget=0.5)
    train = rollouts.subset(split_by_prompt(rollouts.prompt, 0.2, SMALL_FIT.seed))
    config = critic.config

    torch.testing.assert_close(critic.hidden_mean, train.hidden.mean(0))
    assert config.reward_mean == pytest.approx(float(train.final_reward.mean()))
    assert config.cost_mean == pytest.approx(float(train.prefix_cost.mean()))
    assert config.z_scale == pytest.approx(float(train.final_cost.std(correction=0)))
    low, high = config.budget_range
    assert low <= 0.5 <= high
    assert low == min(0.5, float(train.final_cost.min()))
    assert high == max(0.5, float(train.final_cost.max()))
    assert (config.budget, config.block_size, config.width) == (0.5, BLOCK, SMALL_FIT.width)
    assert config.fingerprint == ModelFingerprint.of(tiny_model)


def test_fit_is_deterministic_and_early_stopping_keeps_the_best_epoch(
    lm, tiny_model, keyword_cost, length_reward
):
    rollouts = roll_out(lm, keyword_cost, length_reward)
    impatient = SMALL_FIT.model_copy(update={"patience": 2})
    critic, report = fit(rollouts, tiny_model, impatient)
    again, report_again = fit(rollouts, tiny_model, impatient)
    assert report.train_loss == report_again.train_loss
    assert report.epochs_run < SMALL_FIT.epochs
    assert report.epochs_run - report.best_epoch == 2
    # The returned weights are those after the best epoch: a run that stops there agrees.
    stopped = SMALL_FIT.model_copy(update={"epochs": report.best_epoch})
    at_best, _ = fit(rollouts, tiny_model, stopped)
    for name, tensor in critic.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
        assert torch.equal(tensor, at_best.state_dict()[name]), name


def test_without_a_cost_probe_the_critic_has_none_and_reports_none(
    lm, tiny_model, keyword_cost, length_reward
):
    rollouts = roll_out(lm, keyword_cost, length_reward)
    settings = SMALL_FIT.model_copy(update={"cost_probe": False, "epochs": 2})
    critic, report = fit(rollouts, tiny_model, settings)
    assert not critic.has_cost_probe
    assert report.probe_mae is None and report.probe_over_budget_accuracy is None


def test_fit_needs_two_prompts_and_valid_settings(lm, tiny_model, keyword_cost, length_reward):
    one_prompt = roll_out(lm, keyword_cost, length_reward, prompts=PROMPTS[:1])
    with pytest.raises(CriticTrainingError, match=r"at least 2 distinct prompts.*got 1"):
        fit(one_prompt, tiny_model)
    with pytest.raises(ValueError, match="validation_fraction"):
        CriticTrainingSettings(validation_fraction=1.0)
    with pytest.raises(ValueError, match="extra"):
        CriticTrainingSettings(epoch=3)


# ------------------------------------------------------------------ train + save
def test_trained_critic_saves_and_loads_bit_exact(
    lm, tiny_model, keyword_cost, length_reward, tmp_path
):
    settings = SMALL_FIT.model_copy(update={"epochs": 5})
    critic, report = train_critic(
        lm,
        PROMPTS,
        keyword_cost,
        length_reward,
        out=tmp_path / "critic",
        budget=1.0,
        block_size=BLOCK,
        max_new_tokens=TOKENS,
        samples_per_prompt=SAMPLES,
        settings=settings,
        progress=False,
    )
    assert {p.name for p in (tmp_path / "critic").iterdir()} == {WEIGHTS_FILE, CONFIG_FILE}
    loaded = LatentCritic.load(tmp_path / "critic")
    assert loaded.config == critic.config
    assert loaded.config.training == report.as_dict()
    assert critic.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in critic.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    rollouts = roll_out(lm, keyword_cost, length_reward, seed=3)
    z = 1.0 - rollouts.prefix_cost
    expected, actual = critic.predict(rollouts.hidden, z), loaded.predict(rollouts.hidden, z)
    assert torch.equal(expected.p_safe, actual.p_safe)
    assert torch.equal(expected.r_hat, actual.r_hat)
    assert torch.equal(critic.probe_cost(rollouts.hidden), loaded.probe_cost(rollouts.hidden))
    loaded.check_base_model(tiny_model)


def test_train_critic_checks_the_prompt_count_before_decoding(lm, keyword_cost, length_reward):
    cost = CountingScorer(keyword_cost)
    with pytest.raises(CriticTrainingError, match="at least 2"):
        train_critic(lm, PROMPTS[:1], cost, length_reward, out=None, budget=0.0, progress=False)
    assert cost.calls == []


# --------------------------------------------------------- safeguard train-critic
SMALL_RUN = [
    "--block-size", str(BLOCK),
    "--max-new-tokens", str(TOKENS),
    "--samples-per-prompt", str(SAMPLES),
    "--epochs", "3",
    "--width", "32",
    "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def test_train_critic_command_saves_a_loadable_critic_and_prints_its_metrics(
    tiny_model_dir, tiny_reward_model_dir, prompt_file, frequent_words, tmp_path, capsys
):
    out = tmp_path / "critic"
    code = main([
        "train-critic",
        "--model", str(tiny_model_dir),
        "--cost-keywords", ",".join(frequent_words),
        "--reward-model", str(tiny_reward_model_dir),
        "--prompts", str(prompt_file),
        "--out", str(out),
        "--budget", "1",
        *SMALL_RUN,
    ])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert "held-out prompts · budget 1" in captured.out
    assert "p_safe Brier" in captured.out
    assert f"saved the critic to {out}" in captured.err
    critic = LatentCritic.load(out)
    assert (critic.config.budget, critic.config.block_size, critic.config.width) == (1.0, 4, 32)
    assert critic.has_cost_probe
    assert critic.config.training["epochs_run"] <= 3
    assert critic.config.training["validation_prompts"] == 1


def test_train_critic_command_takes_cost_and_reward_models_by_their_short_flags(
    tiny_model_dir, tiny_reward_model_dir, prompt_file, tmp_path, capsys
):
    out = tmp_path / "critic"
    code = main([
        "train-critic",
        "--model", str(tiny_model_dir),
        "--cost", str(tiny_reward_model_dir),  # any classifier serves as a cost model
        "--reward", str(tiny_reward_model_dir),
        "--prompts", str(prompt_file),
        "--out", str(out),
        *SMALL_RUN,
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert LatentCritic.load(out).config.fingerprint.name == str(tiny_model_dir)


def test_train_critic_command_defaults_to_the_demo_world(
    tiny_model, tiny_tokenizer, keyword_cost, length_reward, monkeypatch, tmp_path, capsys
):
    world = types.SimpleNamespace(
        model=tiny_model,
        tokenizer=tiny_tokenizer,
        cost=keyword_cost,
        reward=length_reward,
        prompts={"train": PROMPTS, "test": ["not for training"]},
        budget=2.5,
    )
    demo = types.ModuleType("inference_safeguard.demo")
    demo.load_demo_world = lambda device: world
    monkeypatch.setitem(sys.modules, "inference_safeguard.demo", demo)

    out = tmp_path / "critic"
    assert main(["train-critic", "--out", str(out), "--no-cost-probe", *SMALL_RUN]) == 0
    critic = LatentCritic.load(out)
    assert critic.config.budget == 2.5
    assert not critic.has_cost_probe
    training = critic.config.training
    assert training["train_prompts"] + training["validation_prompts"] == len(PROMPTS)
    assert "probe MAE" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "{model}", "--prompts", "{prompts}", "--cost-keywords", "dog"],
         "--model needs a reward model"),
        (["--model", "{model}", "--prompts", "{prompts}", "--reward-model", "{reward}"],
         "--model needs a cost"),
        (["--model", "{model}", "--cost-keywords", "dog", "--reward-model", "{reward}"],
         "--model needs --prompts"),
        (["--model", "{model}", "--prompts", "{empty}", "--cost-keywords", "dog",
          "--reward-model", "{reward}"],
         "holds no prompts"),
        (["--model", "{model}", "--prompts", "{one}", "--cost-keywords", "dog",
          "--reward-model", "{reward}"],
         "needs rollouts of at least 2 distinct prompts"),
        (["--model", "{model}", "--prompts", "{prompts}", "--cost-keywords", "dog",
          "--reward-model", "{tmp}/missing"],
         "cannot load --reward-model"),
        (["--validation-fraction", "1.5"], "invalid training settings: --validation-fraction"),
        (["--cost-keywords", "dog", "--cost-model", "{reward}"], "give one cost"),
    ],
)  # fmt: skip
def test_train_critic_command_explains_bad_input_without_a_traceback(
    flags, message, tiny_model_dir, tiny_reward_model_dir, prompt_file, tmp_path, capsys
):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "one.jsonl").write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    paths = {
        "model": tiny_model_dir,
        "reward": tiny_reward_model_dir,
        "prompts": prompt_file,
        "empty": tmp_path / "empty.jsonl",
        "one": tmp_path / "one.jsonl",
        "tmp": tmp_path,
    }
    argv = [flag.format(**paths) for flag in flags]
    assert main(["train-critic", *argv, "--out", str(tmp_path / "out"), *SMALL_RUN]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    last = captured.err.splitlines()[-1]
    assert last.startswith("safeguard: error: ")
    assert message in last
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--temperature", "0"],
        ["--temperature", "1e-300"],
        ["--samples-per-prompt", "0"],
        ["--budget", "nan"],
        [],
    ],
)
def test_train_critic_command_rejects_bad_numbers_and_needs_out(flags, capsys):
    argv = ["train-critic", *flags]
    if flags:
        argv += ["--out", "somewhere"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: safeguard train-critic" in err
    assert "Traceback" not in err
