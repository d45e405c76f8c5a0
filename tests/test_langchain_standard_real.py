"""LangChain's standard integration suite (`langchain-tests`) on ChatSafeguard with a real
instruction-tuned model, SmolLM2-135M-Instruct, loaded from its GGUF file (see
tests/test_real_models.py).

The tiny random-weight model of tests/test_langchain_standard.py can neither call a tool
nor write JSON, so those tests are expected failures there; here they run on a model
that follows instructions. Those that a 135M-parameter model still fails are marked
with the reason, from what it was seen to answer.
"""

from __future__ import annotations

from typing import Any, Literal

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from inference_safeguard.offline_models import OfflineModelMissingError, smollm2_gguf
from inference_safeguard.scorers import KeywordCost
from langchain_safeguard import ChatSafeguard

pytestmark = pytest.mark.real_model
pytest.importorskip("gguf", reason="GGUF files need the gguf extra")

CALLS_NO_TOOLS = (
    "SmolLM2-135M-Instruct answers tool prompts in prose ('The value of "
    "`magic_function_no_args()` is no available'), never in the tool-call format; "
    "tests/test_langchain_tools.py covers these paths with scripted replies"
)
WRITES_NO_JSON = (
    "SmolLM2-135M-Instruct rarely answers with the JSON asked for (prose, or JSON cut "
    "short at the suite's token limit)"
)


class TestChatSafeguardSmolLM2(ChatModelIntegrationTests):
    """ChatSafeguard loading SmolLM2 by the path of its `.gguf` file (LangChain's loader;
    its process-wide cache loads the weights once for the whole suite)."""

    @property
    def chat_model_class(self) -> type[ChatSafeguard]:
        return ChatSafeguard

    @property
    def chat_model_params(self) -> dict[str, Any]:
        try:
            path = smollm2_gguf()
        except OfflineModelMissingError as error:
            pytest.skip(str(error))
        return {
            "model": str(path),
            "device": "cpu",
            "cost": KeywordCost(["bomb", "detonator"]),
            "num_candidates": 2,
            "beam_width": 1,
            "block_size": 8,
            "seed": 0,
            "max_tokens": 24,
        }

    @property
    def supports_model_override(self) -> bool:
        return False  # one local model per ChatSafeguard

    @property
    def supports_json_mode(self) -> bool:
        return True

    # Tool calling and structured output: run, and expected to fail on a 135M model
    # (not strict: a pass is reported as XPASS, not hidden).
    @pytest.mark.xfail(reason=CALLS_NO_TOOLS)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=CALLS_NO_TOOLS)
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=CALLS_NO_TOOLS)
    def test_bind_runnables_as_tools(self, model: BaseChatModel) -> None:
        super().test_bind_runnables_as_tools(model)

    @pytest.mark.xfail(reason=CALLS_NO_TOOLS)
    def test_tool_choice(self, model: BaseChatModel) -> None:
        super().test_tool_choice(model)

    @pytest.mark.xfail(reason=CALLS_NO_TOOLS)
    def test_tool_calling_with_no_arguments(self, model: BaseChatModel) -> None:
        super().test_tool_calling_with_no_arguments(model)

    @pytest.mark.xfail(reason=CALLS_NO_TOOLS)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=CALLS_NO_TOOLS)
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

    @pytest.mark.xfail(reason=WRITES_NO_JSON)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(
        self,
        model: BaseChatModel,
        schema_type: Literal["pydantic", "typeddict", "json_schema"],
    ) -> None:
        super().test_structured_output(model, schema_type)

    @pytest.mark.xfail(reason=WRITES_NO_JSON)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(
        self,
        model: BaseChatModel,
        schema_type: Literal["pydantic", "typeddict", "json_schema"],
    ) -> None:
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(reason=WRITES_NO_JSON)
    def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @pytest.mark.xfail(reason=WRITES_NO_JSON)
    def test_structured_output_optional_param(self, model: BaseChatModel) -> None:
        super().test_structured_output_optional_param(model)

    @pytest.mark.xfail(reason=WRITES_NO_JSON)
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)
