"""LangChain's standard test suites (`langchain-tests`) on ChatSafeguard with the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from inference_safeguard.scorers import KeywordCost
from inference_safeguard.testing import build_tiny_llama
from langchain_safeguard import ChatSafeguard

CUT_SHORT = (
    "the tiny tokenizer spells a tool call or a JSON object out in more tokens than "
    "max_tokens=16 allows, so the grammar-forced call or JSON is cut short "
    "(finish_reason='length'); given room, the random-weight model still does not close "
    "the suite's free-text strings (no maxLength) within any small max_tokens. "
    "tests/test_langchain_structured.py runs these paths with bounded schemas"
)
MANY_CALLS = (
    f"{CUT_SHORT}; and where parallel calls are allowed it writes calls until max_tokens "
    "(three where the suite wants one)"
)
NEVER_CHOOSES_A_CALL = (
    "tool_choice is left 'auto', and the random-weight model never chooses to start a call"
)


@pytest.fixture(scope="module")
def long_context_model_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny Llama with a 2048-token window: the suite's tool prompts (tool schemas
    spelled out by a tokenizer trained on plain words) outgrow the usual 512."""
    path = tmp_path_factory.mktemp("tiny-llama-2k")
    build_tiny_llama(tiny_tokenizer, max_position_embeddings=2048).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


class _TinyModel:
    """The tiny local Llama, loaded by path; small search settings keep the suite fast."""

    model_dir: Path

    @pytest.fixture(autouse=True)
    def _tiny_model_dir(self, long_context_model_dir: Path) -> None:
        self.model_dir = long_context_model_dir

    @property
    def chat_model_class(self) -> type[ChatSafeguard]:
        return ChatSafeguard

    @property
    def search_params(self) -> dict[str, Any]:
        return {
            "model": str(self.model_dir),
            "cost": KeywordCost(["bomb", "detonator"]),
            "num_candidates": 4,
            "beam_width": 2,
            "block_size": 8,
            "seed": 0,
        }

    @property
    def supports_model_override(self) -> bool:
        return False  # one local model per ChatSafeguard


class TestChatSafeguardUnit(_TinyModel, ChatModelUnitTests):
    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        params = super().standard_chat_model_params
        del params["api_key"]  # a local model has no API key
        return params

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return self.search_params


class TestChatSafeguardIntegration(_TinyModel, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {**self.search_params, "max_tokens": 16}

    @property
    def supports_json_mode(self) -> bool:
        return True

    # The grammar forces the calls and JSON of the tests below, but the tiny model (random
    # weights, a tokenizer that spells JSON out in many tokens) cannot finish them within
    # the suite's token limit; the reasons are what it was seen to do.
    @pytest.mark.xfail(reason=MANY_CALLS, strict=True)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=MANY_CALLS, strict=True)
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=CUT_SHORT, strict=True)
    def test_bind_runnables_as_tools(self, model: BaseChatModel) -> None:
        super().test_bind_runnables_as_tools(model)

    @pytest.mark.xfail(reason=CUT_SHORT, strict=True)
    def test_tool_choice(self, model: BaseChatModel) -> None:
        super().test_tool_choice(model)

    @pytest.mark.xfail(reason=MANY_CALLS, strict=True)
    def test_tool_calling_with_no_arguments(self, model: BaseChatModel) -> None:
        super().test_tool_calling_with_no_arguments(model)

    @pytest.mark.xfail(reason=NEVER_CHOOSES_A_CALL, strict=True)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=CUT_SHORT, strict=True)
    def test_unicode_tool_call_integration(
        self,
        model: BaseChatModel,
        *,
        tool_choice: str | None = None,
        force_tool_call: bool = True,
    ) -> None:
        super().test_unicode_tool_call_integration(
            model, tool_choice=tool_choice, force_tool_call=force_tool_call
        )

    @pytest.mark.xfail(reason=CUT_SHORT, strict=True)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(
        self,
        model: BaseChatModel,
        schema_type: Literal["pydantic", "typeddict", "json_schema"],
    ) -> None:
        super().test_structured_output(model, schema_type)

    @pytest.mark.xfail(reason=CUT_SHORT, strict=True)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(
        self,
        model: BaseChatModel,
        schema_type: Literal["pydantic", "typeddict", "json_schema"],
    ) -> None:
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(reason=CUT_SHORT, strict=True)
    def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @pytest.mark.xfail(reason=CUT_SHORT, strict=True)
    def test_structured_output_optional_param(self, model: BaseChatModel) -> None:
        super().test_structured_output_optional_param(model)

    @pytest.mark.xfail(reason=CUT_SHORT, strict=True)
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)
