"""The API's contract on one live server (the tiny-random tuned workspace, with a key): every
OpenAI chat-completions field is supported or refused with a 400 naming it (never ignored), a
seeded fuzz over request bodies never gets a 5xx or a traceback and never stalls a concurrent
request, and the server's edges: 405 with Allow, --port 0, a key with a trailing newline,
[serve] max_request_bytes = 0, out-of-range values from the page's sliders.

Run with `pytest tests/test_api_contract.py -s` to see the fuzz's case count and time.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import PYTHON, Server, run_py, start_server

pytestmark = pytest.mark.slow

KEY = "contract-key-5d1e"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(tuned_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tuned_workspace, tmp_path_factory.mktemp("contract") / "server.log", env={"FINETUNE_API_KEY": KEY}, key=KEY
    )
    try:
        yield srv
    finally:
        srv.stop()


def user(**extra: Any) -> dict[str, Any]:
    return {"messages": HELLO, "max_tokens": 4, **extra}


def assert_error(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
REFUSED: dict[str, tuple[str, dict[str, Any]]] = {
    "tools-required": ("tools", user(tools=[TOOL], tool_choice="required")),
    "tool-choice-required": ("tool_choice", user(tool_choice="required")),
    "json-mode": ("response_format", user(response_format={"type": "json_object"})),
    "json-schema": ("response_format", user(response_format={"type": "json_schema", "json_schema": {"name": "x"}})),
    "image-only": ("messages[0].content", {"messages": [{"role": "user", "content": [IMAGE]}]}),
    "text-and-image": (
        "messages[0].content",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, IMAGE]}]},
    ),
    "audio-part": (
        "messages[0].content",
        {
            "messages": [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}
            ]
        },
    ),
    "list-of-strings": ("messages[0].content", {"messages": [{"role": "user", "content": ["hello", "there"]}]}),
    "empty-parts": ("messages[0].content", {"messages": [{"role": "user", "content": []}]}),
    "tool-role": ("messages[1].role", {"messages": [*HELLO, {"role": "tool", "content": "4", "tool_call_id": "a"}]}),
    "tool-calls": (
        "messages[0].tool_calls",
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}, *HELLO]},
    ),
    "message-name": ("messages[0].name", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}),
    "n-2": ("n", user(n=2)),
    "n-true": ("n", user(n=True)),
    "seed": ("seed", user(seed=1)),
    "frequency-penalty": ("frequency_penalty", user(frequency_penalty=0.5)),
    "presence-penalty": ("presence_penalty", user(presence_penalty=-1)),
    "logit-bias": ("logit_bias", user(logit_bias={"1": 100})),
    "audio-out": ("modalities", user(modalities=["text", "audio"])),
    "audio": ("audio", user(audio={"voice": "alloy", "format": "wav"})),
    "store": ("store", user(store=True)),
    "reasoning-effort": ("reasoning_effort", user(reasoning_effort="high")),
    "prediction": ("prediction", user(prediction={"type": "content", "content": "x"})),
    "web-search": ("web_search_options", user(web_search_options={})),
    "functions": ("functions", user(functions=[TOOL["function"]])),
    "unknown-field": ("top_k", user(top_k=5)),
    "logprobs-string": ("logprobs", user(logprobs="yes")),
    "top-logprobs-alone": ("top_logprobs", user(top_logprobs=2)),
    "top-logprobs-21": ("top_logprobs", user(logprobs=True, top_logprobs=21)),
    "five-stops": ("stop", user(stop=["a", "b", "c", "d", "e"])),
    "long-stop": ("stop", user(stop="x" * 1001)),
    "stream-options-unknown": (
        "stream_options.include_obfuscation",
        user(stream=True, stream_options={"include_obfuscation": True}),
    ),
    "model-number": ("model", user(model=5)),
    "max-completion-tokens": ("max_completion_tokens", user(max_completion_tokens=0)),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_field_is_a_400_naming_it(server: Server, name: str) -> None:
    param, body = REFUSED[name]
    assert_error(server.post(body, timeout=60), 400, param)


def test_harmless_defaults_and_text_parts_are_accepted(server: Server) -> None:
    defaults = user(
        model="any-name",
        tools=[],
        tool_choice="none",
        parallel_tool_calls=True,
        response_format={"type": "text"},
        n=1,
        logprobs=False,
        frequency_penalty=0,
        presence_penalty=0.0,
        logit_bias={},
        store=False,
        seed=None,
        stream=None,
        user="u-1",
        metadata={"k": "v"},
    )
    r = server.post(defaults, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0].get("logprobs") is None
    plain = server.post(user(messages=[{"role": "user", "content": "hello there"}], temperature=0), timeout=60).json()
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]
    # A previous answer sent back as the openai client dumps it (null fields), and the developer role.
    history = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": parts},
        {"role": "assistant", "content": "hi", "refusal": None, "tool_calls": None, "audio": None},
        {"role": "user", "content": parts},
    ]
    for messages, prompt_tokens in ((history[1:2], plain["usage"]["prompt_tokens"]), (history, None)):
        r = server.post(user(messages=messages, temperature=0), timeout=60)
        assert r.status_code == 200, r.text
        if prompt_tokens is not None:  # text parts are the text they spell
            assert r.json() == {**r.json(), "choices": plain["choices"]} and r.json()["usage"] == plain["usage"]


def test_logprobs(server: Server) -> None:
    body = user(max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    out = server.post(body, timeout=60).json()
    choice = out["choices"][0]
    tokens = choice["logprobs"]["content"]
    assert len(tokens) == out["usage"]["completion_tokens"], (tokens, out["usage"])
    for t in tokens:
        assert set(t) == {"token", "logprob", "bytes", "top_logprobs"} and t["logprob"] <= 0
        assert [a["logprob"] for a in t["top_logprobs"]] == sorted(
            (a["logprob"] for a in t["top_logprobs"]), reverse=True
        )
        assert len(t["top_logprobs"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert t["top_logprobs"][0]["token"] == t["token"] and t["top_logprobs"][0]["logprob"] == pytest.approx(
            t["logprob"]
        )
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [t for c in chunks for t in (c["choices"][0].get("logprobs") or {}).get("content", [])]
    assert streamed == tokens
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]


def test_other_methods_are_405_with_allow(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    for method, path, allow in (
        ("GET", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models", "GET"),
    ):
        r = httpx.request(method, server.url + path, headers=headers, timeout=60)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.status_code, r.text[:300])
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server.url + "/v1/embeddings", json={}, headers=headers, timeout=60)
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]


def test_page_sliders_out_of_range_are_said_not_logged(server: Server) -> None:
    """A value out of a slider's range (typed into its number box) is an error on the page; it
    was a traceback in the log for every message."""
    from gradio_client import Client

    client = Client(server.url, auth=("anyone", KEY), verbose=False)
    before = server.log_tail(10**7)
    with pytest.raises(Exception, match="Temperature .*5.0 is not between"):
        client.predict("hello", 4, 5.0, 1.0, 50, api_name="/respond")
    # A hair past an end (a float step) is that end.
    assert isinstance(client.predict("hello", 4, 2.0000000000000004, 1.0000000000000002, 50, api_name="/respond"), str)
    time.sleep(0.5)
    after = server.log_tail(10**7)[len(before) :]
    assert "Traceback" not in after, after[-3000:]


# --------------------------------------------------------------------------------------------
# The fuzz: seeded request bodies around a valid one, with a probe request alongside.

FIELDS = [
    "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
    "stream_options", "n", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "seed",
    "frequency_penalty", "presence_penalty", "logit_bias", "user", "metadata", "store", "modalities", "audio",
    "functions", "function_call", "parallel_tool_calls", "service_tier", "top_k", "", "__proto__",
]  # fmt: skip
SCALARS: list[Any] = [None, True, False, 0, 1, -1, 2, 3, 20, 21, 0.5, 1.5, -0.0, 1e308, -1e308, 10**30, "", "x", "none",
                      "auto", "required", "\u0000", "é🙂", "a" * 1000, "a" * 1001]  # fmt: skip


def value(rand: random.Random, depth: int = 0) -> Any:
    pick = rand.random()
    if depth > 2 or pick < 0.6:
        return rand.choice(SCALARS)
    if pick < 0.8:
        return [value(rand, depth + 1) for _ in range(rand.randrange(0, 6))]
    keys = ["type", "text", "role", "content", "include_usage", "image_url", rand.choice(FIELDS)]
    return {rand.choice(keys): value(rand, depth + 1) for _ in range(rand.randrange(0, 4))}


def message(rand: random.Random) -> Any:
    roles = ["user", "system", "assistant", "developer", "tool", "robot", None, 1]
    contents: list[Any] = ["hi", "", [{"type": "text", "text": "hi"}], [IMAGE], ["hi"], None, 5, "x" * 3000]
    m: Any = {"role": rand.choice(roles), "content": rand.choice(contents)}
    if rand.random() < 0.2:
        m[rand.choice(["name", "tool_calls", "refusal", "content", "role"])] = value(rand)
    return m if rand.random() > 0.05 else value(rand)


def fuzz_case(rand: random.Random) -> bytes:
    body: dict[str, Any] = {
        "messages": [*[message(rand) for _ in range(rand.randrange(0, 3))], HELLO[0]],
        "max_tokens": 8,
    }
    for _ in range(rand.randrange(0, 4)):
        body[rand.choice(FIELDS)] = value(rand)
    if rand.random() < 0.2:
        body["stop"] = [
            rand.choice(["a", "e", " ", "\n", "x" * rand.randrange(1, 1001)]) for _ in range(rand.randrange(1, 5))
        ]
    if rand.random() < 0.3:
        body["stream"] = True
    if rand.random() < 0.2:
        body["logprobs"], body["top_logprobs"] = True, rand.choice([0, 1, 5, 20])
    data = json.dumps(body).encode()
    kind = rand.random()
    if kind < 0.05:
        return data[: rand.randrange(len(data))]  # cut short
    if kind < 0.08:
        return bytes(rand.randrange(256) for _ in range(rand.randrange(1, 40)))
    if kind < 0.1:
        return data.replace(b'"hello"', b'"\\udc80"')  # a lone surrogate
    return data


def check(r: httpx.Response, data: bytes) -> None:
    assert r.status_code < 500, (r.status_code, data[:300], r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", error
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n"), (data[:300], r.text[-300:])
    else:
        assert r.json()["object"] == "chat.completion", r.text[:300]


def test_fuzz_request_bodies(server: Server) -> None:
    """3000 seeded bodies, 4 clients at once, while a probe asks a normal question every 0.2 s:
    each answer is a 2xx or a 4xx with an OpenAI error object, never a 5xx; the probe is never
    held up; the log has no traceback."""
    cases, rand = 3000, random.Random(20240611)
    bodies = [fuzz_case(rand) for _ in range(cases)]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    probe_times: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                start = time.monotonic()
                r = http.post(f"{server.url}/v1/chat/completions", json=user(temperature=0), headers=headers)
                assert r.status_code == 200, r.text
                probe_times.append(time.monotonic() - start)
                time.sleep(0.2)

    failures: list[str] = []
    statuses: dict[int, int] = {}

    def client(share: list[bytes]) -> None:
        with httpx.Client(timeout=60) as http:
            for data in share:
                try:
                    r = http.post(f"{server.url}/v1/chat/completions", content=data, headers=headers)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    check(r, data)
                except Exception as err:  # collected: one failure should not hide the others
                    failures.append(repr(err)[:600])

    start = time.monotonic()
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    workers = [threading.Thread(target=client, args=(bodies[i::4],)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    prober.join(60)
    took = time.monotonic() - start
    slowest = max(probe_times, default=0.0)
    print(f"\n[fuzz] {cases} cases {dict(sorted(statuses.items()))} in {took:.1f} s; probe: slowest {slowest:.2f} s")
    assert not failures, f"{len(failures)} of {cases} failed:\n" + "\n".join(failures[:10])
    assert probe_times and max(probe_times) < 10, probe_times
    log = server.log_tail(10**7)
    assert "Traceback" not in log and "Internal Server Error" not in log, log[-4000:]


# --------------------------------------------------------------------------------------------
# Starting the server.


def test_port_zero_is_a_free_port_and_the_key_is_stripped(tuned_workspace: Path, tmp_path: Path) -> None:
    """--port 0 served on 7860; a key with a trailing newline (a secret file) could never match."""
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "FINETUNE_API_KEY": f"{KEY} \n"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PYTHON, "inference/gradio_chat.py", "--port", "0"],
            cwd=tuned_workspace,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline, port = time.monotonic() + 300, None
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"on http://127\.0\.0\.1:(\d+) ", log.read_text("utf-8", "replace"))
            port = int(found.group(1)) if found else time.sleep(0.5)
        assert port not in (None, 0, 7860), log.read_text("utf-8", "replace")[-3000:]
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_request_bytes_not_positive_is_refused_at_start(tuned_workspace: Path, value: str) -> None:
    result = run_py(
        tuned_workspace,
        "inference/gradio_chat.py",
        "--port",
        "0",
        "--set",
        f"serve.max_request_bytes={value}",
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert f"serve.max_request_bytes = {value} is not valid: it must be a positive number of bytes" in line, line
