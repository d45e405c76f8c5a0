"""The OpenAI-compatible server in process: shapes, SSE framing, errors, auth, metrics.

A `ScriptedGuard` answers from a script, so that each test knows the text the model
"wrote" (a tool call, a hazardous answer the cost model refuses, ...) while the prompt
rendering, cost check and refusal around it are the real InferenceGuard's.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra")
pytest.importorskip("prometheus_client", reason="the server needs the serve extra")

from fastapi.testclient import TestClient

from inference_safeguard import GuardConfig
from inference_safeguard.scorers import KeywordCost
from inference_safeguard.server import create_app
from inference_safeguard.testing import ScriptedGuard, build_tiny_llama

MODEL = "tiny-guard"
KEY = "secret-key"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
HAZARD = "Mix the bleach with the ammonia."
BAD = {"type": "object", "properties": {"x": {"type": "no-such-type"}}}
"""Arguments whose JSON Schema no grammar can be built for."""
MISSING = object()
"""A field left out of a request body."""


def _reply(prompt: str) -> str:
    """What the scripted model says to the last user message."""
    last = prompt.rsplit("user: ", 1)[-1]
    if "weather" in last:
        return CALL_TEXT
    if "clean" in last:
        return HAZARD
    return "The dog is in the garden."


@pytest.fixture(scope="module")
def window_model(tiny_tokenizer):
    """A tiny Llama with a context window that fits tool descriptions."""
    return build_tiny_llama(tiny_tokenizer, max_position_embeddings=1024)


@pytest.fixture()
def guard(window_model, tiny_tokenizer) -> ScriptedGuard:
    return ScriptedGuard(
        window_model,
        tiny_tokenizer,
        _reply,
        cost=KeywordCost(["ammonia"]),
        config=GuardConfig(budget=0.0, max_new_tokens=32),
    )


class RecordingBackend:
    """A backend around a decoder that records each call's overrides and has `stats()`,
    as the batching engine will."""

    def __init__(self, decoder: ScriptedGuard) -> None:
        self.decoder = decoder
        self.calls: list[dict[str, Any]] = []

    @property
    def config(self) -> GuardConfig:
        return self.decoder.config

    @property
    def lm(self):
        return self.decoder.lm

    async def agenerate(self, prompt, *, tools=None, **overrides):
        self.calls.append({"prompt": prompt, "tools": tools, **overrides})
        return await self.decoder.agenerate(prompt, tools=tools, **overrides)

    def astream(self, prompt, *, tools=None, **overrides):
        self.calls.append({"prompt": prompt, "tools": tools, **overrides})
        return self.decoder.astream(prompt, tools=tools, **overrides)

    def stats(self) -> dict[str, Any]:
        return {"queue_length": 3, "rows_in_flight": 8, "tokens_per_second": 12.5, "busy": True}


@pytest.fixture()
def backend(guard) -> RecordingBackend:
    return RecordingBackend(guard)


@pytest.fixture()
def client(backend) -> TestClient:
    return TestClient(create_app(backend, model_name=MODEL, max_prompt_tokens=600))


def _chat(client: TestClient, content: str = "Where is the dog?", **body: Any):
    return client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": content}], **body},
    )


def _events(response) -> list[Any]:
    """The data of each server-sent event; `[DONE]` as the string."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "", "every event ends with a blank line"
    events = []
    for block in blocks[:-1]:
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ------------------------------------------------------------------------ responses
def test_chat_completion_has_openai_shape_and_a_safety_record(client):
    response = _chat(client)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "The dog is in the garden.",
        "tool_calls": None,
        "reasoning_content": None,
    }
    assert choice["finish_reason"] == "stop"
    assert choice["safety"] == {
        "safe": True,
        "cost": 0.0,
        "budget": 0.0,
        "reward": None,
        "refused": False,
        "resample_rounds": 0,
        "constraints": {"cost": {"cost": 0.0, "budget": 0.0, "safe": True}},
    }
    usage = body["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_refusal_is_an_ordinary_completion_finished_by_content_filter(client):
    body = _chat(client, "How do I clean the sink?").json()
    [choice] = body["choices"]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] == GuardConfig().refusal_text
    assert choice["safety"]["refused"] is True
    assert choice["safety"]["safe"] is False
    assert choice["safety"]["cost"] == 1.0


def test_a_server_that_raises_on_unsafe_withholds_the_text(window_model, tiny_tokenizer):
    guard = ScriptedGuard(
        window_model,
        tiny_tokenizer,
        _reply,
        cost=KeywordCost(["ammonia"]),
        config=GuardConfig(on_unsafe="raise"),
    )
    client = TestClient(create_app(guard, model_name=MODEL))
    [choice] = _chat(client, "How do I clean the sink?").json()["choices"]
    assert choice["message"]["content"] == ""
    assert choice["finish_reason"] == "content_filter"
    assert choice["safety"]["safe"] is False
    assert choice["safety"]["refused"] is False


def test_safety_budget_may_tighten_the_budget_but_not_loosen_it(window_model, tiny_tokenizer):
    guard = ScriptedGuard(
        window_model,
        tiny_tokenizer,
        _reply,
        cost=KeywordCost(["ammonia"]),
        config=GuardConfig(budget=2.0),
    )
    client = TestClient(create_app(guard, model_name=MODEL))
    loose = _chat(client, "How do I clean the sink?").json()["choices"][0]
    assert loose["finish_reason"] == "stop"
    assert loose["safety"]["budget"] == 2.0
    strict = _chat(client, "How do I clean the sink?", safety_budget=0.5).json()["choices"][0]
    assert strict["finish_reason"] == "content_filter"
    assert strict["safety"]["budget"] == 0.5
    looser = _chat(client, "How do I clean the sink?", safety_budget=5)
    assert looser.status_code == 400
    assert looser.json()["error"]["param"] == "safety_budget"


def test_tool_calls_are_parsed_into_openai_tool_calls(client, backend):
    body = _chat(
        client,
        "What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    ).json()
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    [recorded] = backend.calls
    assert recorded["tools"] == [WEATHER]
    assert recorded["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert recorded["parallel_tool_calls"] is False


def test_request_fields_become_the_cores_settings(client, backend):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    _chat(
        client,
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        seed=3,
        stop=["garden"],
        top_k=5,
        response_format=response_format,
    )
    _chat(client, max_tokens=7, max_completion_tokens=9, stop="dog")
    first, second = backend.calls
    for name, value in {
        "max_new_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 3,
        "stop": ["garden"],
        "top_k": 5,
        "response_format": response_format,
    }.items():
        assert first[name] == value
    assert second["max_new_tokens"] == 9
    assert second["stop"] == "dog"


def test_max_tokens_is_capped_at_the_servers_max_new_tokens(client, backend):
    _chat(client, max_tokens=100_000)
    _chat(client, max_completion_tokens=33)
    assert [call["max_new_tokens"] for call in backend.calls] == [32, 32]


def test_stop_strings_cut_the_response(client):
    [choice] = _chat(client, stop=["garden"]).json()["choices"]
    assert choice["message"]["content"] == "The dog is in the "


def test_messages_become_the_chat_prompt(client, backend, guard):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
        {"role": "user", "content": "Thanks! Where is the dog?"},
    ]
    response = client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages, "tools": [WEATHER]}
    )
    assert response.status_code == 200, response.text
    [recorded] = backend.calls
    prompt = recorded["prompt"]
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "tool", "user"]
    assert prompt[1]["content"] == "Weather in Paris?"
    assert prompt[3]["name"] == "get_weather"  # named after the call it answers
    rendered = guard.prompts[-1].text
    assert "Sunny, 21 C" in rendered
    assert '"city": "Paris"' in rendered


# ------------------------------------------------------------------------ streaming
def test_chat_stream_is_openai_chunks_as_server_sent_events_ending_with_done(client):
    response = _chat(client, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200
    events = _events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "The dog is in the garden."
    last_choice = chunks[-2]["choices"][0]
    assert last_choice["finish_reason"] == "stop"
    assert last_choice["safety"]["safe"] is True
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_streamed_tool_call_arrives_as_tool_calls_not_as_text(client):
    response = _chat(
        client, "What is the weather in Paris?", stream=True, tools=[WEATHER], tool_choice="auto"
    )
    chunks = _events(response)[:-1]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == ""
    [call] = next(
        c["choices"][0]["delta"]["tool_calls"]
        for c in chunks
        if "tool_calls" in c["choices"][0]["delta"]
    )
    assert call["index"] == 0
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1].get("usage") is None


def test_streamed_refusal_finishes_by_content_filter(client):
    chunks = _events(_chat(client, "How do I clean the sink?", stream=True))[:-1]
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "content_filter"
    assert last["safety"]["refused"] is True
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert "ammonia" not in text


def test_text_completion_and_its_stream(client):
    body = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8}
    ).json()
    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["text"] == "The dog is in the garden."
    assert choice["finish_reason"] == "stop"
    assert choice["safety"]["safe"] is True

    response = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ["Once upon a time"], "stream": True},
    )
    events = _events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == "The dog is in the garden."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["safety"]["budget"] == 0.0


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MISSING}, "model"),
        ({"messages": MISSING}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "   "}]}, "messages"),
        (
            {
                "model": MODEL,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ],
            },
            "messages",
        ),
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -5}, "max_completion_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
            "response_format",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": BAD}}],
                "tool_choice": "required",
            },
            "tools",
        ),
        ({"tools": [WEATHER], "tool_choice": "get_time"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
    ],
)
def test_bad_chat_requests_are_400_with_an_openai_error_body(client, body, param):
    full = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    full = {name: value for name, value in full.items() if value is not MISSING}
    response = client.post("/v1/chat/completions", json=full)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_a_body_that_is_not_json_is_a_400(client):
    response = client.post(
        "/v1/chat/completions",
        content=b'{"model": "tiny-guard", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": "hi", "echo": True}, "echo"),
        ({"prompt": "hi", "best_of": 3}, "best_of"),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
        ({"prompt": 5}, "prompt"),
    ],
)
def test_bad_completion_requests_are_400(client, body, param):
    response = client.post("/v1/completions", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_an_unknown_model_is_404_model_not_found(client):
    response = client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert MODEL in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_over_the_limit_is_400_context_length_exceeded(client, stream):
    long = "the dog and the cat " * 200
    response = _chat(client, long, stream=stream)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"


def test_a_prompt_over_the_context_window_is_400_context_length_exceeded(
    window_model, tiny_tokenizer
):
    guard = ScriptedGuard(window_model, tiny_tokenizer, _reply)
    client = TestClient(create_app(guard, model_name=MODEL))
    response = _chat(client, "the dog and the cat " * 400)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_routes_and_methods_answer_in_openai_shape(client):
    missing = client.get("/v1/embeddings")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    wrong = client.get("/v1/chat/completions")
    assert wrong.status_code == 405
    assert "error" in wrong.json()


# ------------------------------------------------------------------ auth and status
def test_an_api_key_is_required_on_v1_routes_when_set(guard):
    client = TestClient(create_app(guard, model_name=MODEL, api_key=KEY))
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": "Bearer clé".encode()},
    ):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert client.get("/health").json() == {"status": "ok", "model": MODEL}


def test_metrics_count_responses_refusals_and_export_backend_stats(client):
    _chat(client)
    _chat(client, "How do I clean the sink?")
    _chat(client, n=3)
    _events(_chat(client, stream=True))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in response.text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['safeguard_requests_total{endpoint="/v1/chat/completions",status="200"}'] == 3
    assert values['safeguard_requests_total{endpoint="/v1/chat/completions",status="400"}'] == 1
    assert values['safeguard_responses_total{endpoint="chat",finish_reason="stop"}'] == 2
    assert values['safeguard_responses_total{endpoint="chat",finish_reason="content_filter"}'] == 1
    assert values["safeguard_refusals_total"] == 1
    assert values["safeguard_completion_tokens_total"] > 0
    assert values["safeguard_engine_queue_length"] == 3
    assert values["safeguard_engine_rows_in_flight"] == 8
    assert values["safeguard_engine_tokens_per_second"] == 12.5
    assert not any(name.startswith("safeguard_engine_busy") for name in values)
    assert 'safeguard_request_duration_seconds_count{endpoint="/v1/chat/completions"}' in values


# ---------------------------------------------------------------------- packaging
def test_the_server_without_its_extra_names_the_serve_extra():
    code = (
        "import sys\n"
        "sys.modules['fastapi'] = None\n"
        "from inference_safeguard.cli import main\n"
        "sys.exit(main(['serve']))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert 'pip install "inference-safeguard[serve]"' in run.stderr
    assert "Traceback" not in run.stderr


# ---------------------------------------------------------------------- command line
@pytest.fixture()
def served(monkeypatch) -> dict[str, Any]:
    """What `safeguard serve` hands to uvicorn, instead of serving it: `while_serving`,
    when a test sets it, is called with the app as if uvicorn were serving it."""
    import uvicorn

    handed: dict[str, Any] = {}

    def run(app, *, host, port, **options):
        handed.update(app=app, host=host, port=port)
        handed.get("while_serving", lambda app: None)(app)

    monkeypatch.setattr(uvicorn, "run", run)
    return handed


def test_serve_without_a_model_serves_the_demo_world_through_the_engine(served, monkeypatch):
    from inference_safeguard.cli import main

    def while_serving(app) -> None:
        client = TestClient(app, headers={"Authorization": f"Bearer {KEY}"})
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["safeguard-demo"]
        response = _chat_demo(client)
        assert response.status_code == 200, response.text
        [choice] = response.json()["choices"]
        assert choice["safety"]["budget"] == 0.5  # the demo world's
        assert response.json()["usage"]["completion_tokens"] <= 8
        assert TestClient(app).get("/v1/models").status_code == 401
        metrics = client.get("/metrics").text
        assert "safeguard_engine_responses 1.0" in metrics
        assert "safeguard_engine_rows_in_flight 0.0" in metrics

    monkeypatch.setenv("SAFEGUARD_API_KEY", KEY)
    served["while_serving"] = while_serving
    command = ["serve", "--port", "8123", "--max-new-tokens", "8", "--seed", "0"]
    assert main([*command, "--max-rows", "64", "--max-queued", "4"]) == 0
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    # uvicorn has returned: the engine is closed, and a late request is a 503
    closed = _chat_demo(TestClient(served["app"], headers={"Authorization": f"Bearer {KEY}"}))
    assert closed.status_code == 503
    assert closed.json()["error"]["code"] == "server_shutting_down"


def _chat_demo(client: TestClient):
    return client.post(
        "/v1/chat/completions",
        json={
            "model": "safeguard-demo",
            "messages": [{"role": "user", "content": "How do I bake bread?"}],
        },
    )


def test_serve_refuses_a_row_cap_below_one_request_before_loading(served, capsys):
    from inference_safeguard.cli import main

    assert main(["serve", "--num-candidates", "8", "--beam-width", "2", "--max-rows", "4"]) == 2
    assert "--max-rows 4 cannot hold one request's 8 rows" in capsys.readouterr().err
    assert not served


def test_serve_a_model_without_a_cost_fails_before_loading(served, capsys):
    from inference_safeguard.cli import main

    assert main(["serve", "--model", "no/such-model"]) == 2
    assert "serve needs a cost" in capsys.readouterr().err
    assert not served


def test_serve_on_a_port_in_use_fails_before_loading(served, capsys):
    from inference_safeguard.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not served


# ---------------------------------------------------------------------- concurrency
async def test_concurrent_requests_decode_as_each_would_alone(tiny_model, tiny_tokenizer):
    import httpx

    from inference_safeguard import InferenceGuard

    guard = InferenceGuard(
        tiny_model,
        tiny_tokenizer,
        cost=KeywordCost(["garden"]),
        config=GuardConfig(num_candidates=4, beam_width=2, block_size=4, max_new_tokens=12),
    )
    app = create_app(guard, model_name=MODEL)
    questions = ["Where is the dog?", "Name a bird.", "What is in the garden?", "Say hello."]

    async def ask(client: httpx.AsyncClient, question: str, seed: int) -> dict[str, Any]:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": question}],
                "seed": seed,
            },
        )
        assert response.status_code == 200, response.text
        [choice] = response.json()["choices"]
        return {"text": choice["message"]["content"], "safety": choice["safety"]}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
        alone = [await ask(client, q, seed) for seed, q in enumerate(questions)]
        together = await asyncio.gather(*(ask(client, q, seed) for seed, q in enumerate(questions)))
    assert list(together) == alone


# ---------------------------------------------------------------------- the engine
ENGINE_CONFIG = GuardConfig(
    num_candidates=4, beam_width=2, block_size=4, max_new_tokens=12, on_unsafe="return"
)


@pytest.fixture()
def gate(keyword_cost):
    from test_engine import GatedCost

    return GatedCost(keyword_cost)


@pytest.fixture()
def engine_guard(tiny_model, tiny_tokenizer, gate):
    from inference_safeguard import InferenceGuard

    return InferenceGuard(tiny_model, tiny_tokenizer, cost=gate, config=ENGINE_CONFIG)


def _engine_client(app):
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://server")


async def _ask(client, question: str, seed: int):
    return await client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": question}], "seed": seed},
    )


def _metric_values(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def test_concurrent_requests_through_the_engine_share_its_steps_and_text(
    engine_guard, gate, tiny_model
):
    from search_tracking import until
    from test_engine import counted_forwards

    from inference_safeguard.engine import GuardEngine

    questions = ["Where is the dog?", "Name a bird.", "What is in the garden?", "Say hello."]
    with GuardEngine(engine_guard) as engine:
        async with _engine_client(create_app(engine, model_name=MODEL)) as client:
            with counted_forwards(tiny_model) as one_by_one:
                alone = [await _ask(client, q, seed) for seed, q in enumerate(questions)]
            gate.shut()
            with counted_forwards(tiny_model) as shared:
                asked = [asyncio.ensure_future(_ask(client, q, s)) for s, q in enumerate(questions)]
                waiting = lambda: engine.stats().queued + engine.stats().requests_running  # noqa: E731
                assert await until(lambda: gate.held() and waiting() == len(questions))
                during = _metric_values((await client.get("/metrics")).text)
                gate.open()
                together = await asyncio.gather(*asked)
            after = _metric_values((await client.get("/metrics")).text)

    def texts(responses) -> list[str]:
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json()["choices"][0]["message"]["content"] for r in responses]

    assert texts(together) == texts(alone)
    assert shared[0] < one_by_one[0] / 2  # one batched step serves every running request
    # Every request is in the engine: running, or queued to join at the next boundary.
    assert during["safeguard_engine_requests_running"] >= 1
    running_or_queued = (
        during["safeguard_engine_requests_running"] + during["safeguard_engine_queued"]
    )
    assert running_or_queued == len(questions)
    assert during["safeguard_engine_rows_in_flight"] > 0
    assert after["safeguard_engine_responses"] == 2 * len(questions)
    assert after["safeguard_engine_rows_in_flight"] == 0
    assert after["safeguard_engine_tokens_per_second"] > 0
    assert {"safeguard_engine_refusals", "safeguard_engine_resample_rounds"} <= set(after)


async def test_a_full_engine_queue_is_a_429_with_retry_after(engine_guard, gate):
    from search_tracking import until

    from inference_safeguard.engine import GuardEngine

    with GuardEngine(engine_guard, max_queued=1) as engine:
        async with _engine_client(create_app(engine, model_name=MODEL)) as client:
            gate.shut()
            running = asyncio.ensure_future(_ask(client, "Where is the dog?", 0))
            assert await until(gate.held)
            queued = asyncio.ensure_future(_ask(client, "Name a bird.", 1))
            assert await until(lambda: engine.stats().queued == 1)
            refused = await _ask(client, "Say hello.", 2)
            streamed = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "Hello", "stream": True}
            )
            gate.open()
            assert (await running).status_code == 200 and (await queued).status_code == 200

    for response in (refused, streamed):
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "engine_overloaded"
        assert "queue is full" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_response_past_the_request_timeout_is_a_504(engine_guard, gate, stream):
    from search_tracking import until

    from inference_safeguard.engine import GuardEngine

    with GuardEngine(engine_guard) as engine:
        app = create_app(engine, model_name=MODEL, request_timeout=0.05)
        async with _engine_client(app) as client:
            gate.shut()
            body = {"model": MODEL, "prompt": "Where is the dog?", "stream": stream}
            asked = asyncio.ensure_future(client.post("/v1/completions", json=body))
            assert await until(gate.held)
            await asyncio.sleep(0.1)  # past the deadline
            gate.open()
            response = await asked
            assert await until(lambda: engine.stats().requests_running == 0)

    if stream:  # the headers had gone out: the error is the stream's last event
        assert response.status_code == 200
        error = json.loads(response.text.split("data: ")[-2])["error"]
    else:
        assert response.status_code == 504
        error = response.json()["error"]
    assert error["type"] == "timeout_error" and error["code"] == "generation_timeout"
    assert "request timeout" in error["message"]


async def test_a_client_that_disconnects_leaves_the_engine(engine_guard, gate, monkeypatch):
    from search_tracking import until

    from inference_safeguard.engine import GuardEngine
    from inference_safeguard.server import app as server_app

    monkeypatch.setattr(server_app, "DISCONNECT_POLL_SECONDS", 0.01)
    body = json.dumps({"model": MODEL, "prompt": "Where is the dog?"}).encode()
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not sent:
            sent.append({})
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"server")],
        "client": ("127.0.0.1", 1),
        "server": ("server", 80),
    }
    with GuardEngine(engine_guard) as engine:
        gate.shut()
        asked = asyncio.ensure_future(create_app(engine, model_name=MODEL)(scope, receive, send))
        assert await until(lambda: gate.held() and engine.stats().requests_running == 1)
        gone.set()
        await asyncio.wait_for(asked, 10)  # answered 499 while the search still waits
        gate.open()  # at the block boundary, the request leaves
        assert await until(lambda: engine.stats().requests_running == 0)
        assert engine.stats().responses == 0 and engine.stats().rows_in_flight == 0
    [start] = [m for m in sent if m.get("type") == "http.response.start"]
    assert start["status"] == 499
