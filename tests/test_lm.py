"""CausalLM: prompts, left-padded prefill, cached block decoding, fan-out and pruning."""

from __future__ import annotations

import pytest
import torch
from conftest import OTHER_PROMPT, PROMPT

from inference_safeguard.errors import InvalidPromptError
from inference_safeguard.lm import BlockCheckpoint, CausalLM, transcript


@pytest.fixture(scope="module")
def lm(tiny_model, tiny_tokenizer) -> CausalLM:
    return CausalLM(tiny_model, tiny_tokenizer)


def greedy_without_cache(lm: CausalLM, ids: list[int], steps: int) -> list[int]:
    """Reference decoding: the full sequence re-run every step, no cache, no padding."""
    sequence = list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            logits = lm.model(input_ids=torch.tensor([sequence]), use_cache=False).logits
            sequence.append(int(logits[0, -1].argmax()))
    return sequence[len(ids) :]


def greedy(logits: torch.Tensor, step: int) -> torch.Tensor:
    return logits.argmax(-1)


def test_cached_block_decoding_matches_decoding_without_cache(lm):
    prompts = [lm.encode(PROMPT).ids, lm.encode(OTHER_PROMPT).ids, lm.encode("Hi").ids]
    assert len({len(p) for p in prompts}) == 3  # left padding is exercised
    state = lm.prefill(prompts)
    blocks = [lm.decode_block(state, 4, greedy).tokens for _ in range(3)]
    decoded = torch.cat(blocks, dim=1)
    for row, ids in enumerate(prompts):
        reference = greedy_without_cache(lm, ids, 12)
        eos = [i for i, t in enumerate(reference) if t in lm.eos_token_ids]
        upto = eos[0] + 1 if eos else 12
        assert decoded[row, :upto].tolist() == reference[:upto]


def test_fan_out_repeats_rows_and_select_rows_prunes_them(lm):
    prompts = [lm.encode(PROMPT).ids, lm.encode(OTHER_PROMPT).ids]
    state = lm.prefill(prompts)
    lm.fan_out(state, 3)
    assert state.rows == 6
    first = lm.decode_block(state, 5, greedy).tokens
    assert all(first[i].tolist() == first[0].tolist() for i in range(3))
    assert all(first[i].tolist() == first[3].tolist() for i in range(3, 6))
    lm.select_rows(state, torch.tensor([4, 0, 0]))
    assert state.rows == 3
    second = lm.decode_block(state, 5, greedy).tokens
    reference_other = greedy_without_cache(lm, prompts[1], 10)[5:]
    reference_first = greedy_without_cache(lm, prompts[0], 10)[5:]
    assert second[0].tolist() == reference_other
    assert second[1].tolist() == second[2].tolist() == reference_first


def test_rewinding_a_block_restores_the_state(lm):
    state = lm.prefill([lm.encode(PROMPT).ids])
    checkpoint = BlockCheckpoint.of(state, 6)
    mask_before, logits_before = state.attention_mask.clone(), state.logits.clone()
    first = lm.decode_block(state, 6, greedy).tokens
    checkpoint.rewind(state)
    assert torch.equal(state.attention_mask, mask_before)
    assert torch.equal(state.logits, logits_before)
    assert state.cache.get_seq_length() == mask_before.shape[1]
    assert torch.equal(lm.decode_block(state, 6, greedy).tokens, first)


def test_rows_that_emit_eos_stop_and_are_padded(lm):
    state = lm.prefill([lm.encode(PROMPT).ids] * 2)
    eos = next(iter(lm.eos_token_ids))

    def end_first_row(logits: torch.Tensor, step: int) -> torch.Tensor:
        tokens = logits.argmax(-1)
        if step == 1:
            tokens[0] = eos
        return tokens

    block = lm.decode_block(state, 4, end_first_row)
    assert block.ended.tolist() == [True, False]
    assert block.tokens[0, 1] == eos and (block.tokens[0, 2:] == -1).all()
    assert (block.tokens[1] >= 0).all()
    assert state.attention_mask[0, -2:].tolist() == [0, 0]


def test_hidden_state_is_the_last_layer_state_of_the_last_token(lm):
    ids = lm.encode(PROMPT).ids
    state = lm.prefill([ids])
    block = lm.decode_block(state, 3, greedy)
    full = torch.tensor([ids + block.tokens[0].tolist()])
    with torch.inference_mode():
        out = lm.model(input_ids=full, output_hidden_states=True)
    torch.testing.assert_close(state.hidden[0], out.hidden_states[-1][0, -1], atol=1e-4, rtol=1e-4)


def test_prefill_keeps_logits_of_the_last_position_only(lm):
    state = lm.prefill([lm.encode(PROMPT).ids, lm.encode("Hi").ids])
    assert state.logits.shape == (2, lm.vocab_size)
    assert state.hidden.shape == (2, lm.model.config.hidden_size)
    assert not state.hidden.any()


def test_messages_go_through_the_chat_template_and_scorers_see_a_transcript(lm):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    encoded = lm.encode(messages)
    rendered = lm.tokenizer.decode(encoded.ids)
    assert "<|user|>" in rendered and rendered.endswith("<|assistant|>")
    assert encoded.text == transcript(messages) == "system: Be kind.\nuser: Hi"


def test_plain_text_is_used_as_is(lm):
    encoded = lm.encode("The dog")
    assert encoded.text == "The dog"
    assert encoded.ids == lm.tokenizer("The dog")["input_ids"]


def _after_call(*calls: object) -> list[dict[str, object]]:
    return [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": "", "tool_calls": list(calls)},
        {"role": "tool", "content": "Sunny", "tool_call_id": "a"},
    ]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (_after_call("get_weather"), r"tool call 0 must be a dict"),
        (_after_call({"id": "a", "function": "get_weather"}), r"'function' must be a dict"),
        (_after_call({"id": "a", "function": {"arguments": "{}"}}), r"has no tool name"),
        (_after_call({"function": {"name": "f", "arguments": "{bad"}}), r"not valid JSON"),
        (_after_call({"function": {"name": "f", "arguments": "[1, 2]"}}), r"JSON object.*list"),
        (_after_call({"function": {"name": "f", "arguments": 5}}), r"JSON object.*int"),
        (_after_call({"function": {"name": "f"}}, 7), r"message 1, tool call 1 must be a dict"),
        ([{"role": "assistant", "content": "", "tool_calls": "f"}], r"must be a list"),
    ],
    ids=[
        "call-str",
        "function-str",
        "no-name",
        "bad-json",
        "list-args",
        "int-args",
        "int-call",
        "str",
    ],
)
def test_malformed_assistant_tool_calls_raise_invalid_prompt(lm, messages, message):
    with pytest.raises(InvalidPromptError, match=message):
        lm.encode(messages)


@pytest.mark.parametrize(
    "prompt",
    [
        "caf\udce9",
        [{"role": "user", "content": "caf\udce9"}],
        [{"role": "system", "content": "\ud800"}],
    ],
    ids=["plain", "user", "system"],
)
def test_a_lone_surrogate_raises_invalid_prompt_not_an_encoder_error(lm, prompt):
    with pytest.raises(InvalidPromptError, match="unpaired surrogate"):
        lm.encode(prompt)


def test_context_window_comes_from_the_model_config(lm):
    assert lm.context_window == lm.model.config.max_position_embeddings
