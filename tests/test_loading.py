"""Loading checkpoints: the wrong kind of checkpoint, a device or dtype this machine
cannot provide, and paths that hold nothing loadable each raise a typed error that says
what was expected (no network: everything is built locally)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from inference_safeguard import (
    CheckpointKindError,
    InferenceGuard,
    LoadOptionError,
    ModelLoadError,
    SafeguardError,
    loading,
)
from inference_safeguard.critic import LatentCritic
from inference_safeguard.lm import CausalLM
from inference_safeguard.loading import check_kind, resolve_device, resolve_dtype
from inference_safeguard.scorers import ClassifierScorer, GuardModelCost, KeywordCost
from inference_safeguard.testing import build_random_critic, build_tiny_classifier

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def tied_classifier_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A classifier whose config ties the embeddings, so that a causal LM loaded from it
    reports no missing LM head: only its architecture gives it away."""
    path = tmp_path_factory.mktemp("tied-classifier")
    model = build_tiny_classifier(tiny_tokenizer)
    model.config.tie_word_embeddings = True
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------ wrong-kind checkpoints
def test_a_causal_lm_is_not_loaded_as_a_classifier_scorer(tiny_model_dir):
    with pytest.raises(CheckpointKindError) as error:
        ClassifierScorer.from_pretrained(str(tiny_model_dir))
    message = str(error.value)
    assert "holds a causal LM (LlamaForCausalLM)" in message
    assert "ClassifierScorer needs a sequence-classification checkpoint" in message
    assert "trained score head" in message and "score.weight randomly initialised" in message
    assert isinstance(error.value, SafeguardError) and isinstance(error.value, ValueError)


@pytest.mark.parametrize(
    "load",
    [
        lambda path: CausalLM.from_pretrained(path),
        lambda path: InferenceGuard.from_pretrained(path, cost=KeywordCost(["bomb"])),
        lambda path: GuardModelCost.from_pretrained(path),
    ],
    ids=["CausalLM", "InferenceGuard", "GuardModelCost"],
)
def test_a_classifier_is_not_loaded_as_a_causal_lm(tiny_reward_model_dir, load):
    with pytest.raises(CheckpointKindError) as error:
        load(str(tiny_reward_model_dir))
    message = str(error.value)
    assert "holds a sequence classifier (LlamaForSequenceClassification)" in message
    assert "needs a causal-LM checkpoint" in message
    assert "lm_head.weight randomly initialised" in message
    assert "ClassifierScorer" in message


def test_a_classifier_with_tied_embeddings_is_not_loaded_as_a_causal_lm(tied_classifier_dir):
    with pytest.raises(CheckpointKindError, match=r"sequence classifier .*needs a causal-LM"):
        CausalLM.from_pretrained(str(tied_classifier_dir))


def test_models_of_the_wrong_kind_are_rejected_when_built_from_objects(tiny_model, tiny_tokenizer):
    classifier = build_tiny_classifier(tiny_tokenizer)
    with pytest.raises(CheckpointKindError, match="LlamaForSequenceClassification, which has no"):
        InferenceGuard(classifier, tiny_tokenizer, cost=KeywordCost(["bomb"]))
    with pytest.raises(CheckpointKindError, match="LlamaForCausalLM, a causal LM"):
        ClassifierScorer(tiny_model, tiny_tokenizer)


def test_checkpoints_of_the_right_kind_still_load(tiny_model_dir, tiny_reward_model_dir):
    assert CausalLM.from_pretrained(str(tiny_model_dir), device="cpu").vocab_size > 0
    scorer = ClassifierScorer.from_pretrained(str(tiny_reward_model_dir), device="cpu")
    again = ClassifierScorer.from_pretrained(str(tiny_reward_model_dir), device="cpu")
    assert scorer(["p"], ["r"]).tolist() == again(["p"], ["r"]).tolist()
    assert GuardModelCost.from_pretrained(str(tiny_model_dir)).verdict_token_ids


@pytest.mark.parametrize(
    "info",
    [
        {"missing_keys": ["score.weight"], "unexpected_keys": [], "mismatched_keys": []},
        {"missing_keys": {"score.weight"}, "unexpected_keys": set(), "mismatched_keys": set()},
        {"missing_keys": set(), "mismatched_keys": {("score.weight", (1, 64), (2, 64))}},
        {"missing_keys": [], "mismatched_keys": ["score.weight"]},
        type("Info", (), {"missing_keys": {"score.weight"}, "mismatched_keys": set()})(),
    ],
    ids=["lists", "sets", "mismatch-tuples", "mismatch-names", "object"],
)
def test_every_shape_of_loading_info_reveals_new_weights(tiny_reward_model_dir, info):
    model = ClassifierScorer.from_pretrained(str(tiny_reward_model_dir)).model
    with pytest.raises(CheckpointKindError, match=r"score\.weight randomly initialised"):
        check_kind(model, info, "x", kind="sequence-classification", owner="ClassifierScorer")
    check_kind(model, {"missing_keys": []}, "x", kind="sequence-classification", owner="C")
    check_kind(model, {}, "x", kind="sequence-classification", owner="C")


# ---------------------------------------------------------------- device and dtype
@NO_CUDA
@pytest.mark.parametrize(
    "load",
    [
        lambda path, device: CausalLM.from_pretrained(path, device=device),
        lambda path, device: InferenceGuard.from_pretrained(
            path, cost=KeywordCost(["bomb"]), device=device
        ),
        lambda path, device: GuardModelCost.from_pretrained(path, device=device),
    ],
)
def test_cuda_on_a_machine_without_it_is_a_load_option_error(tiny_model_dir, load):
    with pytest.raises(LoadOptionError, match="'cuda' is not available on this machine"):
        load(str(tiny_model_dir), "cuda")


@pytest.mark.parametrize("device", ["cuda:99", "tpu", "gpu", "cuda:-1"])
def test_devices_this_machine_lacks_are_load_option_errors(tiny_model_dir, device):
    with pytest.raises(LoadOptionError, match="device"):
        CausalLM.from_pretrained(str(tiny_model_dir), device=device)


@NO_CUDA
def test_scorers_and_critics_given_cuda_without_it_raise_load_option_error(
    tiny_reward_model_dir, tiny_model, tiny_tokenizer, tmp_path
):
    model = build_tiny_classifier(tiny_tokenizer)
    with pytest.raises(LoadOptionError, match="pass device='cpu'"):
        ClassifierScorer(model, tiny_tokenizer, device="cuda")
    with pytest.raises(LoadOptionError):
        ClassifierScorer.from_pretrained(str(tiny_reward_model_dir), device="cuda")
    saved = build_random_critic(tiny_model).save(tmp_path / "critic")
    with pytest.raises(LoadOptionError):
        LatentCritic.load(saved, device="cuda")


@pytest.mark.parametrize("dtype", ["float33", "int8", torch.int64, "bool", "cuda"])
def test_a_dtype_that_is_not_a_floating_torch_dtype_is_a_load_option_error(
    tiny_model_dir, tiny_reward_model_dir, dtype
):
    with pytest.raises(LoadOptionError, match="not a floating torch dtype"):
        CausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype)
    with pytest.raises(LoadOptionError, match="'float32', 'bfloat16'"):
        ClassifierScorer.from_pretrained(str(tiny_reward_model_dir), dtype=dtype)


def test_dtype_names_and_devices_resolve():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    assert resolve_dtype("auto") == "auto" and resolve_dtype(None) is None
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) is None


# ------------------------------------------------------------------ paths and files
@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "../x/y", "a/b/c", "~/nope"])
def test_a_missing_local_path_says_so_instead_of_blaming_the_repo_id(name):
    with pytest.raises(ModelLoadError, match="no such directory") as error:
        CausalLM.from_pretrained(name)
    assert "Repo id" not in str(error.value)
    assert isinstance(error.value, OSError)


def test_a_hub_name_that_cannot_be_loaded_is_a_model_load_error(monkeypatch):
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match="not a local directory, and as a hub name: We"):
        ClassifierScorer.from_pretrained("no-such-org/no-such-model")


def test_a_directory_without_a_checkpoint_or_a_file_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"holds no config\.json"):
        CausalLM.from_pretrained(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match="is a file"):
        CausalLM.from_pretrained(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("keep", [0.5, 100 / 1e9])
def test_truncated_safetensors_are_a_model_load_error(tiny_model_dir, tmp_path, keep):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(int(len(data) * keep), 100)])
    with pytest.raises(ModelLoadError, match="incomplete or corrupted"):
        CausalLM.from_pretrained(str(copy))


def test_a_checkpoint_without_weights_is_a_model_load_error(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="cannot load the model of"):
        CausalLM.from_pretrained(str(copy))
