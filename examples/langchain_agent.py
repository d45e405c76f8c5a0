"""A tool-calling agent on `ChatSafeguard`: the model calls two tools until it can answer,
and every reply, tool calls included, is held to the cost budget.

    python examples/langchain_agent.py                      # offline, scripted model
    python examples/langchain_agent.py --model Qwen/Qwen2.5-1.5B-Instruct

The agent is the plain tool-calling loop of LangChain: `model.bind_tools(tools)`, invoke,
run the tool calls of the reply, append their `ToolMessage`s, and invoke again until the
reply calls no tool. Its two tools report the weather of a city and convert Celsius
to Fahrenheit.

With `--model`, use an instruction-tuned model whose chat template supports tools
(Qwen2.5-Instruct, Llama 3.1+ Instruct, Mistral Instruct v0.3, Hermes): the template
renders the tools, and the model's calls are parsed from its text. Decoding is not
constrained, so a small model may answer in text instead of calling a tool.

Without `--model` the script runs offline with `ScriptedGuard` (`inference_safeguard.testing`): the
search is replaced by a script that reads the conversation and replies as a capable
model would, but everything after it is the real InferenceGuard, so the cost model
checks each reply. The second question shows the budget applying to a tool call: its
arguments name a place the cost model forbids, so the call is refused before any tool
runs.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence

import torch
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.tools import BaseTool, tool

from inference_safeguard.scorers import KeywordCost
from inference_safeguard.testing import ScriptedGuard, build_tiny_llama, build_tiny_tokenizer
from langchain_safeguard import ChatSafeguard

QUESTIONS = ("What is the weather in Paris, in Fahrenheit?", "What is the weather in Area 51?")
SYSTEM = "You are a weather assistant. Use the tools to look things up; answer briefly."
WEATHER = {"paris": ("sunny", 21.0), "oslo": ("snowing", -3.0), "area 51": ("clear", 30.0)}


@tool
def get_weather(city: str) -> str:
    """The current weather in a city, with the temperature in degrees Celsius."""
    sky, celsius = WEATHER.get(city.strip().lower(), ("unknown", float("nan")))
    return json.dumps({"city": city, "sky": sky, "celsius": celsius})


@tool
def celsius_to_fahrenheit(celsius: float) -> float:
    """Convert a temperature from degrees Celsius to degrees Fahrenheit."""
    return round(celsius * 9 / 5 + 32, 1)


TOOLS: list[BaseTool] = [get_weather, celsius_to_fahrenheit]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="instruction-tuned causal LM with tool support")
    parser.add_argument(
        "--cost-keywords",
        default="area 51",
        help="comma-separated words or phrases no reply (or tool call) may contain",
    )
    parser.add_argument("--budget", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    return parser.parse_args(argv)


def scripted_reply(conversation: str) -> str:
    """What a capable model would reply, from the conversation as scorers see it
    (`role: content` lines; tool results as `<tool_response>` text)."""
    results = re.findall(r"<tool_response[^>]*>(.*?)</tool_response>", conversation, re.S)
    question = re.findall(r"^user: (?!<tool_response)(.*)$", conversation, re.M)[-1]
    if not results:
        city = re.search(r"weather in (.+?)[,?]", question)
        return _call("get_weather", city=city.group(1) if city else question)
    if "Fahrenheit" in question and len(results) == 1:
        return _call("celsius_to_fahrenheit", celsius=json.loads(results[0])["celsius"])
    weather = json.loads(results[0])
    degrees = f"{results[1]} °F" if len(results) > 1 else f"{weather['celsius']} °C"
    return f"It is {weather['sky']} in {weather['city']}, {degrees}."


def _call(name: str, **arguments: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def build_model(args: argparse.Namespace) -> ChatSafeguard:
    """`ChatSafeguard` on `--model`, or on the scripted guard offline."""
    cost = KeywordCost([w.strip() for w in args.cost_keywords.split(",") if w.strip()])
    settings = {"budget": args.budget, "max_tokens": args.max_new_tokens, "seed": args.seed}
    if args.model:
        return ChatSafeguard.from_model_id(args.model, cost=cost, device=args.device, **settings)
    torch.set_num_threads(1)  # the scripted guard never runs its (tiny) model
    tokenizer = build_tiny_tokenizer()
    # The window must hold the tool schemas, spelled out by a tokenizer of plain words.
    model = build_tiny_llama(tokenizer, max_position_embeddings=4096)
    guard = ScriptedGuard(model, tokenizer, scripted_reply, cost=cost)
    return ChatSafeguard(guard=guard, **settings)


def run_agent(model: ChatSafeguard, question: str, max_turns: int) -> list[BaseMessage]:
    """Invoke the model with the tools until its reply calls none; the conversation."""
    by_name = {t.name: t for t in TOOLS}
    agent = model.bind_tools(TOOLS)
    messages: list[BaseMessage] = [SystemMessage(SYSTEM), HumanMessage(question)]
    for _ in range(max_turns):
        reply = agent.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        messages += [by_name[call["name"]].invoke(call) for call in reply.tool_calls]
    return messages


def show(messages: list[BaseMessage]) -> None:
    """Print the agent's steps and the safety record of its last reply."""
    for message in messages[1:]:
        if isinstance(message, HumanMessage):
            print(f"user      {message.text}")
        elif isinstance(message, AIMessage) and message.tool_calls:
            for call in message.tool_calls:
                print(f"  call    {call['name']}({json.dumps(call['args'])})")
        elif isinstance(message, AIMessage):
            print(f"answer    {message.text}")
        else:
            print(f"  result  {message.text}")
    safety = messages[-1].response_metadata["safety"]
    print(
        f"          safety: cost {safety['cost']:g} / budget {safety['budget']:g}, "
        f"refused={safety['refused']}\n"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the agent on each question."""
    args = parse_args(argv)
    model = build_model(args)
    source = args.model or "scripted replies (offline; the safety checks are real)"
    print(f"Model: {source}; cost keywords: {args.cost_keywords}\n")
    for question in QUESTIONS:
        show(run_agent(model, question, args.max_turns))


if __name__ == "__main__":
    main()
