"""The server's safety sessions: `safety_session` (or `X-Safety-Session`) spans calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from inference_safeguard import GuardConfig
from inference_safeguard.scorers import CallableScorer
from inference_safeguard.server import create_app
from inference_safeguard.session import SafetySessions
from inference_safeguard.testing import ScriptedGuard

MODEL = "tiny-scripted"
REFUSAL = GuardConfig().refusal_text


@pytest.fixture()
def client(tiny_model, tiny_tokenizer) -> TestClient:
    cost = CallableScorer(
        lambda prompt, response: float(bool(response.strip()) and response != REFUSAL),
        batched=False,
    )
    guard = ScriptedGuard(
        tiny_model, tiny_tokenizer, ["The dog is in the garden."], cost=cost,
        config=GuardConfig(budget=5.0),
    )  # fmt: skip
    sessions = SafetySessions({"cost": 2.0})
    return TestClient(create_app(guard, model_name=MODEL, sessions=sessions))


def chat(client: TestClient, headers: dict[str, str] | None = None, **body: Any) -> dict:
    response = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body},
        headers=headers or {},
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_a_session_named_by_field_or_header_spans_requests(client):
    first = chat(client, safety_session="conv-1")
    second = chat(client, headers={"X-Safety-Session": "conv-1"})
    third = chat(client, safety_session="conv-1")
    assert [c["safety"]["refused"] for c in (first, second, third)] == [False, False, True]
    assert third["message"]["content"] == REFUSAL
    assert second["safety"]["budget"] == 1.0  # held to what the first left
    assert not chat(client, safety_session="conv-2")["safety"]["refused"]
    assert not chat(client)["safety"]["refused"]  # no session: per response only


def test_a_streamed_session_response_is_charged(client):
    body = {"stream": True, "safety_session": "s"}
    for _ in range(2):
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body},
        ) as response:
            assert response.status_code == 200
            text = "".join(response.iter_text())
        assert "The dog is in the garden." in text
    assert chat(client, safety_session="s")["safety"]["refused"]


def test_each_response_reports_what_its_session_has_left(client):
    first = chat(client, safety_session="conv-9")
    assert first["safety"]["session"] == {
        "id": "conv-9",
        "remaining": {"cost": 1.0},
        "spent": False,
        "turns": 1,
    }
    completion = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Hi", "safety_session": "conv-9"}
    )
    assert completion.status_code == 200, completion.text
    session = completion.json()["choices"][0]["safety"]["session"]
    assert session == {"id": "conv-9", "remaining": {"cost": 0.0}, "spent": True, "turns": 2}
    refused = chat(client, safety_session="conv-9")["safety"]
    assert refused["refused"] and refused["session"]["spent"]
    assert refused["session"]["turns"] == 2  # the refusal generated nothing
    assert "session" not in chat(client)["safety"]  # no session: no session record


def test_a_streamed_session_response_reports_the_session_in_its_last_chunk(client):
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "safety_session": "streamed",
        },
    ) as response:
        events = [
            json.loads(line.removeprefix("data: "))
            for line in response.iter_lines()
            if line.startswith("data: {")
        ]
    records = [c["safety"] for e in events for c in e["choices"] if c.get("safety")]
    assert records[-1]["session"] == {
        "id": "streamed",
        "remaining": {"cost": 1.0},
        "spent": False,
        "turns": 1,
    }


def test_a_server_without_sessions_refuses_a_session_id(tiny_model, tiny_tokenizer):
    guard = ScriptedGuard(tiny_model, tiny_tokenizer, ["Hello."])
    client = TestClient(create_app(guard, model_name=MODEL))
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "safety_session": "x",
        },
    )
    assert response.status_code == 400 and "session budgets" in response.text


@pytest.fixture()
def served(monkeypatch) -> dict[str, Any]:
    """What `safeguard serve` hands to uvicorn; `while_serving(app)` runs in its place."""
    import uvicorn

    handed: dict[str, Any] = {}

    def run(app, *, host, port, **options):
        handed.update(app=app)
        handed.get("while_serving", lambda app: None)(app)

    monkeypatch.setattr(uvicorn, "run", run)
    return handed


def test_serve_with_session_budgets_keeps_sessions(served, tiny_model_dir):
    from inference_safeguard.cli import main

    seen: list[dict] = []

    def while_serving(app) -> None:
        client = TestClient(app)
        for _ in range(2):
            response = client.post(
                "/v1/chat/completions",
                json={
                    "model": str(tiny_model_dir),
                    "messages": [{"role": "user", "content": "Hi"}],
                    "safety_session": "c",
                },
            )
            assert response.status_code == 200, response.text
            seen.append(response.json()["choices"][0]["safety"])

    served["while_serving"] = while_serving
    command = [
        "serve", "--model", str(tiny_model_dir), "--port", "8124",
        "--constraint", "vowels", "100", "regex:[aeiou]",
        "--session-budgets", '{"vowels": 5}',
        "--num-candidates", "4", "--beam-width", "2", "--max-new-tokens", "8", "--seed", "0",
    ]  # fmt: skip
    assert main(command) == 0
    first, second = seen
    assert first["constraints"]["vowels"]["budget"] == 5.0
    spent = 0.0 if first["refused"] else first["constraints"]["vowels"]["cost"]
    assert second["constraints"]["vowels"]["budget"] == min(100.0, 5.0 - spent)


def test_serve_refuses_session_budgets_of_unknown_constraints(served, tiny_model_dir, capsys):
    from inference_safeguard.cli import main

    command = [
        "serve", "--model", str(tiny_model_dir), "--port", "8125",
        "--cost-keywords", "dog", "--session-budgets", '{"pii": 1}',
    ]  # fmt: skip
    assert main(command) == 2
    assert "not constraints of the guard" in capsys.readouterr().err
    assert not served
