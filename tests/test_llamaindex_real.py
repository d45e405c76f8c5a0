"""SafeguardLLM on a real chat model, SmolLM2-135M-Instruct (GGUF from the package index):
a FunctionAgent with two tools on a two-step arithmetic task, and structured output.

What grammar guarantees is asserted, not what the model makes of it: with the first call
forced, the agent's calls are valid and run, and a structured object validates. Whether
a 135M model then chains the second call and answers right is up to the model (in this
configuration it calls add(3, 4) and then answers without multiplying), so the final
answer is not checked.
"""

from __future__ import annotations

import jsonschema
import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field

from inference_safeguard import GuardConfig, InferenceGuard
from inference_safeguard.scorers import KeywordCost
from llamaindex_safeguard import SafeguardLLM

pytestmark = pytest.mark.real_model

CONFIG = GuardConfig(num_candidates=4, beam_width=2, block_size=8, max_new_tokens=64, seed=0)


def add(a: int, b: int) -> int:
    """Add two integers and return the sum."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


TOOLS = {"add": add, "multiply": multiply}


class Person(BaseModel):
    """A person named in the text."""

    name: str = Field(max_length=32)
    age: int = Field(ge=0, le=150)


@pytest.fixture(scope="module")
def llm(smollm2) -> SafeguardLLM:
    model, tokenizer = smollm2
    guard = InferenceGuard(model, tokenizer, cost=KeywordCost(["bomb"]), config=CONFIG)
    return SafeguardLLM(guard=guard)


async def test_function_agent_with_two_tools_makes_valid_calls_that_run(llm):
    tools = [FunctionTool.from_defaults(fn) for fn in TOOLS.values()]
    agent = FunctionAgent(
        tools=tools,
        llm=llm,
        initial_tool_choice="required",
        system_prompt="You are a calculator. Use the tools for arithmetic.",
    )
    output = await agent.run("What is 3 + 4? Then multiply that by 5.")
    assert output.tool_calls  # the first call is forced
    for result in output.tool_calls:
        schema = next(t for t in tools if t.metadata.name == result.tool_name).metadata
        jsonschema.validate(result.tool_kwargs, schema.get_parameters_dict())
        assert not result.tool_output.is_error
        assert result.tool_output.raw_output == TOOLS[result.tool_name](**result.tool_kwargs)
    assert output.raw["safety"]["safe"]


def test_structured_predict_returns_an_object_that_validates(llm):
    person = llm.structured_predict(
        Person, PromptTemplate("{text} Give her name and age."), text="Alice is 31."
    )
    jsonschema.validate(person.model_dump(), Person.model_json_schema())
