"""Stand-ins for tests, examples and benchmarks: tiny local Llamas and tokenizers, and
`ScriptedGuard`, an InferenceGuard whose search answers from a script.

Nothing here touches a model hub: the tokenizer is a sentencepiece-style BPE trained in a
second on a generated English corpus, and the models are random-weight Llamas built
from a `LlamaConfig`. Saved with `save_pretrained`, they load through the same
`from_pretrained` paths as real checkpoints.
"""

from __future__ import annotations

import itertools
import random
import re
import string
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any, TypedDict, Unpack, cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from inference_safeguard.config import GuardConfig
from inference_safeguard.critic import CriticConfig, LatentCritic, ModelFingerprint
from inference_safeguard.decoder import Response
from inference_safeguard.guard import InferenceGuard
from inference_safeguard.lm import EncodedPrompt
from inference_safeguard.results import GuardResult
from inference_safeguard.scorers import CallableScorer, Scorer
from inference_safeguard.search import first_stop

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a an and or but if then so because while when where how what who which this that "
    "these those it its they them we you your our my he she his her is are was were be been "
    "have has had do does did can could will would should may might must not no yes very "
    "more most less few many much some any all each every other such own same new old good "
    "bad great small large long short high low early late young right left big little "
    "time year day week month hour minute people person man woman child friend family "
    "house home room door window table chair book paper letter word story name place city "
    "country world water fire earth air food bread milk tea coffee apple garden tree "
    "flower river road car train plane ship bike school teacher student class lesson "
    "music song game sport team ball dog cat bird fish horse cow sun moon star sky rain "
    "snow wind cloud light dark color red blue green white black make take give get go come "
    "see look find think know want like love help work play read write walk run talk "
    "speak tell ask answer open close start stop begin end keep hold bring buy sell pay "
    "cook clean wash build cut carry move turn show try use need feel seem leave put "
    "safe careful simple quick slow warm cold hot happy sad kind calm quiet loud"
).split()


def _corpus(num_sentences: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
    return sentences


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, *, chat_template: bool = True
) -> PreTrainedTokenizerFast:
    """Train a sentencepiece-style (Metaspace) BPE tokenizer on `texts`.

    Special tokens: `<pad>`, `<s>` (BOS), `</s>` (EOS), `<unk>` and the chat role
    markers `<|system|>`, `<|user|>`, `<|assistant|>`, `<|tool|>`. With
    `chat_template=False` the tokenizer has no chat template, as many base models do.
    """
    specials = [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|tool|>",
    ]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # Every printable ASCII character and the newline, so any English text or
        # JSON tokenizes without <unk>, whatever the corpus holds.
        initial_alphabet=[c for c in string.printable if not c.isspace()] + ["\n"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_tokenizer(
    vocab_size: int = 768, *, chat_template: bool = True, seed: int = 0
) -> PreTrainedTokenizerFast:
    """The test tokenizer: `train_tokenizer` on a generated English corpus."""
    return train_tokenizer(_corpus(4000, seed), vocab_size, chat_template=chat_template)


class TinyLlamaSizes(TypedDict, total=False):
    """The keyword arguments of `tiny_llama_config` that `build_tiny_*` pass on."""

    hidden_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    initializer_range: float


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.2,
) -> LlamaConfig:
    """A `LlamaConfig` sized for CPU tests, with the tokenizer's special token ids.

    The large `initializer_range` makes a random model's next-token distributions
    peaked and context dependent, so its samples repeat some words often, which is
    what the safety tests need from it.
    """
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, **config_kwargs: Unpack[TinyLlamaSizes]
) -> LlamaForCausalLM:
    """A seeded random-weight `LlamaForCausalLM` for the tokenizer; see `tiny_llama_config`."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, **config_kwargs)).eval()


def build_tiny_classifier(
    tokenizer: PreTrainedTokenizerFast,
    *,
    num_labels: int = 1,
    seed: int = 0,
    **config_kwargs: Unpack[TinyLlamaSizes],
) -> LlamaForSequenceClassification:
    """A random-weight `LlamaForSequenceClassification`: a stand-in reward or cost model."""
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, **config_kwargs)
    config.num_labels = num_labels
    return LlamaForSequenceClassification(config).eval()


def build_random_critic(
    model: PreTrainedModel,
    *,
    budget: float = 0.0,
    block_size: int = 8,
    width: int = 64,
    cost_probe: bool = True,
    seed: int = 0,
) -> LatentCritic:
    """An untrained `LatentCritic` for `model` (random heads, unit statistics): for tests of
    the plumbing and for timing, where the critic's predictions do not matter."""
    torch.manual_seed(seed)
    config = CriticConfig(
        hidden_size=model.config.get_text_config().hidden_size,
        width=width,
        cost_probe=cost_probe,
        budget=budget,
        budget_range=(budget - 1.0, budget + 1.0),
        block_size=block_size,
        z_scale=1.0,
        fingerprint=ModelFingerprint.of(model),
    )
    return LatentCritic(config).eval()


# ------------------------------------------------------------------ scripted guard
Replies = Callable[[str], str] | Sequence[str]
"""A function from the prompt (as scorers see it: a `role: content` transcript) to the
reply, or replies to give in turn (the last one repeats)."""


class ScriptedGuard(InferenceGuard):
    """An `InferenceGuard` whose search returns scripted replies: for tests, and for
    offline examples of what a capable model would do (call tools, answer in JSON).

    Only the search is scripted. Everything around it is the real InferenceGuard: the
    prompt is validated and rendered (chat template, tools), the cost model scores the
    reply, and an over-budget reply is refused, returned flagged or raised
    (`on_unsafe`), so scripted tool calls are held to the budget like any text.

    Args:
        model: a causal LM, for its context window (it generates nothing): give it a
            window that fits the prompts, e.g. `build_tiny_llama(tokenizer,
            max_position_embeddings=4096)` for prompts with tool schemas.
        tokenizer: its tokenizer, with a chat template for message prompts.
        replies: see `Replies`. Stop strings cut a reply; `max_new_tokens` does not.
        cost: cost model (default: every reply costs 0).
        reward: reward model, or None.
        config: default config.
        allow_special_tokens_in_content: see `InferenceGuard`.

    Attributes:
        prompts: every prompt decoded, in order, as encoded for the model (`.text` is
            what the scorers see).
        search_sizes: prompts per search, in order (one search per `generate_batch`,
            whatever its size).

    A stream yields the checked reply (or the refusal) a word at a time.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        replies: Replies,
        *,
        cost: Scorer | None = None,
        reward: Scorer | None = None,
        config: GuardConfig | None = None,
        allow_special_tokens_in_content: bool = False,
    ) -> None:
        if isinstance(replies, str) or not (callable(replies) or replies):
            raise ValueError("replies must be a function of the prompt or a non-empty list")
        if cost is None:
            cost = CallableScorer(lambda prompts, responses: [0.0] * len(responses))
        super().__init__(
            model,
            tokenizer,
            cost=cost,
            reward=reward,
            config=config,
            allow_special_tokens_in_content=allow_special_tokens_in_content,
        )
        self.replies = replies if callable(replies) else list(replies)
        self.prompts: list[EncodedPrompt] = []
        self.search_sizes: list[int] = []
        self._turns = itertools.count()
        self._lock = threading.Lock()

    def _identity_settings(self) -> dict[str, Any]:
        return {**super()._identity_settings(), "replies": self.replies}

    @property
    def searches(self) -> int:
        """How many searches ran."""
        return len(self.search_sizes)

    @property
    def rendered_prompts(self) -> list[str]:
        """Every prompt decoded, as the model saw it: rendered with the chat template (and
        tools), detokenized with special tokens kept."""
        # One id list decodes to one str; the stub unions in the batched list[str].
        return [cast(str, self.lm.tokenizer.decode(prompt.ids)) for prompt in self.prompts]

    def _decode(
        self,
        prompts: list[EncodedPrompt],
        config: GuardConfig,
        seeds: list[int],
        cancel: threading.Event | None = None,
    ) -> list[Response]:
        with self._lock:  # concurrent calls take their turns one at a time
            self.search_sizes.append(len(prompts))
            self.prompts.extend(prompts)
            texts = [self._reply(prompt) for prompt in prompts]
        responses = []
        for text in texts:
            cut = first_stop(text, config.stop)
            text = text if cut is None else text[:cut]
            ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            responses.append(Response(token_ids=list(ids), text=text, finish_reason="stop"))
        return responses

    def _reply(self, prompt: EncodedPrompt) -> str:
        if callable(self.replies):
            return self.replies(prompt.text)
        return self.replies[min(next(self._turns), len(self.replies) - 1)]

    def _stream(
        self, prompt: EncodedPrompt, config: GuardConfig, cancel: threading.Event | None
    ) -> Generator[str, None, GuardResult]:
        [result] = self._generate_encoded([prompt], config, cancel)
        yield from re.findall(r"\s*\S+|\s+", result.text)
        return result
