"""SafeguardLLM as a LlamaIndex LLM on a tiny local Llama: completion, chat, streaming,
real async, metadata, callbacks and instrumentation, safety records, bad input."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import PROMPT
from llama_index.core.base.llms.types import ImageBlock, TextBlock
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.callbacks.schema import EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
)
from llama_index.core.llms import ChatMessage, MessageRole
from pydantic import Field, ValidationError

from inference_safeguard import (
    ChatTemplateError,
    GuardConfig,
    InferenceGuard,
    InvalidPromptError,
    MissingCostModelError,
    PromptTooLongError,
)
from inference_safeguard.config import CALL_SHAPE_FIELDS
from inference_safeguard.scorers import CallableScorer
from inference_safeguard.testing import ScriptedGuard, build_random_critic, build_tiny_tokenizer
from llamaindex_safeguard import SafeguardLLM

SAFETY_KEYS = {"safe", "cost", "budget", "reward", "refused", "resample_rounds", "constraints"}
USER = [ChatMessage(role=MessageRole.USER, content=PROMPT)]


@pytest.fixture()
def config() -> GuardConfig:
    return GuardConfig(num_candidates=8, beam_width=2, block_size=4, max_new_tokens=16)


@pytest.fixture()
def guard(tiny_model, tiny_tokenizer, keyword_cost, config) -> InferenceGuard:
    return InferenceGuard(tiny_model, tiny_tokenizer, cost=keyword_cost, config=config)


@pytest.fixture()
def llm(guard) -> SafeguardLLM:
    return SafeguardLLM(guard=guard)


@pytest.fixture(scope="module")
def plain_tokenizer():
    """A tokenizer without a chat template, as base models have."""
    return build_tiny_tokenizer(chat_template=False)


@pytest.fixture()
def base_llm(tiny_model, plain_tokenizer, keyword_cost, config) -> SafeguardLLM:
    return SafeguardLLM(
        guard=InferenceGuard(tiny_model, plain_tokenizer, cost=keyword_cost, config=config)
    )


def user_turn(text: str = PROMPT) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------- metadata
def test_metadata_comes_from_the_base_model_and_the_guard_config(llm, guard, config):
    metadata = llm.metadata
    assert metadata.context_window == guard.lm.model.config.max_position_embeddings == 512
    assert metadata.num_output == config.max_new_tokens
    assert metadata.is_chat_model and metadata.is_function_calling_model
    assert metadata.model_name == guard.lm.name


def test_a_model_without_chat_template_is_neither_chat_nor_function_calling(base_llm):
    assert not base_llm.metadata.is_chat_model
    assert not base_llm.metadata.is_function_calling_model


def test_context_window_and_model_name_can_be_set(guard):
    llm = SafeguardLLM(guard=guard, context_window=300, model_name="tiny")
    assert (llm.metadata.context_window, llm.metadata.model_name) == (300, "tiny")


def test_payload_for_observability_names_the_decoder_and_its_config(llm, config):
    payload = llm.to_payload()
    assert payload["class_name"] == "SafeguardLLM"
    assert payload["decoder"] == "InferenceGuard"
    assert payload["guard_config"]["num_candidates"] == config.num_candidates
    json.dumps(payload, default=str)  # events serialise it


def test_encode_uses_the_models_tokenizer(llm, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert llm.encode(PROMPT) == ids


# ------------------------------------------------------------------- completion
def test_complete_wraps_the_prompt_as_a_user_turn_and_attaches_the_safety_record(
    llm, guard, keyword_cost
):
    response = llm.complete(PROMPT, seed=3)
    expected = guard.generate(user_turn(), seed=3)
    assert response.text == expected.text
    assert response.additional_kwargs["safety"] == expected.safety_record()
    assert response.raw["safety"] == expected.safety_record()
    assert set(response.raw["safety"]) == SAFETY_KEYS
    assert response.additional_kwargs["finish_reason"] == expected.finish_reason
    usage = response.raw["usage"]
    assert usage["completion_tokens"] == len(expected.token_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert float(keyword_cost([PROMPT], [response.text])[0]) <= guard.config.budget


def test_formatted_completion_is_a_plain_text_prompt(llm, guard):
    assert llm.complete(PROMPT, formatted=True, seed=4).text == guard.generate(PROMPT, seed=4).text


def test_completion_to_prompt_makes_a_plain_text_prompt(guard):
    llm = SafeguardLLM(guard=guard, completion_to_prompt=lambda p: f"Question: {p}\nAnswer:")
    expected = guard.generate(f"Question: {PROMPT}\nAnswer:", seed=5)
    assert llm.complete(PROMPT, seed=5).text == expected.text


def test_a_base_model_completes_plain_text(base_llm):
    assert base_llm.complete(PROMPT, seed=6).text == base_llm.guard.generate(PROMPT, seed=6).text


def test_fields_set_on_the_llm_apply_to_every_call(guard):
    llm = SafeguardLLM(guard=guard, max_new_tokens=3, budget=2.0)
    assert llm.metadata.num_output == 3
    response = llm.complete(PROMPT, seed=0)
    assert response.raw["usage"]["completion_tokens"] <= 3
    assert response.additional_kwargs["safety"]["budget"] == 2.0
    assert llm.complete(PROMPT, seed=0, budget=0.0).additional_kwargs["safety"]["budget"] == 0.0
    assert guard.config.max_new_tokens == 16  # the guard itself is unchanged


def test_invalid_fields_fail_at_construction(guard):
    with pytest.raises(ValidationError, match="multiple of beam_width"):
        SafeguardLLM(guard=guard, num_candidates=3)


def test_every_guard_config_field_is_a_described_llm_field():
    for name in GuardConfig.model_fields:
        if name in CALL_SHAPE_FIELDS:  # set per call: structured_predict, chat_with_tools
            assert name not in SafeguardLLM.model_fields, name
            continue
        field = SafeguardLLM.model_fields[name]
        assert field.default is None and field.description, name


def test_per_call_keywords_override_the_guard_config(llm):
    response = llm.complete(PROMPT, max_new_tokens=3, seed=0)
    assert response.raw["usage"]["completion_tokens"] <= 3
    assert response.raw["stats"]["blocks"] == 1


def test_unknown_keyword_is_rejected_with_the_valid_names(llm):
    with pytest.raises(TypeError, match="max_new_tokens"):
        llm.complete(PROMPT, max_tokens=3)


def test_invalid_override_is_rejected_by_the_config(llm):
    with pytest.raises(ValidationError, match="multiple of beam_width"):
        llm.complete(PROMPT, num_candidates=3)


# ------------------------------------------------------------------------- chat
def test_chat_renders_the_conversation_with_the_chat_template(llm, guard):
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="Answer briefly."),
        ChatMessage(role=MessageRole.USER, content=PROMPT),
    ]
    response = llm.chat(messages, seed=7)
    expected = guard.generate(
        [{"role": "system", "content": "Answer briefly."}, *user_turn()], seed=7
    )
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content == expected.text
    assert response.additional_kwargs["safety"] == expected.safety_record()
    assert not response.message.additional_kwargs  # nothing leaks into later prompts


def test_chat_on_a_base_model_completes_the_messages_as_text(base_llm):
    response = base_llm.chat(USER, seed=8)
    expected = base_llm.guard.generate(base_llm.messages_to_prompt(USER), seed=8)
    assert response.message.content == expected.text


def test_over_budget_answer_is_refused_and_flagged(tiny_model, tiny_tokenizer, config):
    refusal = config.refusal_text
    only_refusals = CallableScorer(lambda p, r: float(r != refusal), batched=False)
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=only_refusals, config=config)
    response = SafeguardLLM(guard=guard).chat(USER, budget=0.5, seed=0)
    assert response.message.content == refusal
    safety = response.additional_kwargs["safety"]
    assert safety["refused"] and not safety["safe"] and safety["cost"] == 1.0
    assert response.additional_kwargs["finish_reason"] == "safety"


def test_a_stop_string_is_one_stop_sequence_not_one_per_character(tiny_model, tiny_tokenizer):
    guard = ScriptedGuard(tiny_model, tiny_tokenizer, ["Hi. Are You. there"])
    assert SafeguardLLM(guard, stop="You.").complete("hi").text == "Hi. Are "
    assert SafeguardLLM(guard).chat(USER, stop="You.").message.content == "Hi. Are "


# -------------------------------------------------------------------- streaming
def test_stream_complete_yields_the_guards_deltas_and_ends_with_the_record(llm, guard):
    chunks = list(llm.stream_complete(PROMPT, seed=9, stream_commit="block"))
    stream = guard.stream(user_turn(), seed=9, stream_commit="block")
    expected = list(stream)
    result = stream.result
    deltas = [c.delta for c in chunks[:-1]]
    assert len(deltas) > 1
    assert deltas == expected
    assert [c.text for c in chunks[:-1]] == ["".join(deltas[: i + 1]) for i in range(len(deltas))]
    last = chunks[-1]
    assert last.delta == "" and last.text == result.text
    assert last.additional_kwargs["safety"] == result.safety_record()
    assert all("safety" not in c.additional_kwargs for c in chunks[:-1])


def test_stream_chat_yields_what_chat_returns(llm):
    expected = llm.chat(USER, seed=10)
    chunks = list(llm.stream_chat(USER, seed=10))
    assert "".join(c.delta for c in chunks) == expected.message.content
    assert chunks[-1].message.content == expected.message.content
    assert chunks[-1].raw["safety"] == expected.raw["safety"]


def test_bad_stream_input_raises_when_the_stream_is_requested(llm):
    with pytest.raises(InvalidPromptError):
        llm.stream_chat([])
    with pytest.raises(PromptTooLongError):
        llm.stream_complete("dog " * 600)


# ------------------------------------------------------------------------ async
async def test_async_methods_return_what_the_sync_ones_do(llm):
    assert (await llm.acomplete(PROMPT, seed=11)).text == llm.complete(PROMPT, seed=11).text
    chat = await llm.achat(USER, seed=12)
    assert chat.message.content == llm.chat(USER, seed=12).message.content
    assert chat.additional_kwargs["safety"]["safe"]


async def test_async_streams_deliver_committed_deltas_and_the_record(llm, guard):
    chunks = [c async for c in await llm.astream_chat(USER, seed=13, stream_commit="block")]
    stream = guard.stream(user_turn(), seed=13, stream_commit="block")
    expected = list(stream)
    assert [c.delta for c in chunks[:-1]] == expected and len(expected) > 1
    assert chunks[-1].additional_kwargs["safety"] == stream.result.safety_record()
    completion = [c async for c in await llm.astream_complete(PROMPT, seed=13)]
    assert completion[-1].text == llm.complete(PROMPT, seed=13).text
    assert completion[-1].raw["safety"]["safe"]


async def test_concurrent_streams_each_report_their_own_record(tiny_model, tiny_tokenizer, config):
    length = CallableScorer(lambda p, r: float(len(r)), batched=False)
    guard = InferenceGuard(tiny_model, tiny_tokenizer, cost=length, config=config)
    llm = SafeguardLLM(guard=guard, budget=1000.0)

    async def run(seed: int) -> list:
        return [c async for c in await llm.astream_chat(USER, seed=seed, stream_commit="block")]

    streams = await asyncio.gather(*(run(seed) for seed in range(4)))
    assert len({stream[-1].message.content for stream in streams}) > 1
    for chunks in streams:
        text = "".join(c.delta for c in chunks)
        assert chunks[-1].additional_kwargs["safety"]["cost"] == len(text)


def test_interleaved_streams_each_end_with_their_own_record(tiny_model, tiny_tokenizer):
    """Streams on one guard may interleave (a scripted guard settles each result before
    the stream's first delta); each must end with its own record."""
    length = CallableScorer(lambda p, r: float(len(r)), batched=False)
    replies = ["A short one.", "A much longer reply than the first."]
    guard = ScriptedGuard(tiny_model, tiny_tokenizer, replies, cost=length)
    llm = SafeguardLLM(guard=guard, budget=1000.0)
    streams = [llm.stream_chat(USER), llm.stream_complete(PROMPT)]
    firsts = [next(stream) for stream in streams]  # both results are settled now
    for first, stream, reply in zip(firsts, streams, replies, strict=True):
        chunks = [first, *stream]
        assert "".join(c.delta for c in chunks) == reply
        assert chunks[-1].additional_kwargs["safety"]["cost"] == len(reply)


async def test_async_generation_leaves_the_event_loop_free(llm):
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        await llm.acomplete(PROMPT, seed=14, max_new_tokens=48, num_candidates=32)
        during_complete = ticks
        async for _ in await llm.astream_chat(USER, seed=14, max_new_tokens=48):
            pass
    finally:
        task.cancel()
    assert during_complete > 2
    assert ticks > during_complete + 2


async def test_async_bad_input_raises_typed_errors(llm):
    with pytest.raises(InvalidPromptError):
        await llm.acomplete("")
    with pytest.raises(PromptTooLongError):
        await llm.astream_chat([ChatMessage(content="dog " * 600)])


# ------------------------------------------------------ callbacks, instrumentation
def test_callback_manager_sees_one_llm_event_per_call(guard):
    debug = LlamaDebugHandler()
    llm = SafeguardLLM(guard=guard, callback_manager=CallbackManager([debug]))
    llm.complete(PROMPT, seed=0)
    llm.chat(USER, seed=0)
    list(llm.stream_chat(USER, seed=0))
    pairs = debug.get_event_pairs(CBEventType.LLM)
    assert len(pairs) == 3
    completion_end = pairs[0][1].payload[EventPayload.COMPLETION]
    assert completion_end.additional_kwargs["safety"]["safe"]
    stream_end = pairs[2][1].payload[EventPayload.RESPONSE]
    assert "safety" in stream_end.additional_kwargs


class _Collector(BaseEventHandler):
    events: list[BaseEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "Collector"

    def handle(self, event: BaseEvent, **kwargs: object) -> None:
        self.events.append(event)


@pytest.fixture()
def instrumentation_events():
    collector = _Collector()
    root = get_dispatcher()
    root.add_event_handler(collector)
    yield collector.events
    root.event_handlers.remove(collector)


def test_instrumentation_events_fire_with_the_safety_record(llm, instrumentation_events):
    llm.complete(PROMPT, seed=0)
    list(llm.stream_chat(USER, seed=0, stream_commit="block"))
    kinds = [type(e) for e in instrumentation_events]
    assert LLMCompletionEndEvent in kinds
    assert kinds.count(LLMChatStartEvent) == kinds.count(LLMChatEndEvent) == 1
    assert LLMChatInProgressEvent in kinds
    [end] = [e for e in instrumentation_events if isinstance(e, LLMChatEndEvent)]
    assert end.response.additional_kwargs["safety"]["safe"]


# -------------------------------------------------------------------- bad input
@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_raises_invalid_prompt(llm, base_llm, prompt):
    with pytest.raises(InvalidPromptError):
        llm.complete(prompt)
    with pytest.raises(InvalidPromptError):
        base_llm.complete(prompt)
    with pytest.raises(InvalidPromptError):
        llm.chat([ChatMessage(role=MessageRole.USER, content=prompt)])


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user", "content": "Hello"}],
        [ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(image=b"\x89PNG")])],
    ],
    ids=["empty", "dict", "image"],
)
def test_malformed_messages_raise_invalid_prompt(llm, messages):
    with pytest.raises(InvalidPromptError):
        llm.chat(messages)


def _after_call(**kwargs: object) -> list[ChatMessage]:
    return [
        ChatMessage(role=MessageRole.USER, content="Add 2 and 3."),
        ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs=kwargs),
    ]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (_after_call(tool_calls="add"), "must be a list of tool calls"),
        (_after_call(tool_calls=["add"]), "OpenAI-style dict"),
        (_after_call(tool_calls=[{"function": "add"}]), "no function name"),
        (_after_call(tool_calls=[{"function": {"name": "add", "arguments": "{"}}]), "valid JSON"),
        ([ChatMessage(role=MessageRole.USER, content="caf\udce9")], "unpaired surrogate"),
    ],
    ids=["calls-str", "call-str", "function-str", "bad-json", "surrogate"],
)
def test_malformed_tool_calls_and_lone_surrogates_raise_invalid_prompt(llm, messages, message):
    with pytest.raises(InvalidPromptError, match=message):
        llm.chat(messages)


def test_text_blocks_are_joined_like_message_content(llm, guard):
    blocks = [TextBlock(text="Tell me about"), TextBlock(text="the dog.")]
    response = llm.chat([ChatMessage(role=MessageRole.USER, blocks=blocks)], seed=1)
    expected = guard.generate(user_turn("Tell me about\nthe dog."), seed=1)
    assert response.message.content == expected.text


def test_prompt_over_the_context_window_raises_prompt_too_long(llm):
    with pytest.raises(PromptTooLongError, match="context window is 512"):
        llm.complete("dog " * 600)
    with pytest.raises(PromptTooLongError):
        llm.chat([ChatMessage(content="dog " * 600)])


def test_tools_need_a_chat_template(base_llm):
    tool = {"name": "add", "description": "Add.", "parameters": {"type": "object"}}
    with pytest.raises(ChatTemplateError, match="chat template"):
        base_llm.chat(USER, tools=[tool])


# ------------------------------------------------------------------ construction
def test_from_model_id_loads_a_saved_model(tiny_model_dir, keyword_cost, config):
    llm = SafeguardLLM.from_model_id(str(tiny_model_dir), cost=keyword_cost, config=config)
    assert llm.metadata.model_name == str(tiny_model_dir)
    assert llm.metadata.context_window == 512
    assert llm.complete(PROMPT, seed=0).additional_kwargs["safety"]["safe"]


def test_from_model_id_takes_a_critic_directory_for_critic_mode(
    tiny_model, tiny_model_dir, keyword_cost, config, tmp_path
):
    critic = build_random_critic(tiny_model, block_size=config.block_size)
    llm = SafeguardLLM.from_model_id(
        str(tiny_model_dir),
        cost=keyword_cost,
        critic=str(critic.save(tmp_path / "critic")),
        config=config,
    )
    assert llm.guard.critic is not None
    assert llm.complete(PROMPT, seed=0).additional_kwargs["safety"]["safe"]


def test_from_model_id_needs_a_cost_model_before_loading_anything(tmp_path):
    with pytest.raises(MissingCostModelError, match="cost model"):
        SafeguardLLM.from_model_id(str(tmp_path / "missing"), cost=None)


def test_guard_must_be_a_core_decoder():
    with pytest.raises(TypeError, match="from_model_id"):
        SafeguardLLM(guard="Qwen/Qwen2.5-0.5B-Instruct")


def test_unknown_fields_are_rejected(guard):
    with pytest.raises(ValidationError):
        SafeguardLLM(guard=guard, temprature=0.5)
