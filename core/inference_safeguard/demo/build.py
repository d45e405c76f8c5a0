"""Rebuilds the demo world from scratch: tokenizer, base assistant, cost and reward
models, and the latent critic.

`safeguard demo --rebuild` runs `build_demo_world`, deterministically, on a CPU in
minutes. The built files ship with the package under `core/inference_safeguard/demo/assets/`, so the
demo itself trains nothing. Only training prompts are used here; validation prompts
check the result; test prompts are left for evaluation.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from inference_safeguard.demo.corpus import (
    HAZARD_PHRASES,
    TOPICS,
    Example,
    as_messages,
    base_corpus,
    labelled_corpus,
    split_prompts,
)
from inference_safeguard.demo.oracle import is_unsafe, normalise
from inference_safeguard.lm import CausalLM, transcript
from inference_safeguard.scorers import BEAVER_TEMPLATE
from inference_safeguard.testing import train_tokenizer
from inference_safeguard.training import CriticTrainingSettings, train_critic

ASSETS = Path(__file__).parent / "assets"
BUDGET = 0.5
"""The demo's budget: the cost model gives P(unsafe), so a response is safe iff <= 0.5."""


@dataclass(frozen=True)
class BuildSettings:
    """Sizes and training settings of the demo world (defaults: what ships)."""

    seed: int = 0
    vocab_size: int = 1024
    responses_per_prompt: int = 24
    labelled_per_kind: int = 3
    prefixes_per_response: int = 3
    lm_hidden: int = 192
    lm_layers: int = 4
    lm_heads: int = 6
    lm_epochs: int = 6
    lm_lr: float = 2e-3
    scorer_hidden: int = 96
    scorer_layers: int = 2
    scorer_epochs: int = 4
    scorer_lr: float = 2e-3
    batch_size: int = 32
    critic_samples_per_prompt: int = 16
    critic_block_size: int = 8
    critic_max_new_tokens: int = 64


def build_demo_world(
    out_dir: Path = ASSETS, settings: BuildSettings = BuildSettings()
) -> dict[str, object]:
    """Train everything and save it to `out_dir`; returns the manifest it writes."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    splits = split_prompts(settings.seed)
    base_examples = base_corpus(splits["train"], settings.responses_per_prompt, settings.seed)
    labelled = labelled_corpus(splits["train"], settings.labelled_per_kind, settings.seed + 1)
    tokenizer = train_tokenizer(
        [p.text for p in splits["train"]] + [e.response for e in base_examples + labelled],
        settings.vocab_size,
    )
    base = _llama(
        LlamaForCausalLM, tokenizer, settings.lm_hidden, settings.lm_layers, settings.lm_heads
    )
    lm_loss = fit(
        base,
        _lm_batches(tokenizer, base_examples, settings),
        settings.lm_epochs,
        settings.lm_lr,
        _lm_loss,
        "base assistant",
    )

    cost_inputs, unsafe, reward_inputs, rewards = _scorer_data(labelled, settings)
    cost, cost_loss = _train_scorer(
        tokenizer, cost_inputs, unsafe, _bce_loss, "cost model", settings, settings.seed + 1
    )
    reward, reward_loss = _train_scorer(
        tokenizer, reward_inputs, rewards, _mse_loss, "reward model", settings, settings.seed + 2
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, model in (("base", base), ("cost", cost), ("reward", reward)):
        # transformers wraps `to` with functools.wraps, whose typeshed stub binds no self.
        model.to(torch.float16).save_pretrained(out_dir / name)  # type: ignore[arg-type]
        tokenizer.save_pretrained(out_dir / name)
    manifest = {
        "settings": asdict(settings),
        "budget": BUDGET,
        "final_loss": {"base": lm_loss, "cost": cost_loss, "reward": reward_loss},
        "parameters": {
            name: sum(p.numel() for p in model.parameters())
            for name, model in (("base", base), ("cost", cost), ("reward", reward))
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / "prompts.json").write_text(
        json.dumps(
            {split: [asdict(p) for p in prompts] for split, prompts in splits.items()}, indent=1
        )
    )
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    manifest["critic"] = build_demo_critic(out_dir, settings)
    manifest["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def build_demo_critic(
    out_dir: Path = ASSETS, settings: BuildSettings = BuildSettings()
) -> dict[str, object]:
    """Train the latent critic of the world in `out_dir` and save it to `out_dir/critic`.

    The critic learns from rollouts of the saved base model (as `load_demo_world`
    loads it) on the training prompts, labelled by the saved cost and reward models.

    Returns:
        The held-out metrics of its training report (also stored in `critic.json`).
    """
    from inference_safeguard.demo.world import (
        load_demo_world,  # the world as it ships: saved weights
    )

    world = load_demo_world(out_dir)
    critic, report = train_critic(
        CausalLM(world.model, world.tokenizer),
        world.prompts["train"],
        world.cost,
        world.reward,
        out=None,
        budget=world.budget,
        block_size=settings.critic_block_size,
        max_new_tokens=settings.critic_max_new_tokens,
        samples_per_prompt=settings.critic_samples_per_prompt,
        settings=CriticTrainingSettings(seed=settings.seed),
        seed=settings.seed,
    )
    # Name the base model by its place in the world, not by this machine's path to it.
    critic.set_base_model_name("base")
    critic.save(out_dir / "critic", training=report.as_dict())
    summary = {
        key: value
        for key, value in report.as_dict().items()
        if key not in ("train_loss", "validation_loss", "settings")
    }
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}


# ----------------------------------------------------------------- models
def _llama(
    cls: type[PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    hidden: int,
    layers: int,
    heads: int,
) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config.num_labels = 1
    return cls(config)


def _train_scorer(
    tokenizer: PreTrainedTokenizerFast,
    inputs: list[str],
    labels: list[float],
    loss: Loss,
    name: str,
    settings: BuildSettings,
    seed: int,
) -> tuple[PreTrainedModel, float]:
    """A one-output `LlamaForSequenceClassification` fitted to `labels`, and its last loss.

    Seeded on its own (`seed`), so that each scorer's weights depend on its data and
    settings alone, not on how much randomness the models trained before it drew.
    """
    torch.manual_seed(seed)
    model = _llama(
        LlamaForSequenceClassification, tokenizer, settings.scorer_hidden, settings.scorer_layers, 4
    )
    batches = _scorer_batches(tokenizer, inputs, labels, settings)
    return model, fit(model, batches, settings.scorer_epochs, settings.scorer_lr, loss, name)


# ------------------------------------------------------------------- data
Batch = dict[str, torch.Tensor]


def _lm_batches(
    tokenizer: PreTrainedTokenizerFast, examples: list[Example], settings: BuildSettings
) -> list[Batch]:
    """Prompt (chat template) + response + EOS; the loss covers the response only."""
    rows = []
    for example in examples:
        prompt = tokenizer.apply_chat_template(
            as_messages(example.prompt.text),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
        ids = list(prompt) + response + [tokenizer.eos_token_id]
        rows.append((ids, [-100] * len(prompt) + response + [tokenizer.eos_token_id]))
    return _pad_batches(rows, tokenizer.pad_token_id, settings)


def _scorer_data(
    examples: list[Example], settings: BuildSettings
) -> tuple[list[str], list[float], list[str], list[float]]:
    """Training inputs (Beaver format) of the cost model and of the reward model.

    Both see responses and response prefixes. A prefix is labelled unsafe iff it has
    begun a hazardous instruction (`costly`: the cost of what has been said); its reward
    label is the finished response's (what it leads to). The cost model also sees splices
    of two responses cut at random words: a small base model garbles sentences that way,
    and a hazard phrase inside garbled text must still count.

    Returns:
        Cost inputs and labels (0 or 1), reward inputs and labels.
    """
    rng = random.Random(settings.seed + 2)
    cost_inputs, unsafe, reward_inputs, rewards = [], [], [], []
    for example in examples:
        # Scorers see the prompt as the guard hands it over: a plain transcript.
        prompt = transcript(as_messages(example.prompt.text))
        # Safe advice appended keeps the label: the model must not "forget" a hazard
        # said early in a long response.
        padding = rng.sample(rng.choice(TOPICS).advice, rng.randint(0, 3))
        words = " ".join([example.response, *padding]).split()
        other = rng.choice(examples).response.split()
        # Splice right after a hazard when there is one: garbled text that follows an
        # unsafe phrase is where a weak cost model loses track of it.
        said = _first_unsafe_cut(words, prompt)
        cut = (
            rng.randint(1, len(words))
            if said is None
            else min(len(words), said + rng.randint(0, 2))
        )
        splice = words[:cut] + other[rng.randrange(len(other)) :]
        for text in _prefixes(words, rng, settings.prefixes_per_response, prompt):
            rendered = BEAVER_TEMPLATE.format(prompt=prompt, response=text)
            cost_inputs.append(rendered)
            unsafe.append(float(costly(prompt, text)))
            reward_inputs.append(rendered)
            rewards.append(example.reward)
        for text in _prefixes(splice, rng, settings.prefixes_per_response, prompt):
            cost_inputs.append(BEAVER_TEMPLATE.format(prompt=prompt, response=text))
            unsafe.append(float(costly(prompt, text)))
    return cost_inputs, unsafe, reward_inputs, rewards


def _prefixes(words: list[str], rng: random.Random, count: int, prompt: str) -> list[str]:
    """The whole text and up to `count` prefixes of it cut at random words, plus, when it
    begins a hazard, the prefixes that end on the hazard's onset and one word before."""
    cuts = {len(words)} | {rng.randint(1, len(words)) for _ in range(count)}
    said = _first_unsafe_cut(words, prompt)
    if said is not None:
        cuts |= {said - 1, said}
    return [" ".join(words[:cut]) for cut in sorted(cuts)]


def _first_unsafe_cut(words: list[str], prompt: str) -> int | None:
    """The fewest leading words that are already `costly`, or None."""
    return next(
        (cut for cut in range(1, len(words) + 1) if costly(prompt, " ".join(words[:cut]))),
        None,
    )


HAZARD_ONSETS: tuple[str, ...] = tuple(
    " ".join(phrase.split()[: max(2, (len(phrase.split()) + 1) // 2)]) for phrase in HAZARD_PHRASES
)
"""The first half (at least two words) of each hazard phrase: "spray the weed poison"."""
_ONSETS = tuple(normalise(onset) for onset in HAZARD_ONSETS)


def costly(prompt: str, response: str) -> bool:
    """The cost model's training label: whether `response` has begun a hazardous
    instruction (holds the onset of a hazard phrase), finished or not.

    The oracle judges finished responses by whole phrases. Labelling a prefix by the
    oracle would make the cost model accept a beam one word short of a hazard, and
    the search would then keep beams (the reward model likes them) whose every
    continuation is unsafe: a dead end that ends in refusal. Once an instruction has
    begun, what has been said is already unsafe; no safe sentence of the corpus
    starts one (a test checks).
    """
    text = normalise(response)
    return is_unsafe(prompt, response) or any(onset in text for onset in _ONSETS)


def _scorer_batches(
    tokenizer: PreTrainedTokenizerFast,
    inputs: list[str],
    targets: list[float],
    settings: BuildSettings,
) -> list[Batch]:
    rows = [
        (tokenizer(text)["input_ids"], target) for text, target in zip(inputs, targets, strict=True)
    ]
    return _pad_batches(rows, tokenizer.pad_token_id, settings)


def _pad_batches(
    rows: Sequence[tuple[list[int], list[int] | float]], pad_id: int, settings: BuildSettings
) -> list[Batch]:
    """Right-padded batches; `labels` are token lists (LM) or one float per row."""
    rng = random.Random(settings.seed + 3)
    rows = sorted(rows, key=lambda row: len(row[0]))
    batches = []
    for start in range(0, len(rows), settings.batch_size):
        chunk = rows[start : start + settings.batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, _) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        token_labels = [t for _, t in chunk if isinstance(t, list)]
        if token_labels:
            labels = torch.full((len(chunk), width), -100)
            for i, row_labels in enumerate(token_labels):
                labels[i, : len(row_labels)] = torch.tensor(row_labels)
        else:
            labels = torch.tensor([float(t) for _, t in chunk if not isinstance(t, list)])
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    rng.shuffle(batches)
    return batches


# --------------------------------------------------------------- training
Loss = Callable[[PreTrainedModel, Batch], torch.Tensor]


def _lm_loss(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    return model(**batch).loss


def _bce_loss(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], batch["labels"])


def _mse_loss(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.mse_loss(logits[:, 0], batch["labels"])


def fit(
    model: PreTrainedModel,
    batches: Sequence[Batch],
    epochs: int,
    lr: float,
    loss_fn: Loss,
    name: str,
) -> float:
    """AdamW with warm-up and cosine decay over `epochs` passes.

    Returns:
        The mean loss of the last epoch.
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    total = epochs * len(batches)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        ),
    )
    mean = float("nan")
    for epoch in range(epochs):
        losses = []
        bar = tqdm(batches, desc=f"{name} epoch {epoch + 1}/{epochs}", leave=False)
        for batch in bar:
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        mean = sum(losses) / len(losses)
        tqdm.write(f"{name}: epoch {epoch + 1}/{epochs}, mean loss {mean:.4f}")
    model.eval()
    return round(mean, 4)
