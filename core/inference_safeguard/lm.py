"""The base model behind the search: the backend seam and the Hugging Face backend.

The search talks to the base model only through a `LanguageModel`: prompts (validated
and tokenized by the model's own tokenizer, the same on every backend) and, at block
level, `sample_block`: sample a block of tokens for given rows of a decode state, with
per-prompt seeds, the sampling settings, per-row token penalties (the unsafe-token
resample penalty, the repetition penalty), returning tokens, raw log-probabilities,
ended flags and, where the backend has them, hidden states at the block ends. Rows are
fanned out, pruned, merged and rewound through the backend too.

`CausalLM` is the Hugging Face backend: it prefills left-padded prompts once, decodes
blocks of tokens for all rows in one batched forward per token, and fans rows out,
prunes them and rewinds blocks through the transformers Cache API (see
`inference_safeguard.kv_cache` for each cache layout), never by re-prefilling. Other
backends live in `inference_safeguard.backends`, one module each.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard.cancellation import raise_if_cancelled
from inference_safeguard.encoding import check_text, encode_chat, encode_text
from inference_safeguard.errors import (
    BackendCapabilityError,
    ChatTemplateError,
    CheckpointKindError,
    InvalidPromptError,
    OutputFormatError,
    PromptTooLongError,
)
from inference_safeguard.grammar import GrammarCompiler, RowGrammars
from inference_safeguard.hf_compat import cache_keyword, output_cache
from inference_safeguard.identity import model_fingerprint
from inference_safeguard.kv_cache import (
    CacheCheckpoint,
    check_cache_support,
    is_full_attention_cache,
    merge_rows,
    no_cache_error,
    repeat_rows,
    with_headroom,
)
from inference_safeguard.kv_cache import select_rows as select_cache_rows
from inference_safeguard.loading import (
    DeviceMap,
    load_pretrained,
    resolve_device,
    resolve_dtype,
)
from inference_safeguard.output_format import OutputConstraint, ToolCallFormat, output_constraint
from inference_safeguard.reasoning import ReasoningMarkers
from inference_safeguard.sampling import (
    PromptSamplers,
    RepetitionPenalty,
    SamplingSettings,
    model_sampling_defaults,
    penalize_tokens,
)
from inference_safeguard.tools import (
    ToolChoice,
    ToolSpec,
    call_is_required,
    inline_tool_messages,
    native_tool_messages,
    read_tool_call,
    template_renders_tools,
)

Message = Mapping[str, Any]
PromptInput = str | Sequence[Message]
"""A prompt: plain text (used as is, no chat template) or a chat message list."""

_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class EncodedPrompt:
    """A validated prompt.

    Attributes:
        ids: token ids fed to the model (the chat template applied for messages).
        text: the prompt as plain text for scorers: the text itself, or a message
            list flattened to a `role: content` transcript.
        opens_reasoning: the prompt ends by opening a reasoning section (a chat
            template that starts the model's thinking), so the response starts in it.
        constraint: the grammar the response must follow, or None (see
            `inference_safeguard.output_format`).
    """

    ids: list[int]
    text: str
    opens_reasoning: bool = False
    constraint: OutputConstraint | None = None


@dataclass
class DecodeState:
    """Decoding state of a batch of rows, owned and advanced by `CausalLM`.

    Attributes:
        cache: the transformers cache: per layer `(rows, heads, seq, head_dim)` keys
            and values (at most a window of them on sliding-window layers), or a
            fixed-size `(rows, ...)` state on linear-attention layers.
        attention_mask: `(rows, seq)` long, 0 on left padding and on tokens fed after
            a row finished.
        next_position: `(rows,)` long position id of each row's next token.
        logits: `(rows, vocab)` float next-token logits.
        hidden: `(rows, hidden)` last-layer hidden state of each row's last decoded
            token (zeros right after prefill).
    """

    cache: Any
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor

    @property
    def rows(self) -> int:
        return self.attention_mask.shape[0]


@dataclass(frozen=True)
class DecodedBlock:
    """Tokens decoded for every row in one block.

    Attributes:
        tokens: `(rows, block)` long tokens as chosen, the EOS that ends a row
            included; positions after it hold -1.
        logprob: `(rows,)` sum of the model's log-probabilities (temperature 1) of the
            row's tokens, its EOS included.
        ended: `(rows,)` bool, True where the row emitted EOS in this block.
        hidden: `(rows, hidden)` last-layer hidden state at each row's block end, or
            `(rows, 0)` from a backend without hidden states.
    """

    tokens: torch.Tensor
    logprob: torch.Tensor
    ended: torch.Tensor
    hidden: torch.Tensor | None = None


@dataclass(frozen=True)
class BlockRequest:
    """What `LanguageModel.sample_block` samples: one block for some rows of a state.

    Attributes:
        num_tokens: block length (the longest row's).
        rows: `(n,)` long, the rows to sample, grouped contiguously by prompt.
        prompt_ids: the prompt (a key of `samplers`) owning each group of `rows`.
        group_sizes: rows of each group; they sum to `n`.
        samplers: the per-prompt seeded samplers: a prompt's tokens depend on its seed
            and its own rows only.
        sampling: temperature, top-k, top-p, min-p and the repetition penalty.
        histories: token ids each sampled row's repetition penalty looks at (its
            prompt and response so far), or None when the penalty is off.
        unsafe_mask: `(n, vocab)` bool, tokens whose logits lose `unsafe_penalty`
            (the resample penalty), or None.
        unsafe_penalty: amount subtracted from the masked tokens' logits.
        limits: `(rows_of_state,)` long, tokens each row may decode, or None (all
            `num_tokens`).
        replay: an earlier block of this step for every row of the state; the rows not
            in `rows` keep it (None: `rows` are all the state's rows).
        grammar: one grammar state per sampled row, advanced as tokens are chosen, or None.
        cancel: once set, sampling raises `GenerationCancelledError`.
    """

    num_tokens: int
    rows: torch.Tensor
    prompt_ids: list[int]
    group_sizes: list[int]
    samplers: PromptSamplers
    sampling: SamplingSettings
    histories: list[list[int]] | None = None
    unsafe_mask: torch.Tensor | None = None
    unsafe_penalty: float = 0.0
    limits: torch.Tensor | None = None
    replay: DecodedBlock | None = None
    grammar: RowGrammars | None = None
    cancel: threading.Event | None = None


class Checkpoint(abc.ABC):
    """A decode state as it was before a block, to sample that block again."""

    @abc.abstractmethod
    def rewind(self, state: Any) -> None:
        """Restore `state` (the same rows) to this checkpoint; may be called repeatedly."""


TokenChooser = Callable[[torch.Tensor, int], torch.Tensor]
"""`(logits (rows, vocab), step_in_block) -> tokens (rows,)`."""


class LanguageModel(abc.ABC):
    """A base model and its tokenizer, as the search drives it: the backend seam.

    Prompts are encoded here, by the tokenizer, alike on every backend; a backend (one
    subclass each) holds the model and samples blocks. A decode state is the backend's
    own (`prefill` makes it, `sample_block` advances it): rows of token prefixes whose
    order the search changes with `fan_out`, `select_rows` and `merge`.

    Args:
        tokenizer: the model's Hugging Face tokenizer; not modified.
        generation_config: the model's generation config (EOS ids, sampling defaults),
            or None.
        allow_special_tokens_in_content: let the text of special tokens in prompts (a
            message's content, a plain-text prompt) become those tokens. Off by default:
            only the chat template writes control tokens, so a user cannot end a turn or
            forge a system turn by typing `</s><|system|>` (see `inference_safeguard.encoding`).
            Turn it on only for prompts you render yourself on purpose.
    """

    backend: ClassVar[str]
    """The backend's name, as `InferenceGuard.from_pretrained(backend=...)` takes it."""
    has_hidden_states: ClassVar[bool]
    """Whether `sample_block` returns hidden states (critic mode needs them)."""
    supports_grammar: ClassVar[bool] = True
    """Whether responses can follow a grammar (`response_format`, forced tool calls)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        generation_config: Any,
        *,
        allow_special_tokens_in_content: bool = False,
    ) -> None:
        if not callable(getattr(tokenizer, "batch_decode", None)):
            raise TypeError(
                f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}"
            )
        self.tokenizer = tokenizer
        self.allow_special_tokens_in_content = allow_special_tokens_in_content
        self.eos_token_ids: frozenset[int] = eos_ids(tokenizer, generation_config)
        self.sampling_defaults = model_sampling_defaults(generation_config)
        """Sampling settings the model's generation_config sets (see `GuardConfig`)."""
        self.reasoning_markers = ReasoningMarkers.of(tokenizer)
        """Markers of the model's reasoning text, or None (see `inference_safeguard.reasoning`)."""
        self._grammar_compiler: GrammarCompiler | None = None

    # ------------------------------------------------------------------ the model
    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Device the model takes its inputs on."""

    @property
    def output_device(self) -> torch.device:
        """Device of the logits, and of a block's log-probs and hidden states (the
        search keeps its per-row tensors there)."""
        return self.device

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Columns of the model's logits."""

    @property
    @abc.abstractmethod
    def context_window(self) -> int | None:
        """Most tokens (prompt + response) the model attends to, or None if unknown."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The model's name or path."""

    @abc.abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the model's weights and config (see `inference_safeguard.identity`)."""

    def require_hidden_states(self, needed_by: str) -> None:
        """Refuse `needed_by` (e.g. critic mode) on a backend without hidden states.

        Raises:
            BackendCapabilityError: this backend returns no hidden states.
        """
        if not self.has_hidden_states:
            raise BackendCapabilityError(
                f"{needed_by} reads the base model's hidden states, which the "
                f"{self.backend!r} backend does not return; use backend='huggingface' "
                "(the backends with hidden states), or scorer='models'"
            )

    # ---------------------------------------------------------------- the seam
    @abc.abstractmethod
    def prefill(self, prompts: Sequence[Sequence[int]]) -> Any:
        """A decode state with one row per prompt (`prompts`: token ids, at least one each)."""

    @abc.abstractmethod
    def fan_out(self, state: Any, repeats: int) -> None:
        """Repeat every row `repeats` times (row i becomes rows i*r .. i*r + r-1), in place."""

    @abc.abstractmethod
    def select_rows(self, state: Any, indices: torch.Tensor) -> None:
        """Keep rows `indices` (`(new_rows,)` long, repeats allowed), in place."""

    @abc.abstractmethod
    def can_merge(self, state: Any) -> bool:
        """Whether `merge` can append rows to `state`."""

    @abc.abstractmethod
    def merge(self, state: Any, other: Any) -> None:
        """Append `other`'s rows to `state`, in place."""

    @abc.abstractmethod
    def checkpoint(self, state: Any, tokens: int) -> Checkpoint:
        """`state` as it is, before a block of at most `tokens` tokens."""

    @abc.abstractmethod
    def sample_block(self, state: Any, request: BlockRequest) -> DecodedBlock:
        """Sample one block for `request.rows` and advance `state` by it (the other rows
        replay `request.replay`).

        Rows stop at EOS (their later positions hold -1) or at their limit. Log-probs are
        the raw model's (temperature 1, before any penalty), of the tokens chosen.

        Returns:
            The block of every row of `state`.
        """

    # -------------------------------------------------------------------- prompts
    def encode(
        self,
        prompt: PromptInput,
        tools: Sequence[ToolSpec] = (),
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> EncodedPrompt:
        """Validate and tokenize one prompt.

        Plain text is tokenized as is (a completion prompt, with the tokenizer's BOS); a
        message list is rendered with the tokenizer's chat template and a generation
        prompt. Tools (and tool calls and results in the messages) are rendered by the
        template when it supports them, else written into the conversation as text (see
        `inference_safeguard.tools`). Either way, the text of special tokens in the
        prompt stays text unless `allow_special_tokens_in_content` (see
        `inference_safeguard.encoding`). `chat_template_kwargs` are variables of the chat
        template (e.g. `{"enable_thinking": False}`); plain text ignores them.

        Raises:
            InvalidPromptError: empty prompt, non-text prompt (or one with an unpaired
                surrogate), malformed messages, or tools with a plain-text prompt.
            ChatTemplateError: messages given but the tokenizer has no chat template.
        """
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidPromptError("the prompt is empty; pass some text to generate from")
            if tools:
                raise InvalidPromptError(
                    "tools need a chat prompt; pass the prompt as "
                    "[{'role': 'user', 'content': ...}]"
                )
            ids = encode_text(
                self.tokenizer, prompt, allow_control_tokens=self.allow_special_tokens_in_content
            )
            return EncodedPrompt(ids=ids, text=prompt, opens_reasoning=self._opens_reasoning(ids))
        messages = validate_messages(prompt)
        chat_template = getattr(self.tokenizer, "chat_template", None)
        if not chat_template:
            raise ChatTemplateError(
                f"the tokenizer of {self.name!r} has no chat template, so a message list "
                "cannot be rendered; pass the prompt as plain text, or set "
                "tokenizer.chat_template to a Jinja template"
            )
        if template_renders_tools(chat_template):
            rendered = native_tool_messages(messages)
            tool_dicts = [t.to_openai() for t in tools]
        else:
            rendered = inline_tool_messages(messages, tools)
            tool_dicts = []
        ids = encode_chat(
            self.tokenizer,
            rendered,
            tool_dicts,
            allow_control_tokens=self.allow_special_tokens_in_content,
            template_kwargs=chat_template_kwargs,
        )
        return EncodedPrompt(
            ids=ids,
            text=transcript(inline_tool_messages(messages, ())),
            opens_reasoning=self._opens_reasoning(ids),
        )

    def _opens_reasoning(self, ids: Sequence[int]) -> bool:
        """Whether the prompt `ids` end by opening the model's reasoning section."""
        if self.reasoning_markers is None:
            return False
        tail = self.tokenizer.decode(list(ids[-16:]), skip_special_tokens=False)
        return self.reasoning_markers.opened_by(str(tail))

    def split_reasoning(self, text: str, prompt: EncodedPrompt) -> tuple[str | None, str]:
        """`(reasoning, answer)` of a response to `prompt` (reasoning None without any);
        see `inference_safeguard.reasoning`."""
        if self.reasoning_markers is None:
            return None, text
        return self.reasoning_markers.split(text, opened=prompt.opens_reasoning)

    def settled_answer(self, text: str, prompt: EncodedPrompt) -> str:
        """The part of a response being written that is surely the start of its answer."""
        if self.reasoning_markers is None:
            return text
        return self.reasoning_markers.settled_answer(text, opened=prompt.opens_reasoning)

    def encode_batch(
        self,
        prompts: Sequence[PromptInput],
        max_new_tokens: int,
        tools: Sequence[ToolSpec] = (),
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[EncodedPrompt]:
        """Validate and tokenize a list of prompts (see `encode`), checking that each fits
        the context window with `max_new_tokens` more tokens.

        Raises:
            InvalidPromptError: not a list, no prompts, or a prompt `encode` rejects.
            PromptTooLongError: a prompt plus `max_new_tokens` exceeds the context window.
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise InvalidPromptError(
                f"expected a list of prompts, got {type(prompts).__name__}; wrap a single "
                "prompt in a list (or call generate() for one prompt)"
            )
        if not prompts:
            raise InvalidPromptError("no prompts given; pass at least one prompt")
        window = self.context_window
        encoded = []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, (str, list, tuple)):
                raise InvalidPromptError(
                    f"prompt {index} must be a string or a list of {{'role', 'content'}} "
                    f"messages, got {type(prompt).__name__}"
                )
            item = self.encode(prompt, tools, chat_template_kwargs)
            if not item.ids:
                raise InvalidPromptError(f"prompt {index} tokenizes to no tokens; add some text")
            if window is not None and len(item.ids) + max_new_tokens > window:
                raise PromptTooLongError(
                    f"prompt {index} has {len(item.ids)} tokens and max_new_tokens is "
                    f"{max_new_tokens}, but the model's context window is {window} tokens; "
                    f"shorten the prompt or lower max_new_tokens to at most "
                    f"{max(window - len(item.ids), 0)}"
                )
            encoded.append(item)
        return encoded

    def constrain(
        self,
        prompts: Sequence[EncodedPrompt],
        response_format: Mapping[str, Any] | None,
        tools: Sequence[ToolSpec] = (),
        tool_choice: ToolChoice = None,
        parallel_tool_calls: bool = True,
    ) -> list[EncodedPrompt]:
        """`prompts` with the grammar their responses must follow (see
        `inference_safeguard.output_format`): `response_format`, and calls of `tools` (the
        ones offered) in this model's tool-call format under `tool_choice`. A prompt that
        may hold a reasoning section (a thinking model's), and the grammar holds after it.

        Raises:
            OutputFormatError: a format, schema or grammar that cannot be enforced.
            BackendCapabilityError: a format or a required tool call on a backend
                without grammar-constrained decoding.
        """
        if not self.supports_grammar and (response_format or call_is_required(tool_choice)):
            raise BackendCapabilityError(
                f"a response_format or a required tool call constrains decoding token by "
                f"token, which the {self.backend!r} backend does not do; use "
                "backend='huggingface' (the backends with grammar-constrained decoding)"
            )
        if not self.supports_grammar:
            return list(prompts)  # tool calls, if any, are parsed from the text as written
        markers = self.reasoning_markers
        # Prompts differ only in whether they open a reasoning section: one grammar each.
        by_opening: dict[bool, OutputConstraint | None] = {}
        for opened in sorted({prompt.opens_reasoning for prompt in prompts}):
            constraint = output_constraint(
                response_format,
                tools,
                tool_choice,
                parallel_tool_calls=parallel_tool_calls,
                call_format=self.tool_call_format,
                reasoning=None if markers is None else (markers.open, markers.close),
                reasoning_opened=opened,
            )
            if constraint is not None:
                try:
                    self.grammar_compiler.matcher(constraint)  # fails now, not mid-search
                except OutputFormatError:
                    if response_format or call_is_required(tool_choice):
                        raise
                    # Text or a call, and this tokenizer cannot be constrained: the
                    # model writes its calls unaided, as it would without a grammar.
                    warnings.warn(
                        "tool calls are not grammar-constrained for this tokenizer (llguidance "
                        "cannot read it); calls are parsed from the text as written",
                        stacklevel=4,
                    )
                    constraint = None
            by_opening[opened] = constraint
        return [
            dataclasses.replace(prompt, constraint=by_opening[prompt.opens_reasoning])
            for prompt in prompts
        ]

    @property
    def tool_call_format(self) -> ToolCallFormat:
        """How this model writes tool calls (from its chat template)."""
        return ToolCallFormat.of(getattr(self.tokenizer, "chat_template", None))

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """Compiles output grammars for this model's tokenizer (built on first use)."""
        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(
                self.tokenizer, self.vocab_size, self.eos_token_ids
            )
        return self._grammar_compiler

    def row_grammars(self, constraints: Sequence[OutputConstraint | None]) -> RowGrammars | None:
        """One grammar state per prompt, or None when no prompt is constrained."""
        if all(c is None for c in constraints):
            return None
        return RowGrammars.start(self.grammar_compiler, constraints)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Texts of token id lists, special tokens skipped."""
        return self.tokenizer.batch_decode(
            [list(map(int, row)) for row in ids], skip_special_tokens=True
        )


class CausalLM(LanguageModel):
    """The Hugging Face backend: a causal LM and its tokenizer, driven in batches for
    block-wise search, with the KV cache held, fanned out and pruned here.

    Args:
        model: any Hugging Face causal LM whose forward takes a transformers `Cache`.
        tokenizer: its tokenizer; not modified. Padding is masked, so any id serves:
            the pad token, else EOS, else the model config's pad id, else 0.
        allow_special_tokens_in_content: see `LanguageModel`.
    """

    backend = "huggingface"
    has_hidden_states = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        allow_special_tokens_in_content: bool = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_input_embeddings"):
            raise TypeError(
                f"model must be a Hugging Face causal LM, got {type(model).__name__}; to load "
                "one by name or path use from_pretrained(...)"
            )
        output_embeddings = getattr(model, "get_output_embeddings", None)
        if callable(output_embeddings) and output_embeddings() is None:
            raise CheckpointKindError(
                f"model is a {type(model).__name__}, which has no LM head; the base model "
                "must be a causal LM (AutoModelForCausalLM), and a sequence classifier "
                "belongs in ClassifierScorer, as a reward or cost model"
            )
        super().__init__(
            tokenizer,
            getattr(model, "generation_config", None),
            allow_special_tokens_in_content=allow_special_tokens_in_content,
        )
        keyword = cache_keyword(model)
        if keyword is None:
            raise no_cache_error(model)
        self._cache_keyword = keyword
        self.model = model.eval()
        self._attends = check_cache_support(self.model, keyword, self.device)
        candidates = (
            tokenizer.pad_token_id,
            min(self.eos_token_ids, default=None),
            getattr(model.config, "pad_token_id", None),
        )
        self.pad_token_id: int = next((i for i in candidates if isinstance(i, int)), 0)
        self._eos_tensor = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        device_map: DeviceMap | None = None,
        trust_remote_code: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
    ) -> CausalLM:
        """Load a model and tokenizer by hub name, local directory or `.gguf` file path.

        Args:
            device: where to put the model (default: CUDA when available, else CPU);
                ignored when `device_map` is given or the model is quantized.
            dtype: torch dtype or its name (default: bfloat16 on CUDA, float32 on CPU).
            device_map: transformers device map, a string (e.g. "auto") or a dict, to
                shard a large model; such a model is never moved afterwards.
            trust_remote_code: run code shipped with the checkpoint; off unless you
                trust its author.
            model_kwargs: more options of the model's `from_pretrained`
                (`quantization_config`, `attn_implementation`, `revision`, `gguf_file`).
            tokenizer_kwargs: more options of the tokenizer's `from_pretrained`; see
                `inference_safeguard.loading` for those it takes from `model_kwargs`.

        Raises:
            LoadOptionError: a device this machine lacks, or not a floating dtype.
            ModelLoadError: no such directory or hub name, or incomplete or corrupted files.
            CheckpointKindError: not a causal LM (e.g. a sequence classifier), so its LM
                head would be randomly initialised.
        """
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        if device_map is None:
            device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            on_cuda = device_map is not None or (device is not None and device.type == "cuda")
            dtype = torch.bfloat16 if on_cuda else torch.float32
        model, tokenizer = load_pretrained(
            AutoModelForCausalLM,
            name_or_path,
            kind="causal-lm",
            owner="the base model",
            device=None if device_map is not None else device,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            model_kwargs=model_kwargs,
            tokenizer_kwargs=tokenizer_kwargs,
        )
        return cls(model, tokenizer)

    # ----------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def output_device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def context_window(self) -> int | None:
        """Most tokens (prompt + response) the model attends to, from its config."""
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def name(self) -> str:
        return str(getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__)

    def fingerprint(self) -> dict[str, Any]:
        return model_fingerprint(self.model)

    # ------------------------------------------------------------------- decoding
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> DecodeState:
        """Run the prompts, left-padded, through the model once.

        Args:
            prompts: token ids of each prompt (at least one token each).

        Returns:
            State with `rows == len(prompts)`.
        """
        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, longest - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        # Hidden states are read at block ends only; asking for them here would keep
        # every layer's `(rows, seq, hidden)` activations alive at once.
        hidden = torch.zeros(
            len(prompts),
            self.model.config.get_text_config().hidden_size,
            dtype=self.model.dtype,
            device=self.device,
        )
        return DecodeState(
            cache=with_headroom(output_cache(out)),
            attention_mask=attention_mask,
            next_position=attention_mask.sum(-1),
            logits=out.logits[:, -1].float(),
            hidden=hidden,
        )

    @torch.inference_mode()
    def decode_block(
        self,
        state: DecodeState,
        num_tokens: int,
        choose: TokenChooser,
        limits: torch.Tensor | None = None,
    ) -> DecodedBlock:
        """Decode `num_tokens` tokens for every row, advancing `state` in place.

        Rows that emit EOS stop: their later positions hold -1 and are fed as masked
        padding, so every row's cache keeps the same length. So do rows past their
        limit, without being marked `ended`.

        Args:
            state: rows to extend; its cache grows by `num_tokens`.
            num_tokens: block length.
            choose: picks each step's tokens from the logits (sampling, teacher forcing).
            limits: `(rows,)` long, at most `num_tokens`: tokens each row may decode
                (None: `num_tokens` each), for rows that reach their token limit
                before the others' block ends.
        """
        rows, device = state.rows, state.logits.device
        eos = self._eos_tensor.to(device)
        tokens = torch.full((rows, num_tokens), -1, dtype=torch.long, device=device)
        logprob = torch.zeros(rows, device=device)
        ended = torch.zeros(rows, dtype=torch.bool, device=device)
        for step in range(num_tokens):
            live = ~ended if limits is None else ~ended & (limits.to(device) > step)
            chosen = choose(state.logits, step)
            step_logprob = state.logits.log_softmax(-1).gather(-1, chosen[:, None]).squeeze(-1)
            logprob += torch.where(live, step_logprob, 0.0)
            is_eos = torch.isin(chosen, eos) & live
            tokens[:, step] = torch.where(live, chosen, -1)
            fed = torch.where(live, chosen, self.pad_token_id)
            self._feed(state, fed, live)
            ended |= is_eos
        return DecodedBlock(tokens=tokens, logprob=logprob, ended=ended, hidden=state.hidden)

    def checkpoint(self, state: DecodeState, tokens: int) -> BlockCheckpoint:
        return BlockCheckpoint.of(state, tokens)

    def sample_block(self, state: DecodeState, request: BlockRequest) -> DecodedBlock:
        """Decode the block for every row in one batched forward per token: the rows of
        `request.rows` sample, the others replay `request.replay` (so the cache of every
        row grows alike); see `LanguageModel.sample_block`."""
        return self.decode_block(state, request.num_tokens, self._chooser(request), request.limits)

    def _chooser(self, request: BlockRequest) -> TokenChooser:
        """Token chooser: sample `request.rows` (repetition penalty, then the unsafe-token
        penalty, then the grammar's mask, which `request.grammar`, one state per sampled
        row, follows), replay the other rows' tokens; raises `GenerationCancelledError`
        once `request.cancel` is set, before the token's forward."""
        sampling, replay = request.sampling, request.replay
        sampled_rows = request.rows
        repetition = None
        if request.histories is not None:
            repetition = RepetitionPenalty(
                sampling.repetition_penalty, request.histories, self.vocab_size, self.device
            )
        penalty_mask, grammar = request.unsafe_mask, request.grammar

        def choose(logits: torch.Tensor, step: int) -> torch.Tensor:
            raise_if_cancelled(request.cancel)
            picked = logits if replay is None else logits[sampled_rows.to(logits.device)]
            if repetition is not None:
                picked = repetition(picked)
            if penalty_mask is not None:
                picked = penalize_tokens(picked, penalty_mask, request.unsafe_penalty)
            if grammar is not None:
                picked = picked.masked_fill(~grammar.allowed(picked.device), float("-inf"))
            sampled = request.samplers.sample(
                picked,
                request.group_sizes,
                request.prompt_ids,
                sampling.temperature,
                sampling.top_k,
                sampling.top_p,
                sampling.min_p,
            )
            if repetition is not None:
                repetition.observe(sampled)
            if grammar is not None:
                grammar.advance(sampled)
            if replay is None:
                return sampled
            tokens = replay.tokens[:, step].clamp_min(0)
            tokens[sampled_rows.to(tokens.device)] = sampled
            return tokens

        return choose

    def _feed(self, state: DecodeState, tokens: torch.Tensor, real: torch.Tensor) -> None:
        """Feed one token per row (`real` False feeds masked padding); updates `state`."""
        state.attention_mask = torch.cat([state.attention_mask, real.long()[:, None]], dim=-1)
        # An attention-free model (Mamba) multiplies what it is fed by the mask, so it
        # takes the fed token's mask; the others take the whole sequence's.
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=state.attention_mask if self._attends else real.long()[:, None],
            position_ids=state.next_position[:, None],
            use_cache=True,
            output_hidden_states=True,
            **{self._cache_keyword: state.cache},
        )
        state.cache = output_cache(out)
        state.next_position = state.next_position + real.long()
        state.logits = torch.where(real[:, None], out.logits[:, -1].float(), state.logits)
        state.hidden = torch.where(real[:, None], out.hidden_states[-1][:, -1], state.hidden)

    def fan_out(self, state: DecodeState, repeats: int) -> None:
        """Repeat every row `repeats` times (row i becomes rows i*r .. i*r + r-1), in place."""
        repeat_rows(state.cache, repeats, state.rows)
        state.attention_mask = state.attention_mask.repeat_interleave(repeats, dim=0)
        state.next_position = state.next_position.repeat_interleave(repeats, dim=0)
        state.logits = state.logits.repeat_interleave(repeats, dim=0)
        state.hidden = state.hidden.repeat_interleave(repeats, dim=0)

    def can_merge(self, state: DecodeState) -> bool:
        """Whether `merge` can append rows to `state` (its cache is full attention)."""
        return is_full_attention_cache(state.cache)

    @torch.inference_mode()
    def merge(self, state: DecodeState, other: DecodeState) -> None:
        """Append `other`'s rows to `state`, in place; the shorter of the two is
        left-padded (masked, zero keys and values), as `prefill` pads short prompts.

        Raises:
            NotImplementedError: the cache is not full attention (a sliding window or a
                recurrent state cannot be padded without changing what it holds).
        """
        merge_rows(state.cache, other.cache)
        length = max(state.attention_mask.shape[-1], other.attention_mask.shape[-1])
        state.attention_mask = torch.cat(
            [_left_pad(state.attention_mask, length), _left_pad(other.attention_mask, length)]
        )
        state.next_position = torch.cat([state.next_position, other.next_position])
        state.logits = torch.cat([state.logits, other.logits])
        state.hidden = torch.cat([state.hidden, other.hidden])

    def select_rows(self, state: DecodeState, indices: torch.Tensor) -> None:
        """Keep rows `indices` (`(new_rows,)` long, repeats allowed: prune and fan out at once)."""
        indices = indices.to(state.logits.device)
        select_cache_rows(state.cache, indices)
        state.attention_mask = state.attention_mask[indices]
        state.next_position = state.next_position[indices]
        state.logits = state.logits[indices]
        state.hidden = state.hidden[indices]


@dataclass(frozen=True)
class BlockCheckpoint(Checkpoint):
    """What `rewind` needs to undo one decoded block, on every cache layout (full,
    sliding-window and linear attention; see `inference_safeguard.kv_cache`)."""

    cache: CacheCheckpoint
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor

    @classmethod
    def of(cls, state: DecodeState, tokens: int) -> BlockCheckpoint:
        """Checkpoint `state` before decoding a block of at most `tokens` tokens."""
        return cls(
            CacheCheckpoint.take(state.cache, tokens),
            state.attention_mask,
            state.next_position,
            state.logits,
            state.hidden,
        )

    def rewind(self, state: DecodeState) -> None:
        self.cache.restore(state.cache)
        state.attention_mask = self.attention_mask
        state.next_position = self.next_position
        state.logits = self.logits
        state.hidden = self.hidden


def eos_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any) -> frozenset[int]:
    """The ids that end a response: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _left_pad(mask: torch.Tensor, length: int) -> torch.Tensor:
    """`(rows, seq)` mask padded on the left with zeros to `(rows, length)`."""
    return torch.nn.functional.pad(mask, (length - mask.shape[-1], 0))


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a chat message list and return it as plain dicts.

    An assistant message that carries `tool_calls` may have empty (or no) content.

    Raises:
        InvalidPromptError: saying which message is malformed and how.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (bytes, bytearray)):
        raise InvalidPromptError(
            f"a prompt must be a string or a list of {{'role', 'content'}} messages, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidPromptError("the message list is empty; add at least one user message")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidPromptError(
                f"message {index} must be a mapping with 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise InvalidPromptError(
                f"message {index} has role {role!r}; use one of {', '.join(_ROLES)}"
            )
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            _check_tool_calls(index, role, tool_calls)
            content = content or ""
        if not isinstance(content, str):
            raise InvalidPromptError(
                f"message {index} content must be text, got {type(content).__name__}"
            )
        check_text(content, f"message {index}")
        clean.append({**message, "role": role, "content": content})
    if not any(m["content"].strip() or m.get("tool_calls") for m in clean):
        raise InvalidPromptError("every message is empty; give the model some text")
    return clean


def _check_tool_calls(index: int, role: str, tool_calls: Any) -> None:
    if role != "assistant":
        raise InvalidPromptError(f"message {index}: only assistant messages carry tool_calls")
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, (str, bytes)):
        raise InvalidPromptError(
            f"message {index}: tool_calls must be a list of "
            "{'id', 'type': 'function', 'function': {'name', 'arguments'}} dicts, got "
            f"{type(tool_calls).__name__}"
        )
    for number, call in enumerate(tool_calls):
        read_tool_call(call, f"message {index}, tool call {number}")


def transcript(messages: Sequence[Message]) -> str:
    """Flatten messages to the plain `role: content` transcript that scorers read."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
