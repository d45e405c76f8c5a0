"""Tiny local Llama models and tokenizers for tests, examples and benchmarks.

Nothing here touches a model hub: the tokenizer is a sentencepiece-style BPE trained in a
second on a generated English corpus, and the models are random-weight Llamas built
from a `LlamaConfig`. Saved with `save_pretrained`, they load through the same
`from_pretrained` paths as real checkpoints.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

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
    tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, **config_kwargs: int | float
) -> LlamaForCausalLM:
    """A seeded random-weight `LlamaForCausalLM` for the tokenizer; see `tiny_llama_config`."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, **config_kwargs)).eval()


def build_tiny_classifier(
    tokenizer: PreTrainedTokenizerFast,
    *,
    num_labels: int = 1,
    seed: int = 0,
    **config_kwargs: int | float,
) -> LlamaForSequenceClassification:
    """A random-weight `LlamaForSequenceClassification`: a stand-in reward or cost model."""
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, **config_kwargs)
    config.num_labels = num_labels
    return LlamaForSequenceClassification(config).eval()
