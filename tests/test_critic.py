"""The latent critic: its files, its fit to a base model, and InferenceGuard's critic mode."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from conftest import OTHER_PROMPT, PROMPT
from safetensors.torch import load_file, save_file

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.critic import (
    CONFIG_FILE,
    MAX_SIZE,
    WEIGHTS_FILE,
    LatentCritic,
    ModelFingerprint,
    config_sha256,
)
from inference_safeguard.errors import (
    CriticFileError,
    CriticMismatchError,
    CriticMismatchWarning,
    MissingCriticError,
)
from inference_safeguard.scorers import CallableScorer
from inference_safeguard.testing import build_random_critic, build_tiny_llama

CONFIG = GuardConfig(
    num_candidates=8, beam_width=2, block_size=4, max_new_tokens=16, seed=0, budget=0.0
)


@pytest.fixture()
def critic(tiny_model) -> LatentCritic:
    return build_random_critic(tiny_model, budget=0.0, block_size=4)


@pytest.fixture()
def saved_critic(critic, tmp_path):
    return critic.save(tmp_path / "critic", training={"note": "test"})


class CountingScorer(CallableScorer):
    """A cost scorer that counts the texts it scored."""

    def __init__(self, inner) -> None:
        super().__init__(self._score)
        self.inner = inner
        self.texts = 0

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        self.texts += len(responses)
        return self.inner(prompts, responses)


def rewrite_config(directory, **changes) -> None:
    """Change entries of a saved critic.json and record its new checksum, as a file
    written that way (not corrupted in transit) would have."""
    path = directory / CONFIG_FILE
    data = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({**data, "config_sha256": config_sha256(data)}))


def rewrite_weights(directory, tensors) -> None:
    """Replace the weights and record their checksums, as `save` would have."""
    weights = directory / WEIGHTS_FILE
    save_file(tensors, weights)
    rewrite_config(directory, weights_sha256=_sha256(weights))


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------- files
def test_save_and_load_are_bit_exact(critic, saved_critic):
    loaded = LatentCritic.load(saved_critic)
    original, restored = critic.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    assert loaded.config == critic.config
    assert loaded.config.training == {"note": "test"}
    hidden, z = torch.randn(5, critic.config.hidden_size), torch.linspace(-1, 1, 5)
    assert torch.equal(critic.predict(hidden, z).p_safe, loaded.predict(hidden, z).p_safe)
    assert torch.equal(critic.probe_cost(hidden), loaded.probe_cost(hidden))


def test_saved_files_are_safetensors_and_json_only(saved_critic):
    assert sorted(p.name for p in saved_critic.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE])
    config = json.loads((saved_critic / CONFIG_FILE).read_text())
    assert set(config["fingerprint"]) == {"name", "config_hash", "vocab_size"}
    assert len(config["weights_sha256"]) == 64


def test_a_flipped_byte_in_the_weights_is_rejected(saved_critic):
    weights = saved_critic / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CriticFileError, match="corrupted"):
        LatentCritic.load(saved_critic)


def test_a_truncated_weights_file_is_rejected_even_with_a_matching_checksum(saved_critic):
    weights = saved_critic / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    rewrite_config(saved_critic, weights_sha256=_sha256(weights))
    with pytest.raises(CriticFileError, match="not a readable safetensors file"):
        LatentCritic.load(saved_critic)


@pytest.mark.parametrize(
    "change",
    [{"budget": 5.0}, {"z_scale": 1e-6}, {"weights_sha256": ""}, {"config_sha256": ""}],
)
def test_an_edited_or_damaged_config_fails_its_own_checksum(saved_critic, change):
    path = saved_critic / CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(CriticFileError, match=r"critic.json is corrupted"):
        LatentCritic.load(saved_critic)


def test_the_config_checksum_ignores_indentation(saved_critic):
    path = saved_critic / CONFIG_FILE
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4))
    assert LatentCritic.load(saved_critic).config.budget == 0.0


def test_a_critic_file_without_a_config_checksum_asks_for_a_retrain(saved_critic):
    path = saved_critic / CONFIG_FILE
    data = json.loads(path.read_text())
    del data["config_sha256"]
    path.write_text(json.dumps({**data, "format_version": 1}))
    with pytest.raises(CriticFileError, match=r"format version 1.*retrain the critic"):
        LatentCritic.load(saved_critic)


@pytest.mark.parametrize(
    "sizes",
    [{"hidden_size": 2**40}, {"width": 2**40}, {"hidden_size": MAX_SIZE + 1}],
)
def test_sizes_beyond_the_bound_are_rejected_before_allocating(saved_critic, sizes):
    rewrite_config(saved_critic, **sizes)
    with pytest.raises(CriticFileError, match="less than or equal to 1048576"):
        LatentCritic.load(saved_critic)


def test_sizes_within_the_bound_that_the_tensors_lack_are_never_allocated(saved_critic):
    # A critic of this size would take 4 TiB; the file's tensors decide before any allocation.
    rewrite_config(saved_critic, hidden_size=MAX_SIZE, width=MAX_SIZE)
    with pytest.raises(CriticFileError, match="do not fit"):
        LatentCritic.load(saved_critic)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["trunk.0.weight", "safe_head.bias", "hidden_mean"])
def test_non_finite_weights_with_matching_checksums_are_rejected(saved_critic, name, value):
    tensors = load_file(saved_critic / WEIGHTS_FILE)
    tensors[name] = torch.full_like(tensors[name], value)
    rewrite_weights(saved_critic, tensors)
    with pytest.raises(CriticFileError, match=rf"non-finite values \(NaN or inf\) in {name}"):
        LatentCritic.load(saved_critic)


def test_a_zero_hidden_std_is_rejected(saved_critic):
    tensors = load_file(saved_critic / WEIGHTS_FILE)
    tensors["hidden_std"][0] = 0.0
    rewrite_weights(saved_critic, tensors)
    with pytest.raises(CriticFileError, match="hidden_std that is not positive"):
        LatentCritic.load(saved_critic)


def test_non_finite_config_values_are_rejected(saved_critic):
    path = saved_critic / CONFIG_FILE
    data = {**json.loads(path.read_text()), "reward_mean": float("nan")}
    path.write_text(json.dumps({**data, "config_sha256": config_sha256(data)}))
    with pytest.raises(CriticFileError, match=r"not a valid critic config.*finite"):
        LatentCritic.load(saved_critic)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / CONFIG_FILE).write_text("{not json"), "not valid JSON"),
        (lambda d: (d / CONFIG_FILE).write_text('{"hidden_size": 3}'), "corrupted"),
        (lambda d: (d / CONFIG_FILE).write_text("[1, 2]"), "not a critic config object"),
        (lambda d: rewrite_config(d, block_size=0), "not a valid critic config"),
        (lambda d: (d / CONFIG_FILE).unlink(), "no critic.json"),
        (lambda d: (d / WEIGHTS_FILE).unlink(), "no critic.safetensors"),
    ],
)
def test_damaged_critic_files_are_rejected_with_clear_errors(saved_critic, damage, message):
    damage(saved_critic)
    with pytest.raises(CriticFileError, match=message):
        LatentCritic.load(saved_critic)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 32}, "do not fit"),  # the checksum still matches: the tensors are intact
        ({"format_version": 99}, "format version 99"),
    ],
)
def test_a_config_that_does_not_describe_the_weights_is_rejected(saved_critic, change, message):
    rewrite_config(saved_critic, **change)
    with pytest.raises(CriticFileError, match=message):
        LatentCritic.load(saved_critic)


# ----------------------------------------------------------- base-model fit
def test_a_critic_for_another_base_model_is_rejected(saved_critic, tiny_tokenizer, keyword_cost):
    other = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(CriticMismatchError, match="hidden size 32") as error:
        InferenceGuard(other, tiny_tokenizer, cost=keyword_cost, critic=str(saved_critic))
    assert "safeguard train-critic" in str(error.value)


def test_a_model_with_another_architecture_config_is_rejected(
    critic, tiny_model, tiny_tokenizer, keyword_cost
):
    other = build_tiny_llama(tiny_tokenizer, max_position_embeddings=1024)
    assert other.config.hidden_size == tiny_model.config.hidden_size
    with pytest.raises(CriticMismatchError, match="architecture config differs"):
        InferenceGuard(other, tiny_tokenizer, cost=keyword_cost, critic=critic)


def test_a_local_copy_of_the_named_model_is_accepted(
    critic, tiny_model, tiny_tokenizer, keyword_cost, monkeypatch
):
    critic.set_base_model_name("org/m")
    monkeypatch.setattr(tiny_model.config, "_name_or_path", "/models/m/")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InferenceGuard(tiny_model, tiny_tokenizer, cost=keyword_cost, critic=critic, config=CONFIG)


def test_fingerprint_ignores_how_the_model_was_loaded(tiny_model):
    before = ModelFingerprint.of(tiny_model)
    tiny_model.config.use_cache = not tiny_model.config.use_cache
    try:
        assert ModelFingerprint.of(tiny_model) == before
    finally:
        tiny_model.config.use_cache = not tiny_model.config.use_cache


def test_another_checkpoint_of_the_same_architecture_is_rejected_until_renamed(
    critic, tiny_model, tiny_tokenizer, keyword_cost, monkeypatch
):
    monkeypatch.setattr(tiny_model.config, "_name_or_path", "/models/my-finetune")
    critic.set_base_model_name("org/base-model")
    with pytest.raises(CriticMismatchError, match=r"org/base-model.*/models/my-finetune"):
        InferenceGuard(tiny_model, tiny_tokenizer, cost=keyword_cost, critic=critic, config=CONFIG)
    critic.set_base_model_name("/models/my-finetune")
    InferenceGuard(tiny_model, tiny_tokenizer, cost=keyword_cost, critic=critic, config=CONFIG)


def test_critic_must_be_a_critic_or_a_directory(tiny_model, tiny_tokenizer, keyword_cost):
    with pytest.raises(TypeError, match="LatentCritic or the directory"):
        InferenceGuard(tiny_model, tiny_tokenizer, cost=keyword_cost, critic=object())


# ------------------------------------------------------------- critic mode
def test_critic_mode_without_a_critic_is_a_clear_error(tiny_model, tiny_tokenizer, keyword_cost):
    with pytest.raises(MissingCriticError, match="safeguard train-critic"):
        InferenceGuard(
            tiny_model, tiny_tokenizer, cost=keyword_cost, config=GuardConfig(scorer="critic")
        )
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=keyword_cost, config=CONFIG)
    with pytest.raises(MissingCriticError):
        guard.generate(PROMPT, scorer="critic")


def test_auto_scorer_uses_the_critic_and_models_mode_does_not(
    critic, tiny_model, tiny_tokenizer, keyword_cost, monkeypatch
):
    calls = []
    predict = critic.predict
    monkeypatch.setattr(critic, "predict", lambda h, z: calls.append(len(z)) or predict(h, z))
    guard = InferenceGuard(
        tiny_model, tiny_tokenizer, cost=keyword_cost, critic=critic, config=CONFIG
    )
    guard.generate(PROMPT, scorer="models")
    assert calls == []
    result = guard.generate(PROMPT)
    assert sum(calls) >= result.stats.candidates_scored


def test_the_cost_probe_keeps_the_cost_model_out_of_the_search(
    critic, tiny_model, tiny_tokenizer, keyword_cost
):
    counted = CountingScorer(keyword_cost)
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=counted, critic=critic, config=CONFIG)
    models = guard.generate(PROMPT, scorer="models", on_unsafe="return")
    models_texts, counted.texts = counted.texts, 0
    guard.generate(PROMPT, on_unsafe="return")
    # The search scored every candidate with the cost model in models mode; with the
    # probe, the cost model checks about the beam_width candidates kept per step.
    assert models_texts >= models.stats.candidates_scored
    assert counted.texts < models_texts / 2
    counted.texts = 0
    probe_off = guard.generate(PROMPT, cost_probe=False, on_unsafe="return")
    assert counted.texts >= probe_off.stats.candidates_scored


@pytest.mark.parametrize("cost_probe", [True, False])
def test_critic_guided_search_returns_no_over_budget_response(
    critic, tiny_model, tiny_tokenizer, keyword_cost, cost_probe
):
    guard = InferenceGuard(
        tiny_model, tiny_tokenizer, cost=keyword_cost, critic=critic, config=CONFIG
    )
    results = []
    for seed in range(8):
        results += guard.generate_batch([PROMPT, OTHER_PROMPT], seed=seed, cost_probe=cost_probe)
    for result in results:
        assert result.refused or (result.safe and result.cost <= CONFIG.budget)
        # Whatever was returned, the real cost model agrees with its record.
        assert float(keyword_cost([""], [result.text])[0]) <= result.cost or result.refused
    if not cost_probe:  # the cost model steers the search, as in models mode
        assert sum(r.refused for r in results) <= len(results) // 4


def test_with_the_probe_kept_candidates_carry_the_cost_models_cost(
    critic, tiny_model, tiny_tokenizer, keyword_cost, monkeypatch
):
    # A probe that calls everything safe: only the cost model's checks of the kept
    # candidates stand between the search and over-budget text.
    monkeypatch.setattr(critic, "probe_cost", lambda hidden: torch.zeros(len(hidden)))
    counted = CountingScorer(keyword_cost)
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=counted, critic=critic, config=CONFIG)
    for seed in range(6):
        result = guard.generate(PROMPT, seed=seed)
        assert result.refused or result.cost <= CONFIG.budget
        assert result.refused or float(keyword_cost([PROMPT], [result.text])[0]) == result.cost
    assert counted.texts > 0


def test_critic_mode_streams_exactly_what_it_returns(
    critic, tiny_model, tiny_tokenizer, keyword_cost
):
    guard = InferenceGuard(
        tiny_model, tiny_tokenizer, cost=keyword_cost, critic=critic, config=CONFIG
    )
    stream = guard.stream(PROMPT)
    text = "".join(stream)
    assert text == stream.result.text
    assert guard.generate(PROMPT).text == text


def test_settings_outside_the_critics_training_warn_once(
    critic, tiny_model, tiny_tokenizer, keyword_cost
):
    guard = InferenceGuard(
        tiny_model, tiny_tokenizer, cost=keyword_cost, critic=critic, config=CONFIG
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.generate(PROMPT)
    with pytest.warns(CriticMismatchWarning, match="block_size=8"):
        guard.generate(PROMPT, block_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.generate(PROMPT, block_size=8)
