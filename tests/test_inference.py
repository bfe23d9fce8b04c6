"""The rendered workspace's inference front-ends, end to end on the tiny-random CPU workspace:
console chat, the OpenAI-compatible API and the Gradio page of inference/gradio_chat.py (with the
official `openai` client and a real Chromium).

The tiny random model can only memorise, and how well it does is chaotic across machines, so
these tests never score which tone it picks (that is test_finetune.py's job, on SmolLM2). They
check what holds everywhere: the fine-tuned model answers in the trained form (one of the six
tone words), and every front-end (console, API streamed or not, 16 clients at once and the page)
gives exactly the answer the server gave to the same phrase asked alone (greedy).

Run with `pytest tests/test_inference.py -s` to see the timings printed.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ARTIFACTS, PYTHON, Server, browser_page, free_port, run_py, sample_rows, start_server

KEY = "test-key-7f3a"
ADAPTER_HINT = "python finetuning/invoke_olive.py"


TONES = {"joy", "sadness", "anger", "fear", "surprise", "disgust"}


def tone_words(answers: list[str]) -> float:
    """Share of answers that are one of the six tone words: the form the model was tuned to."""
    return sum(answer.strip() in TONES for answer in answers) / len(answers)


# --------------------------------------------------------------------------------------------
# Module fixtures: timing, the training rows, the server.


@pytest.fixture(scope="module", autouse=True)
def _module_timer() -> Iterator[None]:
    start = time.monotonic()
    yield
    # Includes the session's build + fine-tune when this module is the first to need it.
    print(f"\n[timing] tests/test_inference.py module: {time.monotonic() - start:.1f} s")


@pytest.fixture(scope="module")
def train_rows() -> list[dict]:
    """The sample rows, round-robin over the tones so that any prefix covers every tone."""
    by_tone: dict[str, list[dict]] = {}
    for row in sample_rows():
        by_tone.setdefault(row["tone"], []).append(row)
    assert len(by_tone) == 6, sorted(by_tone)
    ordered: list[dict] = []
    while any(by_tone.values()):
        for tone in sorted(by_tone):
            if by_tone[tone]:
                ordered.append(by_tone[tone].pop(0))
    return ordered


@pytest.fixture(scope="module")
def bare_workspace(tuned_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tuned workspace with the base model but without models/ (no adapter)."""
    ws = tmp_path_factory.mktemp("bare") / "ws"
    shutil.copytree(tuned_workspace, ws)
    shutil.rmtree(ws / "models")
    return ws


@pytest.fixture(scope="module")
def server(tuned_workspace: Path, tmp_path_factory: pytest.TempPathFactory, request) -> Iterator[Server]:
    """inference/gradio_chat.py with an API key, once for the module; its log is dumped (and kept
    in test-artifacts/) when a test of the module failed."""
    log = tmp_path_factory.mktemp("server") / "gradio_chat.log"
    srv = start_server(tuned_workspace, log, env={"FINETUNE_API_KEY": KEY}, key=KEY)
    failed_before = request.session.testsfailed
    try:
        yield srv
    finally:
        srv.stop()
        if request.session.testsfailed > failed_before:
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copy(log, ARTIFACTS / "gradio_chat_server.log")
            capman = request.config.pluginmanager.getplugin("capturemanager")
            with capman.global_and_fixture_disabled():
                print(f"\n---- gradio_chat.py log (also in test-artifacts/) ----\n{srv.log_tail()}")


@pytest.fixture(scope="module")
def reference(server: Server, train_rows: list[dict]) -> dict[str, dict]:
    """Plain one-at-a-time answers (greedy) for the first 24 training rows: phrase -> response."""
    answers = {}
    for row in train_rows[:24]:
        r = server.post({"messages": [{"role": "user", "content": row["phrase"]}], "temperature": 0})
        assert r.status_code == 200, r.text
        answers[row["phrase"]] = r.json()
    return answers


@pytest.fixture(scope="module")
def good_rows(reference: dict[str, dict], train_rows: list[dict]) -> list[dict]:
    """Rows the server answered with a tone word one at a time, each with that answer as
    "expected": what every other front-end must give for the same phrase."""
    good = [
        {**row, "expected": reference[row["phrase"]]["choices"][0]["message"]["content"]}
        for row in train_rows[:24]
        if reference[row["phrase"]]["choices"][0]["message"]["content"].strip() in TONES
    ]
    assert len(good) >= 0.9 * 24, f"only {len(good)} of 24 answers are a tone word"
    return good


@pytest.fixture(scope="module")
def client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=300, max_retries=0)


# --------------------------------------------------------------------------------------------
# Console chat.


def test_console_help(render_factory) -> None:
    ws = render_factory(model="tiny-random", platform="cpu", mode="local")
    result = run_py(ws, "inference/console_chat.py", "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--prompt", "--baseonly", "--system", "--max-new-tokens", "--temperature"):
        assert option in result.stdout


@pytest.fixture(scope="module")
def console_answers(tuned_workspace: Path, train_rows: list[dict]) -> dict[str, str]:
    """One-shot console answers for 12 training phrases (2 per tone), 3 processes at a time."""

    def ask(phrase: str) -> tuple[str, str]:
        result = run_py(tuned_workspace, "inference/console_chat.py", "--prompt", phrase)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        return phrase, result.stdout.strip()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        return dict(pool.map(ask, [row["phrase"] for row in train_rows[:12]]))


@pytest.mark.slow
def test_console_prompt_answers_in_the_trained_form(console_answers: dict[str, str], reference) -> None:
    answers = list(console_answers.values())
    assert tone_words(answers) >= 0.9, answers
    # The console and the server run the same engine: greedy gives the same answer.
    for phrase, answer in console_answers.items():
        assert answer == reference[phrase]["choices"][0]["message"]["content"].strip(), phrase


@pytest.mark.slow
def test_console_interactive(tuned_workspace: Path, console_answers: dict[str, str], train_rows) -> None:
    row = next(r for r in train_rows[:12] if console_answers[r["phrase"]] in TONES)
    result = run_py(tuned_workspace, "inference/console_chat.py", input=f"{row['phrase']}\n#end\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Chatting with tiny-random-finetuned" in result.stdout
    answer = re.search(r"Model: (.*)", result.stdout)
    assert answer and answer.group(1).strip() == console_answers[row["phrase"]], result.stdout
    assert result.stdout.rstrip().endswith("Bye.")


@pytest.mark.slow
@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_console_undecodable_input_is_one_line(tuned_workspace: Path, locale: str) -> None:
    """Bytes that are not text (a Latin-1 é, a stray 0xFF) get one line, and the chat goes on."""
    env = {**os.environ, "LC_ALL": locale, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [PYTHON, "inference/console_chat.py"],
        input=b"caf\xe9 \xff\n" + sample_rows()[0]["phrase"].encode() + b"\n#end\n",
        cwd=tuned_workspace,
        capture_output=True,
        env=env,
        timeout=300,
    )
    out, err = result.stdout.decode("utf-8", "replace"), result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert out.count("not valid text") == 1, out
    assert re.search(r"Model: \S", out) and out.rstrip().endswith("Bye."), out
    # A --prompt that is not text: one line, exit 1.
    bad = subprocess.run(
        [PYTHON, "inference/console_chat.py", "--prompt", b"caf\xe9"], cwd=tuned_workspace, capture_output=True, env=env
    )
    lines = bad.stderr.decode("utf-8", "replace").strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and "not valid text" in lines[0], lines


@pytest.mark.slow
def test_console_on_an_ascii_terminal(tuned_workspace: Path, train_rows) -> None:
    """The base tiny model's answer holds U+FFFD and other non-ASCII text: a terminal that cannot
    show them gets "?" instead of a traceback (one-shot and interactive)."""
    phrase = train_rows[0]["phrase"]
    args = ["inference/console_chat.py", "--baseonly", "--max-new-tokens", "48"]
    utf8 = run_py(tuned_workspace, *args, "--prompt", phrase)
    assert utf8.returncode == 0 and not utf8.stdout.isascii(), utf8.stdout  # what the test needs
    ascii_env = {"PYTHONIOENCODING": "ascii"}
    one = run_py(tuned_workspace, *args, "--prompt", phrase, env=ascii_env)
    assert one.returncode == 0 and "Traceback" not in one.stderr, one.stderr[-3000:]
    assert one.stdout.isascii() and "?" in one.stdout, one.stdout
    chat = run_py(tuned_workspace, *args, input=f"{phrase}\n#end\n", env=ascii_env)
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr[-3000:]
    assert chat.stdout.rstrip().endswith("Bye."), chat.stdout


@pytest.mark.slow
def test_console_drops_old_turns_to_fit_the_context(tuned_workspace: Path, train_rows) -> None:
    """tiny-random's context is 256 tokens: a dozen long turns outgrow it. The oldest exchanges go
    (said in one line) and every turn is answered, where each turn past the limit used to fail."""
    turn = " ".join(row["phrase"] for row in train_rows[:2])
    result = run_py(tuned_workspace, "inference/console_chat.py", input=f"{turn}\n" * 12 + "#end\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error:" not in result.stdout, result.stdout
    assert result.stdout.count("Model: ") == 12, result.stdout
    assert "(older turns dropped to fit the context)" in result.stdout, result.stdout
    assert result.stdout.rstrip().endswith("Bye."), result.stdout


@pytest.mark.slow
def test_console_eof_exits_cleanly(tuned_workspace: Path) -> None:
    result = run_py(tuned_workspace, "inference/console_chat.py", input="")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Bye." in result.stdout


@pytest.mark.slow
def test_console_baseonly_without_adapter(bare_workspace: Path, train_rows) -> None:
    phrase = train_rows[0]["phrase"]
    result = run_py(bare_workspace, "inference/console_chat.py", "--baseonly", "--prompt", phrase)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["console_chat.py", "gradio_chat.py"])
def test_missing_adapter_is_one_line(bare_workspace: Path, script: str) -> None:
    args = ["--prompt", "hello"] if script == "console_chat.py" else ["--port", str(free_port())]
    result = run_py(bare_workspace, f"inference/{script}", *args, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert ADAPTER_HINT in lines[0] and "--baseonly" in lines[0]


# --------------------------------------------------------------------------------------------
# The OpenAI-compatible API, with the official client.


@pytest.mark.slow
def test_openai_non_stream(client, train_rows, reference) -> None:
    answers = []
    for row in train_rows[:12]:
        out = client.chat.completions.create(
            model="tiny-random-finetuned",
            messages=[{"role": "user", "content": row["phrase"]}],
            temperature=0,
        )
        assert out.object == "chat.completion"
        assert out.model == "tiny-random-finetuned"
        assert out.id.startswith("chatcmpl-")
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].finish_reason in ("stop", "length")
        usage = out.usage
        assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert out.choices[0].message.content == reference[row["phrase"]]["choices"][0]["message"]["content"]
        answers.append(out.choices[0].message.content)
    assert tone_words(answers) >= 0.9, answers


@pytest.mark.slow
def test_openai_stream(client, train_rows, reference) -> None:
    answers = []
    for row in train_rows[:12]:
        chunks = list(
            client.chat.completions.create(
                model="tiny-random-finetuned",
                messages=[{"role": "user", "content": row["phrase"]}],
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert len({c.id for c in chunks}) == 1
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage is not None
        plain = reference[row["phrase"]]
        assert usage.prompt_tokens == plain["usage"]["prompt_tokens"]
        assert usage.completion_tokens == plain["usage"]["completion_tokens"]
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        # Greedy: streaming gives exactly the non-streamed answer.
        assert text == plain["choices"][0]["message"]["content"]
        answers.append(text)
    assert tone_words(answers) >= 0.9, answers


@pytest.mark.slow
def test_openai_stream_without_usage(client, good_rows) -> None:
    row = good_rows[0]
    chunks = list(
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": row["phrase"]}], temperature=0, stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == row["expected"]


@pytest.mark.slow
def test_openai_system_and_history(client, good_rows, tuned_workspace: Path) -> None:
    """The model is given the whole conversation, system message and earlier turns included: the
    prompt's token count is exactly that of the conversation in the training format, and differs
    from the count without the system message or without the history."""
    from transformers import AutoTokenizer
    from tuner.serving.engine import formatted
    from tuner.settings import load_settings

    settings = load_settings(tuned_workspace / "settings.toml")
    tokenizer = AutoTokenizer.from_pretrained(tuned_workspace / settings["model"]["path"])

    def prompt_tokens(messages: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(formatted(messages, settings), tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    earlier, row = good_rows[1], good_rows[0]
    system = {"role": "system", "content": "Answer with the tone of the phrase, in one word."}
    history = [{"role": "user", "content": earlier["phrase"]}, {"role": "assistant", "content": earlier["expected"]}]
    last = {"role": "user", "content": row["phrase"]}
    out = client.chat.completions.create(model="m", messages=[system, *history, last], temperature=0, max_tokens=16)
    assert out.choices[0].finish_reason in ("stop", "length")
    full = prompt_tokens([system, *history, last])
    assert full not in (prompt_tokens([*history, last]), prompt_tokens([system, last]))
    assert out.usage.prompt_tokens == full
    # Content parts (the newer message format) are accepted too.
    parts = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": [{"type": "text", "text": row["phrase"]}]}], temperature=0
    )
    assert parts.choices[0].message.content == row["expected"]


@pytest.mark.slow
def test_models_endpoint_and_keys(server: Server, client) -> None:
    import openai

    assert [m.id for m in client.models.list()] == ["tiny-random-finetuned"]
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    for auth in (None, "Bearer wrong-key", f"Bearer {KEY}x", "Bearer", f"Basic {KEY}x"):
        headers = {} if auth is None else {"Authorization": auth}
        r = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=60)
        assert r.status_code == 401, (auth, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (auth, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert server.post(body).status_code == 200
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])


def _user(**extra: Any) -> dict:
    return {"messages": [{"role": "user", "content": "hello"}], **extra}


BAD_REQUESTS = {
    "malformed-json": b'{"messages": [',
    "not-utf8": b"\xff\xfe\x00",
    "empty-body": b"",
    "body-not-object": [1, 2],
    "body-null": None,
    "no-messages": {"temperature": 0},
    "empty-messages": {"messages": []},
    "messages-not-list": {"messages": "hello"},
    "message-not-object": {"messages": ["hello"]},
    "unknown-role": {"messages": [{"role": "robot", "content": "hello"}]},
    "role-not-string": {"messages": [{"role": ["user"], "content": "hello"}]},
    "content-number": {"messages": [{"role": "user", "content": 42}]},
    "content-missing": {"messages": [{"role": "user"}]},
    "content-part-text-number": {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    "last-is-assistant": {"messages": [{"role": "assistant", "content": "hi"}]},
    "negative-max-tokens": _user(max_tokens=-1),
    "zero-max-tokens": _user(max_tokens=0),
    "oversized-max-tokens": _user(max_tokens=10**9),
    "float-max-tokens": _user(max_tokens=1.5),
    "string-max-tokens": _user(max_tokens="8"),
    "oversized-max-completion-tokens": _user(max_completion_tokens=10**9),
    "huge-integer-literal": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "temperature-string": _user(temperature="hot"),
    "temperature-negative": _user(temperature=-1),
    "temperature-nan": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "top-p-too-big": _user(top_p=2),
    "stream-string": _user(stream="yes"),
    "stream-options-string": _user(stream=True, stream_options="yes"),
    "stop-number": _user(stop=5),
    "stop-too-many": _user(stop=["a", "b", "c", "d", "e"]),
    "n-two": _user(n=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_a_4xx_error_object(server: Server, name: str) -> None:
    body = BAD_REQUESTS[name]
    r = server.post(None, raw=body) if isinstance(body, bytes) else server.post(body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.slow
def test_bad_request_names_the_field(server: Server) -> None:
    cases = {
        "messages": {"messages": []},
        "messages[0].role": {"messages": [{"role": "robot", "content": "x"}]},
        "messages[0].content": {"messages": [{"role": "user", "content": 1}]},
        "max_tokens": _user(max_tokens=10**9),
        "temperature": _user(temperature="hot"),
        "stream": _user(stream="yes"),
    }
    for param, body in cases.items():
        assert server.post(body).json()["error"]["param"] == param


@pytest.mark.slow
def test_sixteen_concurrent_clients(server: Server, good_rows, reference) -> None:
    """16 clients at once, each with its own phrase, half streaming: everyone gets their own answer."""
    from openai import OpenAI

    rows = (good_rows * 2)[:16]
    barrier = threading.Barrier(16)

    def ask(i: int) -> tuple[str, int]:
        row = rows[i]
        own = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=600, max_retries=0)
        messages = [{"role": "user", "content": row["phrase"]}]
        barrier.wait(60)
        if i % 2:
            chunks = list(
                own.chat.completions.create(
                    model="m", messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, chunks[-1].usage.prompt_tokens
        out = own.chat.completions.create(model="m", messages=messages, temperature=0)
        return out.choices[0].message.content, out.usage.prompt_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16)))
    for row, (text, prompt_tokens) in zip(rows, results, strict=True):
        assert text == row["expected"], (row, text)
        assert prompt_tokens == reference[row["phrase"]]["usage"]["prompt_tokens"]


# --------------------------------------------------------------------------------------------
# The Gradio page, in a real browser.


@pytest.mark.slow
@pytest.mark.browser
def test_browser_chat(server: Server, good_rows) -> None:
    start = time.monotonic()
    row = good_rows[0]
    with browser_page(server.url + "/") as (page, sync_api):
        # A wrong key is refused, the right one (any user name) lets in.
        page.get_by_label("username").fill("tester")
        page.get_by_label("password").fill("not-the-key")
        page.get_by_role("button", name="Login").click()
        sync_api.expect(page.get_by_text("Incorrect credentials", exact=False)).to_be_visible()
        page.get_by_label("username").fill("tester")  # the form is cleared after a failure
        page.get_by_label("password").fill(KEY)
        page.get_by_role("button", name="Login").click()
        # The held-out evaluation written beside the adapter is on the page.
        sync_api.expect(page.get_by_text("Held-out evaluation on 42 rows", exact=False)).to_be_visible()
        box = page.get_by_placeholder("Type a message...")
        box.fill(row["phrase"])
        box.press("Enter")
        sync_api.expect(page.get_by_test_id("user").last).to_have_text(row["phrase"])
        sync_api.expect(page.get_by_test_id("bot").last).to_have_text(row["expected"])
        page.screenshot(path=str(ARTIFACTS / "gradio_chat.png"), full_page=True)
    print(f"\n[timing] test_browser_chat: {time.monotonic() - start:.1f} s")


@pytest.mark.slow
def test_server_log_has_no_traceback(server: Server) -> None:
    """Every bad request is answered, not crashed on: after this module's bad requests (sent here
    too, so that the test holds alone and in any order) the log has the server's start line and
    no traceback."""
    for body in BAD_REQUESTS.values():
        r = server.post(None, raw=body) if isinstance(body, bytes) else server.post(body)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    server.assert_clean_log()
