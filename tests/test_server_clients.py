"""Unchanged OpenAI clients against a real `safeguard serve` process on 127.0.0.1.

The official `openai` client, LangChain's `ChatOpenAI` and LlamaIndex's `OpenAILike`
talk to the server exactly as they talk to OpenAI; only the base URL and key change.
The server runs a tiny random Llama saved to a temporary directory, so its text is
noise, but tool calls and JSON are held to their schemas by grammar, which these
tests check through each client.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference_safeguard.testing import build_tiny_llama

pytest.importorskip("fastapi", reason="the server needs the serve extra")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-guard"
KEY = "test-key"
STARTUP_SECONDS = 90
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
VERDICT = {
    "type": "object",
    "properties": {
        "safe": {"type": "boolean"},
        "score": {"type": "integer", "enum": [1, 2, 3]},
    },
    "required": ["safe", "score"],
    "additionalProperties": False,
}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like the suite's guard, but the server on the loopback address may be reached."""
    connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise RuntimeError("tests must not use the network")
        connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_tokenizer, tmp_path_factory) -> Iterator[str]:
    """The base URL of a `safeguard serve` process, started once for the module."""
    model_dir = tmp_path_factory.mktemp("served-llama")
    build_tiny_llama(tiny_tokenizer, max_position_embeddings=2048).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "inference_safeguard.cli",
        "serve",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--cost-keywords",
        "bomb,poison",
        "--num-candidates",
        "4",
        "--beam-width",
        "2",
        "--block-size",
        "8",
        "--max-new-tokens",
        "96",
        "--served-model-name",
        MODEL,
        "--api-key",
        KEY,
        "--port",
        str(port),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "core"), str(ROOT), os.environ.get("PYTHONPATH", "")]
        ),
    }
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"the server did not answer /health in {STARTUP_SECONDS} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def _weather_question() -> list[dict[str, str]]:
    return [{"role": "user", "content": "What is the weather in Paris?"}]


# -------------------------------------------------------------------------- openai
def test_openai_chat_completion_carries_the_safety_record(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about the dog and the garden."}],
        max_tokens=8,
        seed=1,
    )
    [choice] = completion.choices
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length", "content_filter")
    safety = choice.model_extra["safety"]
    assert set(safety) == {
        "safe",
        "cost",
        "budget",
        "reward",
        "refused",
        "resample_rounds",
        "constraints",
    }
    assert safety["budget"] == 0.0
    assert safety["refused"] == (choice.finish_reason == "content_filter")
    assert completion.usage.completion_tokens <= 8


def test_openai_stream_matches_the_response_of_the_same_seed(client):
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is a good name for a small bird?"}],
        "max_tokens": 12,
        "seed": 7,
    }
    whole = client.chat.completions.create(**request)
    chunks = list(
        client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [f.finish_reason for f in finals] == [whole.choices[0].finish_reason]
    assert finals[0].model_extra["safety"]["budget"] == 0.0
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_openai_text_completion(client):
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6)
    [choice] = completion.choices
    assert isinstance(choice.text, str)
    assert choice.finish_reason in ("stop", "length", "content_filter")
    assert choice.model_extra["safety"]["budget"] == 0.0


def test_openai_forced_tool_call_follows_the_tool_schema(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=_weather_question(),
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=80,
    )
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])


def test_openai_json_schema_response_validates(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is the garden safe for the dog?"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True},
        },
        max_tokens=40,
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content), VERDICT)


def test_openai_errors_are_the_clients_typed_errors(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1
        )
    assert error.value.param == "temperature"
    unauthorized = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unauthorized.models.list()
    assert [m.id for m in client.models.list()] == [MODEL]


# ----------------------------------------------------------------------- langchain
@pytest.fixture(scope="module")
def chat_openai(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(
        model=MODEL,
        base_url=f"{server}/v1",
        api_key=KEY,
        max_tokens=10,
        max_retries=0,
        timeout=60,
    )


def test_langchain_chat_openai_invoke_and_stream(chat_openai):
    message = chat_openai.invoke("Tell me about the dog and the garden.")
    assert isinstance(message.content, str)
    assert message.response_metadata["finish_reason"] in ("stop", "length", "content_filter")
    chunks = list(chat_openai.stream("What is a good name for a small bird?"))
    assert chunks
    assert all(isinstance(chunk.content, str) for chunk in chunks)
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert merged.response_metadata["finish_reason"] in ("stop", "length", "content_filter")


def test_langchain_bind_tools_gets_a_schema_valid_tool_call(chat_openai):
    bound = chat_openai.bind_tools(
        [WEATHER], tool_choice="get_weather", parallel_tool_calls=False
    ).bind(max_tokens=80)
    message = bound.invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER["function"]["parameters"])


# ---------------------------------------------------------------------- llamaindex
def test_llamaindex_openai_like_chat_and_complete(server):
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage

    llm = openai_like.OpenAILike(
        model=MODEL,
        api_base=f"{server}/v1",
        api_key=KEY,
        is_chat_model=True,
        context_window=2048,
        max_tokens=10,
        max_retries=0,
        timeout=60,
    )
    response = llm.chat([ChatMessage(role="user", content="Where is the dog?")])
    assert isinstance(response.message.content, str)
    assert response.raw.choices[0].model_extra["safety"]["budget"] == 0.0
    completion = llm.complete("Tell me about the garden.")
    assert isinstance(completion.text, str)


# ------------------------------------------------------------------ disconnection
class _EndlessBackend:
    """A backend whose responses never end; it notes when its work is cancelled."""

    def __init__(self) -> None:
        from inference_safeguard import GuardConfig

        self.config = GuardConfig()
        self.lm = None
        self.stopped = threading.Event()

    async def agenerate(self, prompt, *, tools=None, **overrides):
        try:
            await asyncio.sleep(3600)
        finally:
            self.stopped.set()

    def astream(self, prompt, *, tools=None, **overrides):
        backend = self

        class Endless:
            result = None

            def __aiter__(self):
                return self

            async def __anext__(self):
                await asyncio.sleep(0.02)
                return "more "

            async def aclose(self):
                backend.stopped.set()

        return Endless()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_stops_its_generation(stream):
    import httpx
    import uvicorn

    from inference_safeguard.server import create_app

    backend = _EndlessBackend()
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(backend, model_name=MODEL), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        if stream:
            with httpx.stream("POST", url, json=body, timeout=10) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
        else:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(url, json=body, timeout=0.5)
        assert backend.stopped.wait(timeout=5), "the generation went on without its client"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
