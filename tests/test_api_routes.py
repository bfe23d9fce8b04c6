"""tuner/serving/api.py in-process, with FastAPI's TestClient (no server started): the key, the
body cap, bad and unsupported requests, 405 with Allow, /v1/models, plain and streamed answers
(the SSE framing), what reaches the model, and the Gradio page mounted at /.

Answers come from the tiny random model of the tiny_built workspace (greedy, so a route's answer
must equal the engine's own); the tests about what the model was given use `Scripted`, a stand-in
model that records its prompts. The live server's tests are test_api.py, test_api_contract.py and
test_inference.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest
from fastapi.testclient import TestClient
from tuner.serving.api import chat_page, create_app, slider
from tuner.serving.engine import ChatEngine, formatted
from tuner.serving.hf import Engine
from tuner.settings import load_settings

KEY = "routes-key-41c7"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "hello"}]


class Scripted(ChatEngine):
    """Stands for the model: one token per character of ANSWER, and a record of the messages of
    every prompt it was given (a prompt token per character of their JSON)."""

    ANSWER = "Scripted answer."
    end_ids: set[int] = set()
    model_name = "scripted"

    def __init__(self, settings: dict[str, Any], context: int = 4096) -> None:
        super().__init__()
        self.settings, self.context, self.prompts = settings, context, []
        self.tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "".join(map(chr, ids)))

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        self.prompts.append(messages)
        return [0] * len(json.dumps(messages))

    def tokens(self, ids: list[int], max_new_tokens: int, *sampling: Any) -> Iterator[int]:
        yield from map(ord, self.ANSWER)


@pytest.fixture(scope="module")
def settings(tiny_built: Path) -> dict[str, Any]:
    return load_settings(tiny_built / "settings.toml")


@pytest.fixture(scope="module")
def engine(tiny_built: Path, settings: dict[str, Any]) -> Engine:
    return Engine(settings, tiny_built, baseonly=True)


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[TestClient]:
    """The app around the tiny model, its key given with the spaces and newline of a secret file."""
    with TestClient(create_app(engine, f"  {KEY} \n", "About this model."), headers=AUTH) as c:
        yield c


def scripted_client(settings: dict[str, Any], key: str | None = KEY, **serve: Any) -> TestClient:
    settings = copy.deepcopy(settings)
    settings["serve"].update(serve)
    return TestClient(create_app(Scripted(settings), key), headers=AUTH)


def post(client: TestClient, body: Any, **kw: Any) -> Any:
    return client.post("/v1/chat/completions", json=body, **kw)


def error_of(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def test_the_key(client: TestClient, settings: dict[str, Any]) -> None:
    """No key, a wrong one, another scheme: a 401 on both routes. The right one (the server's
    with its spaces stripped) passes, compared whole."""
    body = {"messages": HELLO, "max_tokens": 2}
    for auth in (None, "Bearer wrong", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer", f"Basic {KEY}"):
        headers = {"Authorization": auth or ""}
        for r in (client.get("/v1/models", headers=headers), post(client, body, headers=headers)):
            error = error_of(r, 401)
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key", (auth, error)
    assert client.get("/v1/models").status_code == 200
    assert post(client, body, headers={"Authorization": f"bearer  {KEY} "}).status_code == 200
    # No key (unset, or only spaces in the variable): every request passes.
    for key in (None, " \n"):
        assert scripted_client(settings, key).get("/v1/models", headers={"Authorization": ""}).status_code == 200


def test_the_body_cap(settings: dict[str, Any]) -> None:
    """Over [serve] max_request_bytes: a 413, by the declared length before the body is read,
    or while a body of no declared length streams in; the key is checked first."""
    client = scripted_client(settings, max_request_bytes=300)
    fits = json.dumps({"messages": HELLO, "max_tokens": 2, "user": ""}).encode()
    fits = fits.replace(b'"user": ""', b'"user": "' + b"u" * (300 - len(fits)) + b'"')
    assert len(fits) == 300 and client.post("/v1/chat/completions", content=fits).status_code == 200
    over = fits.replace(b'"u', b'"uu')
    declared = {"Content-Length": "50000000"}  # with a short body: refused without reading it
    for r in (
        client.post("/v1/chat/completions", content=over),
        client.post("/v1/chat/completions", content=b"{}", headers=declared),
        client.post("/v1/chat/completions", content=iter([fits, b" "])),  # chunked: no length
    ):
        error = error_of(r, 413)
        assert error["code"] == "request_too_large" and "larger than 300 bytes" in error["message"], error
    assert client.post("/v1/chat/completions", content=iter([fits])).status_code == 200
    r = client.post("/v1/chat/completions", content=over, headers={"Authorization": ""})
    assert error_of(r, 401)["type"] == "authentication_error"


def test_a_malformed_body_is_a_400_naming_the_field(settings: dict[str, Any]) -> None:
    client = scripted_client(settings)
    for raw in (b'{"messages": [', b"\xff\xfe", b"", b"[" * 100_000):
        error = error_of(client.post("/v1/chat/completions", content=raw), 400)
        assert error["message"] == "the request body is not valid JSON" and error["type"] == "invalid_request_error"
    for param, body in {
        None: [1, 2],
        "messages": {"messages": []},
        "messages[0].role": {"messages": [{"role": "robot", "content": "x"}]},
        "messages[0].content": {"messages": [{"role": "user", "content": 1}]},
        "max_tokens": {"messages": HELLO, "max_tokens": 10**9},
        "temperature": {"messages": HELLO, "temperature": "hot"},
        "stream": {"messages": HELLO, "stream": "yes"},
    }.items():
        assert error_of(post(client, body), 400)["param"] == param, body


def test_unimplemented_fields_are_a_400_naming_them(settings: dict[str, Any]) -> None:
    client = scripted_client(settings)
    for field, value, says in (
        ("seed", 1, "'seed' is not supported by this server (only its default)"),
        ("n", 2, "'n' is not supported by this server (only its default)"),
        ("tool_choice", "required", "'tool_choice' is not supported"),
        ("top_k", 5, "unrecognized request argument: 'top_k'"),
        ("logprobs", True, "'logprobs' is not supported by this server's backend"),  # Scripted has none
    ):
        error = error_of(post(client, {"messages": HELLO, field: value}), 400)
        assert error["param"] == field and error["message"].startswith(says), error
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    error = error_of(post(client, {"messages": [{"role": "user", "content": image}]}), 400)
    assert error["param"] == "messages[0].content" and "images and audio are not supported" in error["message"]
    # At their defaults they are accepted: they ask for nothing.
    assert post(client, {"messages": HELLO, "n": 1, "tools": [], "seed": None}).status_code == 200


def test_other_methods_are_a_405_with_allow(client: TestClient) -> None:
    for method, path, allow in (
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models", "GET"),
    ):
        r = client.request(method, path)
        error = error_of(r, 405)
        assert r.headers["allow"] == allow and error["code"] == "method_not_allowed", (method, path, error)
    error = error_of(client.post("/v1/embeddings", json={}), 404)
    assert error["message"].startswith("no such endpoint: /v1/embeddings"), error


def test_models(client: TestClient) -> None:
    card = {"id": "tiny-random", "object": "model", "created": 0, "owned_by": "local"}
    assert client.get("/v1/models").json() == {"object": "list", "data": [card]}


def ask(engine: Engine, settings: dict[str, Any]) -> tuple[dict[str, Any], str, int]:
    """A request, and the engine's own greedy answer to it and its prompt's token count."""
    messages = [{"role": "user", "content": "I lost my keys again"}]
    prompt = formatted(messages, settings)
    expected = engine.reply(prompt, max_new_tokens=12, temperature=0)
    return {"messages": messages, "max_tokens": 12, "temperature": 0}, expected, len(engine.prompt_ids(prompt))


def test_a_plain_answer(client: TestClient, engine: Engine, settings: dict[str, Any]) -> None:
    body, expected, prompt_tokens = ask(engine, settings)
    out = post(client, body).json()
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion" and out["model"] == "tiny-random"
    assert out["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": expected}, "finish_reason": "length"}
    ]
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12}


def test_a_streamed_answer(client: TestClient, engine: Engine, settings: dict[str, Any]) -> None:
    """Server-sent events: `data: <chunk>` and a blank line each; the role first, then the pieces,
    the finish reason, the usage when asked for, and `data: [DONE]` last."""
    body, expected, prompt_tokens = ask(engine, settings)
    for include_usage in (True, False):
        r = post(client, {**body, "stream": True, "stream_options": {"include_usage": include_usage}})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        events = r.text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], r.text[-300:]
        assert all(e.startswith("data: {") for e in events[:-2]), r.text
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
        assert len({c["id"] for c in chunks}) == 1 and {c["object"] for c in chunks} == {"chat.completion.chunk"}
        usage = chunks.pop() if include_usage else None
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
        assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:-1]) == expected
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        if include_usage:
            assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == prompt_tokens, usage
            assert usage["usage"]["completion_tokens"] == 12
        assert all("usage" not in c for c in chunks)


def test_the_system_message_and_history_reach_the_model(settings: dict[str, Any]) -> None:
    """The model is given the whole conversation in the training prompt format: the request's
    system message (instead of the configured one), the earlier turns, the new one."""
    settings = copy.deepcopy(settings)
    assert settings["prompt"]["text_template"] == "{phrase}" and not settings["prompt"]["system"]
    settings["prompt"].update(text_template="Tone of: {phrase}", system="The configured system message.")
    with scripted_client(settings) as client:
        model = client.app.state.engine
        conversation = [
            {"role": "developer", "content": "Answer in one word."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": [{"type": "text", "text": "second "}, {"type": "text", "text": "question"}]},
        ]
        out = post(client, {"messages": conversation}).json()
        assert out["choices"][0]["message"]["content"] == Scripted.ANSWER
        given = model.prompts[-1]
        assert given == [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Tone of: first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "Tone of: second question"},
        ]
        assert out["usage"]["prompt_tokens"] == len(json.dumps(given))
        # Without a system message, the configured one.
        post(client, {"messages": HELLO})
        assert model.prompts[-1] == [
            {"role": "system", "content": "The configured system message."},
            {"role": "user", "content": "Tone of: hello"},
        ]


def test_a_prompt_too_long_and_a_server_shutting_down(settings: dict[str, Any]) -> None:
    client = scripted_client(settings)
    client.app.state.engine.context = 50
    for stream in (False, True):
        error = error_of(post(client, {"messages": HELLO * 5, "max_tokens": 1, "stream": stream}), 400)
        assert error["param"] == "messages" and error["code"] == "context_length_exceeded", error
    client.app.state.engine.close()
    error = error_of(post(client, {"messages": HELLO, "max_tokens": 1}), 503)
    assert error["code"] == "server_shutting_down" and error["type"] == "server_error", error


def test_the_page_is_mounted_behind_the_key(client: TestClient, engine: Engine) -> None:
    page = TestClient(client.app)  # a browser: no Authorization header
    assert page.get("/").status_code == 200 and "<html" in page.get("/").text
    assert page.get("/config").status_code == 401
    assert page.post("/login", data={"username": "anyone", "password": "wrong"}).status_code == 400
    assert page.post("/login", data={"username": "anyone", "password": KEY}).status_code == 200
    config = page.get("/config").json()
    # gradio writes a .pyi stub, a stale copy of the module, beside any module defining a component class.
    assert not Path(create_app.__code__.co_filename).with_suffix(".pyi").exists()
    assert config["mode"] == "chat_interface", config["mode"]
    assert config["title"] == "Chat with tiny-random"
    markdown = [c["props"]["value"] for c in config["components"] if c["type"] == "markdown"]
    assert any("About this model." in text for text in markdown), markdown
    props = [c["props"] for c in config["components"] if c["type"] == "slider"]
    sliders = {p["label"]: (p["minimum"], p["maximum"], p["value"]) for p in props}
    assert sliders == {
        "Max new tokens": (1, min(2048, engine.context), 128),
        "Temperature (0 = greedy)": (0.0, 2.0, 0.0),
        "Top-p": (0.05, 1.0, 1.0),
        "Top-k": (1, 200, 50),
    }


def test_the_page_answers_with_the_history_and_says_bad_values(settings: dict[str, Any]) -> None:
    settings = copy.deepcopy(settings)
    settings["prompt"]["system"] = "The configured system message."
    model = Scripted(settings)
    page = chat_page(model, None)
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    shown = list(page.fn("now", history, 64, 0.0, 1.0, 50))
    assert shown[-1] == Scripted.ANSWER and shown == [Scripted.ANSWER[: len(s)] for s in shown]
    assert [m["role"] for m in model.prompts[-1]] == ["system", "user", "assistant", "user"]
    assert model.prompts[-1] == formatted([*history, {"role": "user", "content": "now"}], settings)
    temperature = slider(0.0, 2.0, 1.0, 0.05, "Temperature")
    assert temperature.preprocess(2.0000000000000004) == 2.0 and temperature.preprocess(0.5) == 0.5
    for bad in (5.0, -0.1, "1", True):
        with pytest.raises(gr.Error, match=f"Temperature: {bad!r} is not between 0.0 and 2.0"):
            temperature.preprocess(bad)
