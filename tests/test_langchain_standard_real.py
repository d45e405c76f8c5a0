"""LangChain's standard integration suite (`langchain-tests`) on ChatSafeguard with a real
instruction-tuned model, SmolLM2-135M-Instruct, loaded from its GGUF file (see
tests/test_real_models.py).

The grammar forces the tool calls and JSON of the suite's tool-calling and
structured-output tests, but the tiny random-weight model of
tests/test_langchain_standard.py cannot finish them within a small token limit, so they
are expected failures there; here they run on a model that follows instructions. Those
that a 135M-parameter model still fails are marked with the reason, from what it was
seen to answer. The suite's other tests (plain chat, streaming, batching, usage, stop
sequences) pass on the tiny model and are skipped here: on the real model they would
only repeat those paths, a few minutes slower.
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

MAX_TOKENS = 160
"""Room for a tool call or a JSON object of the suite's schemas, which takes SmolLM2 more
tokens than a short chat reply: the grammar forces the shape, but a response cut by
max_tokens ends mid-shape."""

NEVER_CHOOSES_A_CALL = (
    "the test leaves tool_choice 'auto', and SmolLM2-135M-Instruct does not choose to start a call"
)
CUT_SHORT = (
    "with schema_type='json_schema' (the Joke schema as a dict), SmolLM2-135M-Instruct "
    "writes a punchline longer than max_tokens allows (the schema has no maxLength), so "
    "the forced call is cut before it closes ('pydantic' and 'typeddict' pass)"
)
SCHEMA_TYPES = [
    "pydantic",
    "typeddict",
    pytest.param("json_schema", marks=pytest.mark.xfail(reason=CUT_SHORT)),
]
NESTS_THE_KEYS = (
    "json_mode forces only a JSON object; SmolLM2-135M-Instruct nests the keys it is asked "
    "for ({'setup': {'punchline': ...}})"
)


REAL_MODEL_TESTS = (
    "test_tool_calling",
    "test_tool_choice",
    "test_bind_runnables_as_tools",
    "test_agent_loop",
    "test_unicode_tool_call_integration",
    "test_structured_output",
    "test_json_mode",
)
"""The tests (name prefixes) the tiny model cannot finish, so the ones that need this model."""


class TestChatSafeguardSmolLM2(ChatModelIntegrationTests):
    """ChatSafeguard loading SmolLM2 by the path of its `.gguf` file (LangChain's loader;
    its process-wide cache loads the weights once for the whole suite)."""

    @pytest.fixture(autouse=True)
    def _only_what_the_tiny_model_cannot_finish(self, request: pytest.FixtureRequest) -> None:
        if not request.node.name.startswith(REAL_MODEL_TESTS):
            pytest.skip("passes on the tiny model in tests/test_langchain_standard.py")

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
            "max_tokens": MAX_TOKENS,
        }

    @property
    def supports_model_override(self) -> bool:
        return False  # one local model per ChatSafeguard

    @property
    def supports_json_mode(self) -> bool:
        return True

    # Tool-calling and structured-output tests that a 135M model still fails, with what
    # it was seen to do (not strict: a pass is reported as XPASS, not hidden). The other
    # tool-calling tests pass: the grammar forces the call, and a call the model repeats
    # in one response is kept once.
    @pytest.mark.xfail(reason=NEVER_CHOOSES_A_CALL)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @pytest.mark.parametrize("schema_type", SCHEMA_TYPES)
    def test_structured_output(
        self,
        model: BaseChatModel,
        schema_type: Literal["pydantic", "typeddict", "json_schema"],
    ) -> None:
        super().test_structured_output(model, schema_type)

    @pytest.mark.parametrize("schema_type", SCHEMA_TYPES)
    async def test_structured_output_async(
        self,
        model: BaseChatModel,
        schema_type: Literal["pydantic", "typeddict", "json_schema"],
    ) -> None:
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(reason=NESTS_THE_KEYS)
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)
