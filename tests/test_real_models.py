"""InferenceGuard on real open-weight models: SmolLM2-135M-Instruct (a Llama-architecture
chat model) and Gemma 3 270M (a base model with sliding-window attention), both from
GGUF files that install offline from the package index.

Each test asks for something the model says unprompted (the capital of France is Paris)
and makes it cost over budget, so the guard has to search, resample and verify against
what the model would otherwise write. Settings are small (N=4, K=2, blocks of 8, a few
dozen tokens) to keep this tier to a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import re

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.baselines import SamplingDecoder
from inference_safeguard.cli import main
from inference_safeguard.lm import CausalLM
from inference_safeguard.scorers import CallableScorer, GuardModelCost, KeywordCost
from inference_safeguard.training import CriticTrainingSettings, train_critic
from langchain_safeguard import ChatSafeguard
from langchain_safeguard import SafeguardLLM as LangChainLLM
from llamaindex_safeguard import SafeguardLLM

pytestmark = pytest.mark.real_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
OTHER_QUESTION = [{"role": "user", "content": "Name a famous museum in France."}]
PARIS = KeywordCost(["Paris"])
CONFIG = GuardConfig(num_candidates=4, beam_width=2, block_size=8, max_new_tokens=24, seed=0)


def says_paris(text: str) -> bool:
    return re.search(r"(?<!\w)paris(?!\w)", text, re.IGNORECASE) is not None


def guard_of(model_and_tokenizer, **kwargs) -> InferenceGuard:
    model, tokenizer = model_and_tokenizer
    return InferenceGuard(model, tokenizer, cost=PARIS, config=CONFIG, **kwargs)


def assert_within_budget(result) -> None:
    assert result.safe or result.refused
    assert not says_paris(result.text)
    assert result.cost <= CONFIG.budget or result.refused


# ------------------------------------------------------------------------- SmolLM2
def test_smollm2_says_the_forbidden_word_unguarded_and_not_under_the_guard(smollm2):
    model, tokenizer = smollm2
    greedy = CONFIG.with_overrides(temperature=0)
    plain = SamplingDecoder(model, tokenizer, cost=PARIS, config=greedy).generate(QUESTION)
    assert says_paris(plain.text) and not plain.safe  # what it would say

    result = guard_of(smollm2).generate(QUESTION)
    assert_within_budget(result)
    assert result.stats.candidates_scored >= CONFIG.num_candidates
    assert result.text.strip()


def test_smollm2_stream_yields_exactly_the_generated_text(smollm2):
    guard = guard_of(smollm2)
    expected = guard.generate(QUESTION)
    with guard.stream(QUESTION) as stream:
        deltas = list(stream)
    assert "".join(deltas) == stream.result.text == expected.text
    assert stream.result.token_ids == expected.token_ids


def test_smollm2_batch_decodes_each_prompt_as_it_decodes_alone(smollm2):
    guard = guard_of(smollm2)
    batch = guard.generate_batch([QUESTION, OTHER_QUESTION])
    alone = [guard.generate(QUESTION), guard.generate(OTHER_QUESTION)]
    assert [r.text for r in batch] == [r.text for r in alone]
    for result in batch:
        assert_within_budget(result)


def test_smollm2_critic_trains_on_rollouts_and_guides_the_search(smollm2, tmp_path):
    model, tokenizer = smollm2
    prompts = [
        QUESTION,
        OTHER_QUESTION,
        [{"role": "user", "content": "Which city has the Eiffel Tower?"}],
    ]
    words = CallableScorer(lambda _, responses: [min(len(r.split()), 20) / 20 for r in responses])
    _, report = train_critic(
        CausalLM(model, tokenizer),
        prompts,
        PARIS,
        words,
        out=tmp_path / "critic",
        budget=0.0,
        block_size=CONFIG.block_size,
        max_new_tokens=16,
        samples_per_prompt=2,
        settings=CriticTrainingSettings(epochs=5, width=32, patience=5),
        progress=False,
    )
    assert (tmp_path / "critic" / "critic.safetensors").is_file()
    assert report.train_points > 0 and report.validation_points > 0

    guard = guard_of(smollm2, critic=tmp_path / "critic")  # loaded back by directory
    result = guard.generate(QUESTION, max_new_tokens=16)
    assert guard.critic is not None
    assert_within_budget(result)


def test_smollm2_behind_a_langchain_chain_keeps_to_the_budget(smollm2):
    chat = ChatSafeguard(guard=guard_of(smollm2))
    prompt = ChatPromptTemplate.from_messages([("user", "What is the capital of {country}?")])
    assert not says_paris((prompt | chat | StrOutputParser()).invoke({"country": "France"}))

    message = chat.invoke(QUESTION[0]["content"])
    safety = message.response_metadata["safety"]
    assert safety["safe"] or safety["refused"]
    assert safety["budget"] == CONFIG.budget
    assert not says_paris(message.content)


def test_smollm2_answers_a_llamaindex_query_engine_within_budget(smollm2_path):
    from llama_index.core import Document, MockEmbedding, VectorStoreIndex

    notes = [
        Document(text="France is a country in Western Europe. Its capital is Paris."),
        Document(text="The Louvre, in Paris, is the most visited museum in the world."),
    ]
    index = VectorStoreIndex.from_documents(notes, embed_model=MockEmbedding(embed_dim=8))
    # LlamaIndex's own loader, given the path of the .gguf file.
    llm = SafeguardLLM.from_model_id(str(smollm2_path), cost=PARIS, config=CONFIG, device="cpu")
    response = index.as_query_engine(llm=llm, similarity_top_k=2).query(
        "What is the capital of France?"
    )
    safety = response.metadata["safety"]
    assert safety["safe"] or safety["refused"]
    assert not says_paris(str(response.response))


# -------------------------------------------------------------------------- Gemma 3
LONG_PROMPT = "Paris is the capital of France. " * 110 + "The capital of France is"
"""About 780 tokens, past Gemma 3's 512-token sliding window; every continuation the
model samples repeats Paris, so the guard resamples blocks and rewinds its cache."""


def test_gemma3_resamples_past_its_sliding_window_and_stays_within_budget(gemma3):
    model, tokenizer = gemma3
    assert len(tokenizer(LONG_PROMPT).input_ids) > model.config.sliding_window
    config = CONFIG.with_overrides(max_new_tokens=16)
    greedy = config.with_overrides(temperature=0)
    plain = SamplingDecoder(model, tokenizer, cost=PARIS, config=greedy).generate(LONG_PROMPT)
    assert says_paris(plain.text)

    guard = InferenceGuard(model, tokenizer, cost=PARIS, config=config)
    result = guard.generate(LONG_PROMPT)
    assert result.stats.resample_rounds >= 1
    assert_within_budget(result)

    with guard.stream(LONG_PROMPT) as stream:
        assert "".join(stream) == result.text


def test_gemma3_guards_a_short_completion(gemma3):
    result = guard_of(gemma3).generate("The capital of France is", max_new_tokens=16)
    assert_within_budget(result)
    assert result.finish_reason in ("stop", "length")


# ------------------------------------------------------- scorer loader and command line
def test_smollm2_loads_as_a_guard_llm_cost_from_its_gguf_path(smollm2_path):
    # A general instruction model asked for a verdict, as a Llama-Guard-style cost: the
    # scorer's own loader reads the GGUF file for the model and the tokenizer.
    judge = GuardModelCost.from_pretrained(
        str(smollm2_path),
        device="cpu",
        template="Is this answer unsafe? Answer yes or no.\nQuestion: {prompt}\n"
        "Answer: {response}\nVerdict:",
        unsafe_token=" yes",
        safe_token=" no",
    )
    prompts = ["How do I clean a kettle?", "How do I clean a kettle?"]
    costs = judge(prompts, ["Descale it with vinegar and rinse.", "Mix bleach and ammonia."])
    assert costs.shape == (2,) and bool(((costs >= 0) & (costs <= 1)).all())
    assert costs[0] != costs[1]  # the verdict reads the response


def test_the_command_line_guards_smollm2_from_its_gguf_path(smollm2_path, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(smollm2_path),
            "--device",
            "cpu",
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--cost-keywords",
            "Paris",
            "--budget",
            "0",
            "--num-candidates",
            "4",
            "--beam-width",
            "2",
            "--block-size",
            "8",
            "--max-new-tokens",
            "16",
            "--seed",
            "0",
            "--json",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    record = json.loads(out.out)
    assert not says_paris(record["text"])
    assert record["safe"] or record["refused"]


def test_gemma3_completes_through_the_langchain_and_llamaindex_loaders(gemma3_path, gemma3):
    prompt = "Paris is the capital of France. The capital of France is"
    settings = {"num_candidates": 4, "beam_width": 2, "block_size": 8, "max_new_tokens": 16}
    # LangChain's loader: the weights the `gemma3` fixture loaded, from its cache.
    langchain_llm = LangChainLLM.from_model_id(
        str(gemma3_path), cost=PARIS, device="cpu", seed=0, **settings
    )
    assert langchain_llm.load_guard().lm.model is gemma3[0]
    text = langchain_llm.invoke(prompt)
    assert not says_paris(text)
    # LlamaIndex's loader reads the GGUF file again.
    llamaindex_llm = SafeguardLLM.from_model_id(
        str(gemma3_path), cost=PARIS, config=CONFIG.with_overrides(**settings), device="cpu"
    )
    completion = llamaindex_llm.complete(prompt)
    assert not says_paris(completion.text)
    assert completion.raw["safety"]["safe"] or completion.raw["safety"]["refused"]


def test_gemma3_loads_as_a_guard_llm_cost_from_its_gguf_path(gemma3_path):
    judge = GuardModelCost.from_pretrained(
        str(gemma3_path),
        device="cpu",
        template="Question: {prompt}\nAnswer: {response}\nIs the answer unsafe (yes or no)?",
        unsafe_token=" yes",
        safe_token=" no",
    )
    prompts = ["How do I clean a kettle?", "How do I clean a kettle?"]
    costs = judge(prompts, ["Descale it with vinegar and rinse.", "Mix bleach and ammonia."])
    assert costs.shape == (2,) and bool(((costs >= 0) & (costs <= 1)).all())
    assert costs[0] != costs[1]
