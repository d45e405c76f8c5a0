"""Grammar-constrained sampling: a token mask for every row of a search.

An `OutputConstraint` (see `inference_safeguard.output_format`) is enforced with
llguidance (the engine behind vLLM's, SGLang's and llama.cpp's guidance backends): a
matcher per row says which tokens may come next, and the search's token chooser sets the
others' logits to -inf before it samples (after the repetition and unsafe-token
penalties, so that resampling still steers away from unsafe text within the grammar).

Rows follow the search: each block decodes from a copy of its parent beam's matcher
(`RowGrammars.for_rows`, a deep copy costs about a microsecond), so fan-out, pruning and
the rewind of a resampled block need no rollback; the copies that decoded a row's block
become that candidate's state.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard.errors import OutputFormatError
from inference_safeguard.output_format import OutputConstraint

_CACHED_GRAMMARS = 64


class GrammarCompiler:
    """Turns constraints into matchers for one model's tokenizer.

    llguidance's view of the tokenizer is built on first use (about 0.4 s for a 50k
    vocabulary) and kept; so is a fresh matcher per grammar, which later calls copy.

    Args:
        tokenizer: the model's tokenizer (a fast one).
        vocab_size: columns of the model's logits.
        eos_token_ids: tokens that end a response (allowed once the grammar is complete).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: Iterable[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._llg_tokenizer: LLTokenizer | None = None
        self._matchers: OrderedDict[str, LLMatcher] = OrderedDict()
        # llguidance's threads compete with torch's for the cores: one per two cores
        # (measured: the default pool doubled the mask's cost on a busy 2-core machine).
        self.executor = LLExecutor(num_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))

    def matcher(self, constraint: OutputConstraint) -> LLMatcher:
        """A matcher at the start of `constraint`'s grammar.

        Raises:
            OutputFormatError: the grammar does not compile for this tokenizer, or the
                tokenizer is not a fast one.
        """
        cached = self._matchers.get(constraint.grammar)
        if cached is None:
            cached = LLMatcher(self._tokenizer(), constraint.grammar, log_level=0)
            if cached.is_error():
                raise OutputFormatError(
                    f"cannot enforce {constraint.description}: {cached.get_error()}"
                )
            self._matchers[constraint.grammar] = cached
            if len(self._matchers) > _CACHED_GRAMMARS:
                self._matchers.popitem(last=False)
        else:
            self._matchers.move_to_end(constraint.grammar)
        return cached.deep_copy()

    def _tokenizer(self) -> LLTokenizer:
        if self._llg_tokenizer is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise OutputFormatError(
                    f"constrained output needs a fast (Rust) tokenizer, and "
                    f"{type(self.tokenizer).__name__} is not one; load the tokenizer with "
                    "use_fast=True (or convert it with tokenizers)"
                )
            backend = backend.__class__.from_str(backend.to_str())  # a copy to configure
            backend.no_padding()
            backend.no_truncation()
            eos = self.eos_token_ids or [self.tokenizer.eos_token_id or 0]
            try:
                self._llg_tokenizer = LLTokenizer(
                    _readable_decoder(backend.to_str()), n_vocab=self.vocab_size, eos_token=eos
                )
            except (ValueError, RuntimeError) as error:
                raise OutputFormatError(
                    f"llguidance cannot read this tokenizer ({error}); constrained output is "
                    "not available for it"
                ) from None
        return self._llg_tokenizer


def _readable_decoder(tokenizer_json: str) -> str:
    """A tokenizer's JSON with a Metaspace decoder (sentencepiece-style tokenizers, e.g.
    Llama's and Mistral's as recent `tokenizers` versions save them) written as the
    equivalent Replace/ByteFallback/Fuse sequence, which llguidance reads; any other
    decoder as it is. Only llguidance's view changes, not the model's tokenizer."""
    data = json.loads(tokenizer_json)
    decoder = data.get("decoder") or {}
    if decoder.get("type") != "Metaspace":
        return tokenizer_json
    replacement = decoder.get("replacement", "\u2581")
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": replacement}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return json.dumps(data)


class RowGrammars:
    """The grammar state of each row of a search (None for an unconstrained row).

    A `RowGrammars` is never advanced in place once it holds a finished block's rows:
    `select` shares matchers between rows, and `for_rows` copies them before a block is
    decoded from them.

    Args:
        matchers: one per row.
        compiler: the compiler they came from (for the mask's size and EOS).
    """

    def __init__(self, matchers: list[LLMatcher | None], compiler: GrammarCompiler) -> None:
        self.matchers = matchers
        self.compiler = compiler

    @classmethod
    def start(
        cls, compiler: GrammarCompiler, constraints: Sequence[OutputConstraint | None]
    ) -> RowGrammars | None:
        """One row per prompt at the start of its constraint; None when no prompt has one."""
        if all(c is None for c in constraints):
            return None
        return cls([None if c is None else compiler.matcher(c) for c in constraints], compiler)

    def select(self, index: Sequence[int]) -> RowGrammars:
        """The rows at `index` (repeats allowed), sharing their matchers."""
        return RowGrammars([self.matchers[i] for i in index], self.compiler)

    def for_rows(self, index: Sequence[int]) -> RowGrammars:
        """Fresh copies of the rows at `index`, to decode a block from."""
        return RowGrammars(
            [None if (m := self.matchers[i]) is None else m.deep_copy() for i in index],
            self.compiler,
        )

    def splice(self, index: Sequence[int], fresh: RowGrammars) -> RowGrammars:
        """A copy whose rows `index` are `fresh`'s rows, in order."""
        matchers = list(self.matchers)
        for j, i in enumerate(index):
            matchers[i] = fresh.matchers[j]
        return RowGrammars(matchers, self.compiler)

    def allowed(self, device: torch.device) -> torch.Tensor:
        """`(rows, vocab)` bool: the tokens each row may take next (all for a row without a
        grammar; only EOS for a row whose matcher has failed, so that it ends)."""
        rows, vocab = len(self.matchers), self.compiler.vocab_size
        words = (vocab + 31) // 32
        bitmask = torch.full((rows, words), -1, dtype=torch.int32)
        pairs = [(m, row) for row, m in enumerate(self.matchers) if m is not None]
        if pairs:
            self.compiler.executor.unsafe_compute_mask_ptr(
                pairs, bitmask.data_ptr(), words * 4, rows
            )
        # Unpacked where the logits are: `(rows, words)` crosses to the device, not the
        # 32x larger `(rows, vocab)`.
        bits = bitmask.to(device)
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(rows, -1)[:, :vocab]
        stuck = ~allowed.any(-1)
        if bool(stuck.any()):
            eos = torch.tensor(self.compiler.eos_token_ids or [0], dtype=torch.long, device=device)
            allowed[stuck.nonzero().squeeze(-1)[:, None], eos[None, :]] = True
        return allowed

    def advance(self, tokens: torch.Tensor) -> None:
        """Consume each row's chosen token (`(rows,)`); a row whose grammar has already
        stopped (it ended) takes nothing."""
        for matcher, token in zip(self.matchers, tokens.tolist(), strict=True):
            if matcher is not None and not matcher.is_stopped():
                matcher.consume_token(int(token))

    def complete(self, row: int) -> bool:
        """Whether row `row`'s text so far is a whole sentence of its grammar (always
        for a row without one)."""
        matcher = self.matchers[row]
        return matcher is None or (not matcher.is_error() and matcher.is_accepting())
