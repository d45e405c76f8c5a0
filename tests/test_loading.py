"""Loading options through every public loader: model_kwargs, tokenizer_kwargs, device
maps as strings or dicts, `.gguf` paths, and no `.to()` on models transformers placed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import transformers
from transformers.utils import is_accelerate_available

from inference_safeguard import InferenceGuard
from inference_safeguard.cli import main
from inference_safeguard.loading import is_placed, split_gguf_path, tokenizer_options
from inference_safeguard.scorers import ClassifierScorer, GuardModelCost, KeywordCost


@pytest.fixture()
def load_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    """The keyword arguments of every model and tokenizer `from_pretrained` call."""
    calls: dict[str, list[dict[str, Any]]] = {"model": [], "tokenizer": []}

    def spy(kind: str, original: Any) -> Any:
        def load(cls: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
            calls[kind].append({"name": str(name), **kwargs})
            # A local directory has no revisions; the hub would resolve this one.
            kwargs.pop("revision", None)
            return original.__func__(cls, name, *args, **kwargs)

        return classmethod(load)

    for auto in (
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForSequenceClassification,
    ):
        monkeypatch.setattr(auto, "from_pretrained", spy("model", auto.from_pretrained))
    tokenizer_load = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", spy("tokenizer", tokenizer_load)
    )
    return calls


@pytest.fixture()
def no_moves(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records every `PreTrainedModel.to` call."""
    moves: list[Any] = []
    original = transformers.PreTrainedModel.to

    def to(self: Any, *args: Any, **kwargs: Any) -> Any:
        moves.append(args or kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "to", to)
    return moves


@pytest.fixture()
def accelerate() -> None:
    """transformers needs accelerate (at a version it accepts) for any device_map."""
    if not is_accelerate_available():
        pytest.skip("device_map needs accelerate at the version transformers asks for")


def test_model_kwargs_reach_the_model_and_checkpoint_options_the_tokenizer(
    tiny_model_dir, load_calls
):
    guard = InferenceGuard.from_pretrained(
        str(tiny_model_dir),
        cost=KeywordCost(["x"]),
        device="cpu",
        model_kwargs={"attn_implementation": "eager", "revision": "v1"},
        tokenizer_kwargs={"use_fast": True},
    )
    assert guard.lm.model.config._attn_implementation == "eager"
    [model_call] = load_calls["model"]
    [tokenizer_call] = load_calls["tokenizer"]
    assert model_call["revision"] == "v1" and model_call["attn_implementation"] == "eager"
    assert model_call["trust_remote_code"] is False
    assert tokenizer_call["revision"] == "v1" and tokenizer_call["use_fast"] is True
    assert "attn_implementation" not in tokenizer_call
    assert tokenizer_call["trust_remote_code"] is False


def test_gguf_file_in_model_kwargs_reaches_the_tokenizer_too():
    assert tokenizer_options({"gguf_file": "m.gguf", "quantization_config": object()}, None) == {
        "gguf_file": "m.gguf"
    }
    assert tokenizer_options({"gguf_file": "m.gguf"}, {"gguf_file": "t.gguf"}) == {
        "gguf_file": "t.gguf"
    }


def test_a_gguf_path_splits_into_directory_and_gguf_file(tmp_path: Path):
    path = tmp_path / "model.Q4_1.gguf"
    path.write_bytes(b"GGUF")
    assert split_gguf_path(str(path), None) == (str(tmp_path), {"gguf_file": "model.Q4_1.gguf"})
    assert split_gguf_path("org/model", {"revision": "main"}) == (
        "org/model",
        {"revision": "main"},
    )
    with pytest.raises(ValueError, match="gguf_file"):
        split_gguf_path(str(path), {"gguf_file": "other.gguf"})


def test_trust_remote_code_has_one_switch(tiny_model_dir):
    with pytest.raises(TypeError, match="trust_remote_code"):
        InferenceGuard.from_pretrained(
            str(tiny_model_dir),
            cost=KeywordCost(["x"]),
            model_kwargs={"trust_remote_code": True},
        )


def test_a_device_mapped_model_is_not_moved(tiny_model_dir, no_moves, accelerate):
    guard = InferenceGuard.from_pretrained(
        str(tiny_model_dir), cost=KeywordCost(["x"]), device_map={"": "cpu"}
    )
    # (A single-device map sets no `hf_device_map`; a multi-device one needs GPUs.)
    assert guard.lm.device == torch.device("cpu")
    assert no_moves == []
    assert guard.generate("Tell me", max_new_tokens=4, seed=0).stats.completion_tokens > 0


def test_a_model_without_device_map_is_moved_to_the_device(tiny_model_dir, no_moves):
    guard = InferenceGuard.from_pretrained(str(tiny_model_dir), cost=KeywordCost(["x"]))
    assert not is_placed(guard.lm.model)
    assert no_moves


def test_quantized_and_device_mapped_models_count_as_placed(tiny_model):
    class Quantized(torch.nn.Module):
        is_quantized = True

    class Sharded(torch.nn.Module):
        hf_device_map: ClassVar = {"model.layers.0": 0, "model.layers.1": 1}

    class FourBit(torch.nn.Module):
        is_loaded_in_4bit = True

    assert is_placed(Quantized()) and is_placed(Sharded()) and is_placed(FourBit())
    assert not is_placed(tiny_model)


def test_scorer_loaders_take_device_map_and_model_kwargs(
    tiny_reward_model_dir, tiny_model_dir, load_calls, no_moves, accelerate
):
    scorer = ClassifierScorer.from_pretrained(
        str(tiny_reward_model_dir),
        device="cpu",
        device_map="cpu",
        model_kwargs={"attn_implementation": "eager"},
    )
    assert scorer.model.config._attn_implementation == "eager"
    guard_cost = GuardModelCost.from_pretrained(
        str(tiny_model_dir),
        device_map={"": "cpu"},
        model_kwargs={"revision": "r2"},
        template="{prompt} {response} verdict:",
        safe_token="the",
        unsafe_token="dog",
    )
    assert guard_cost.model.config.name_or_path == str(tiny_model_dir)
    assert [call["revision"] for call in load_calls["tokenizer"][-1:]] == ["r2"]
    assert no_moves == []


def test_the_cli_takes_model_kwargs_as_json(tiny_model_dir, load_calls, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--model-kwargs",
            '{"attn_implementation": "eager", "revision": "main"}',
            "--prompt",
            "Tell me",
            "--cost-keywords",
            "zzz",
            "--max-new-tokens",
            "4",
            "--seed",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    [model_call] = load_calls["model"]
    assert model_call["attn_implementation"] == "eager" and model_call["revision"] == "main"
    assert load_calls["tokenizer"][0]["revision"] == "main"


def test_the_cli_rejects_model_kwargs_that_are_not_a_json_object(tiny_model_dir, capsys):
    code = main(["generate", "--model", str(tiny_model_dir), "--model-kwargs", "[1]"])
    assert code != 0
    assert "JSON object" in capsys.readouterr().err


def test_langchain_models_pass_loading_options(tiny_model_dir, load_calls, no_moves, accelerate):
    from langchain_safeguard import ChatSafeguard, SafeguardLLM
    from langchain_safeguard._loading import clear_model_cache

    clear_model_cache()
    chat = ChatSafeguard.from_model_id(
        str(tiny_model_dir),
        cost=KeywordCost(["x"]),
        device_map={"": "cpu"},
        model_kwargs={"attn_implementation": "eager"},
        tokenizer_kwargs={"use_fast": True},
    )
    guard = chat.load_guard()
    assert guard.lm.model.config._attn_implementation == "eager"
    assert load_calls["tokenizer"][-1]["use_fast"] is True
    assert no_moves == []
    # Equal options share one loaded model; other options load another.
    same = SafeguardLLM(
        model=str(tiny_model_dir),
        cost=KeywordCost(["x"]),
        device_map={"": "cpu"},
        model_kwargs={"attn_implementation": "eager"},
        tokenizer_kwargs={"use_fast": True},
    )
    assert same.load_guard().lm.model is guard.lm.model
    other = SafeguardLLM(
        model=str(tiny_model_dir),
        cost=KeywordCost(["x"]),
        device_map={"": "cpu"},
        model_kwargs={"attn_implementation": "sdpa"},
    )
    assert other.load_guard().lm.model is not guard.lm.model
    clear_model_cache()


def test_langchain_refuses_loading_options_with_a_built_guard(tiny_model, tiny_tokenizer):
    from langchain_safeguard import ChatSafeguard

    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=KeywordCost(["x"]))
    with pytest.raises(ValueError, match="model_kwargs"):
        ChatSafeguard(guard=guard, model_kwargs={"revision": "main"})


def test_llamaindex_from_model_id_passes_loading_options(
    tiny_model_dir, load_calls, no_moves, accelerate
):
    from llamaindex_safeguard import SafeguardLLM

    llm = SafeguardLLM.from_model_id(
        str(tiny_model_dir),
        cost=KeywordCost(["x"]),
        device_map={"": "cpu"},
        model_kwargs={"attn_implementation": "eager", "revision": "main"},
    )
    assert llm.guard.lm.model.config._attn_implementation == "eager"
    assert load_calls["tokenizer"][-1]["revision"] == "main"
    assert no_moves == []


def test_the_cli_loads_a_gguf_path_with_a_device_map(
    tmp_path: Path, tiny_model, tiny_tokenizer, monkeypatch, capsys
):
    path = tmp_path / "tiny.Q4_1.gguf"
    path.write_bytes(b"GGUF")
    calls: list[tuple[str, str, dict[str, Any]]] = []

    def fake(kind: str, loaded: Any) -> Any:
        def load(cls: Any, name: Any, **kwargs: Any) -> Any:
            calls.append((kind, str(name), kwargs))
            if kwargs.get("output_loading_info"):  # nothing left newly initialised
                return loaded, {"missing_keys": [], "mismatched_keys": []}
            return loaded

        return classmethod(load)

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", fake("model", tiny_model)
    )
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", fake("tokenizer", tiny_tokenizer)
    )
    code = main(
        [
            "generate",
            "--model",
            str(path),
            "--device-map",
            '{"": "cpu"}',
            "--prompt",
            "Tell me",
            "--cost-keywords",
            "zzz",
            "--max-new-tokens",
            "4",
            "--seed",
            "0",
        ]
    )
    assert code == 0, capsys.readouterr().err
    [(_, tokenizer_dir, tokenizer_kwargs)] = [c for c in calls if c[0] == "tokenizer"]
    [(_, model_dir, model_kwargs)] = [c for c in calls if c[0] == "model"]
    assert tokenizer_dir == model_dir == str(tmp_path)
    assert tokenizer_kwargs["gguf_file"] == model_kwargs["gguf_file"] == "tiny.Q4_1.gguf"
    assert model_kwargs["device_map"] == {"": "cpu"}
    assert model_kwargs["trust_remote_code"] is False


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tiny_tokenizer, tmp_path_factory) -> Path:
    """The tiny Llama and tokenizer as a GGUF file, alone in its directory."""
    pytest.importorskip("gguf", reason="writing a GGUF file needs the gguf package")
    if not transformers.utils.is_gguf_available():
        pytest.skip("transformers does not accept the installed gguf package")
    from gguf_helpers import write_tiny_gguf

    return write_tiny_gguf(
        tiny_model, tiny_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.F32.gguf"
    )


def test_a_gguf_file_loads_as_model_and_tokenizer(tiny_gguf, tiny_model, tiny_tokenizer):
    guard = InferenceGuard.from_pretrained(str(tiny_gguf), cost=KeywordCost(["x"]), device="cpu")
    assert guard.lm.tokenizer.chat_template == tiny_tokenizer.chat_template
    ids = torch.tensor([tiny_tokenizer("Tell me about the dog.")["input_ids"]])
    with torch.no_grad():
        expected = tiny_model(ids).logits
        loaded = guard.lm.model(ids).logits
    torch.testing.assert_close(loaded, expected, atol=1e-4, rtol=1e-4)
    if guard.lm.tokenizer.eos_token_id != tiny_tokenizer.eos_token_id:
        # Seen on transformers 5.2 (fixed by 5.19): its GGUF tokenizer conversion reads
        # this file's EOS as BOS, so generation would end at once for want of a real EOS.
        pytest.xfail(f"transformers {transformers.__version__} misreads the GGUF's EOS token")
    result = guard.generate([{"role": "user", "content": "Tell me"}], max_new_tokens=4, seed=0)
    assert result.stats.completion_tokens > 0
