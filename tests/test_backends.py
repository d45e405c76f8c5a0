"""The backend seam: the Hugging Face backend's `sample_block` (resampling and replay),
and how a backend is chosen and refused."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_cli import run_failing

from inference_safeguard import InferenceGuard
from inference_safeguard.backends import load_base_model
from inference_safeguard.extras import MissingExtraError
from inference_safeguard.lm import BlockRequest, CausalLM, LanguageModel
from inference_safeguard.sampling import PromptSamplers, SamplingSettings
from inference_safeguard.scorers import KeywordCost

PLAIN = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


def _fanned(lm: CausalLM, rows: int):
    state = lm.prefill([lm.encode("Tell me about the dog and the garden.").ids])
    lm.fan_out(state, rows)
    return state


def _request(rows: torch.Tensor, **fields) -> BlockRequest:
    return BlockRequest(
        num_tokens=6,
        rows=rows,
        prompt_ids=[0],
        group_sizes=[len(rows)],
        samplers=PromptSamplers([fields.pop("seed", 0)], torch.device("cpu")),
        sampling=fields.pop("sampling", PLAIN),
        **fields,
    )


def test_hugging_face_backend_is_a_language_model(tiny_model, tiny_tokenizer):
    lm = CausalLM(tiny_model, tiny_tokenizer)
    assert isinstance(lm, LanguageModel)
    assert lm.backend == "huggingface" and lm.has_hidden_states and lm.supports_grammar


def test_resampled_rows_avoid_penalised_tokens_and_the_others_replay(tiny_model, tiny_tokenizer):
    lm = CausalLM(tiny_model, tiny_tokenizer)
    state = _fanned(lm, 4)
    checkpoint = lm.checkpoint(state, 6)
    first = lm.sample_block(state, _request(torch.arange(4)))
    assert first.hidden is not None and first.hidden.shape[0] == 4
    seen = sorted({t for t in first.tokens.flatten().tolist() if t >= 0})
    mask = torch.zeros(2, lm.vocab_size, dtype=torch.bool)
    mask[:, seen] = True
    checkpoint.rewind(state)
    again = lm.sample_block(
        state,
        _request(torch.tensor([1, 2]), unsafe_mask=mask, unsafe_penalty=1e4, replay=first, seed=1),
    )
    for row in (1, 2):
        assert not set(seen) & set(again.tokens[row].tolist())
    for row in (0, 3):
        assert torch.equal(again.tokens[row], first.tokens[row])
        assert float(again.logprob[row]) == pytest.approx(float(first.logprob[row]), abs=1e-4)


def test_vllm_backend_without_vllm_says_how_to_install_it():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(MissingExtraError, match="pip install vllm"):
        InferenceGuard.from_pretrained("any/model", backend="vllm", cost=KeywordCost(["x"]))


def test_engine_options_need_the_vllm_backend(tiny_model_dir):
    with pytest.raises(ValueError, match="backend='vllm'"):
        InferenceGuard.from_pretrained(
            str(tiny_model_dir), cost=KeywordCost(["x"]), tensor_parallel_size=2
        )
    with pytest.raises(ValueError, match="must be one of"):
        load_base_model(str(tiny_model_dir), "onnx", hf_options={}, engine_options={})  # type: ignore[arg-type]


def test_hugging_face_loading_options_are_refused_on_vllm():
    with pytest.raises(ValueError, match="device_map"):
        InferenceGuard.from_pretrained(
            "any/model", backend="vllm", cost=KeywordCost(["x"]), device_map="auto"
        )


def test_cli_engine_options_need_backend_vllm(tiny_model_dir, capsys):
    error = run_failing(
        capsys,
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "hi",
            "--cost-keywords",
            "x",
            "--tensor-parallel-size",
            "2",
        ],
    )
    assert "--backend vllm" in error


def test_cli_vllm_engine_needs_backend_vllm(tiny_model_dir, capsys):
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--cost-keywords", "x"]
    error = run_failing(capsys, [*argv, "--vllm-engine", "async"])
    assert "--vllm-engine" in error and "--backend vllm" in error
