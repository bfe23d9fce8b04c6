"""[serve] backend = "vllm", on CPU: vLLM's command line (tuner/serving/vllm.py), and inference/gradio_chat.py
in front of a fake vLLM (tests/fake_vllm.py, started as the child process it would start): the
training prompt format, the model name and options it forwards, the streamed answer with usage and
finish reason, our API key in front, cancellation upstream, and no process left after SIGTERM.
A real vLLM needs an NVIDIA GPU; none of this runs one."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import PYTHON, REPO, Server, free_port, run_py, start_server
from tuner.serving import vllm
from tuner.serving.engine import EngineError
from tuner.settings import load_settings
from tuner.training.precision import Device

KEY = "front-door-key"
GPU = Device(cuda=True, capability=(9, 0))  # an H100, without asking this machine
FAKE = REPO / "tests" / "fake_vllm.py"
SYSTEM = "Name the tone of the phrase in one word."
TEMPLATE = "Phrase: {phrase}\nTone:"


def workspace(
    render_factory, tmp_path: Path, platform: str = "cuda", rank: int = 16, method: str = "lora", **answers: str
) -> Path:
    """A tiny-random workspace with a base model's config and an adapter of `rank`, trained with
    `method` (its run.json): all vLLM's command line looks at."""
    ws = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform=platform, mode="local", **answers), ws)
    settings = load_settings(ws / "settings.toml")
    model = ws / settings["model"]["path"]
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 256}), "utf-8")
    adapter = ws / "models" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}), "utf-8")
    trained = {**settings, "train": {**settings["train"], "method": method, "lora_r": rank}}
    (adapter / "run.json").write_text(json.dumps({"settings": trained}), "utf-8")
    return ws


def fake_vllm_python(ws: Path) -> Path:
    """A `python` for .venv-vllm that runs the fake server with the arguments vLLM would get."""
    path = ws / ".venv-vllm" / "bin" / "python"
    path.parent.mkdir(parents=True)
    path.write_text(f'#!/usr/bin/env bash\nexec "{PYTHON}" "{FAKE}" "$@"\n', "utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# ---------------------------------------------------------------- the command line


def test_command_line_for_a_lora_adapter(render_factory, tmp_path: Path) -> None:
    ws = workspace(render_factory, tmp_path, rank=64)
    python = fake_vllm_python(ws)
    settings = load_settings(ws / "settings.toml")
    cmd = vllm.command(settings, ws, device=GPU)
    assert cmd[:5] == [str(python), "-m", "vllm.entrypoints.cli.main", "serve", str(ws / "model-cache" / "tiny-random")]
    assert option(cmd, "--served-model-name") == "tiny-random"
    assert option(cmd, "--host") == "127.0.0.1" and option(cmd, "--port") == "8000"
    assert "--enable-lora" in cmd
    assert option(cmd, "--lora-modules") == f"tiny-random-finetuned={ws / 'models' / 'adapter'}"
    assert option(cmd, "--max-lora-rank") == "64"
    assert option(cmd, "--max-model-len") == "256"  # the model's context, under [serve] vllm_max_model_len
    assert option(cmd, "--gpu-memory-utilization") == "0.9"
    assert option(cmd, "--dtype") == settings["train"]["compute_dtype"]
    assert "--quantization" not in cmd
    # The base model alone: no LoRA at all.
    base = vllm.command(settings, ws, baseonly=True, device=GPU)
    assert "--enable-lora" not in base and "--lora-modules" not in base and "--max-lora-rank" not in base


def test_command_line_for_a_qlora_adapter(render_factory, tmp_path: Path) -> None:
    ws = workspace(render_factory, tmp_path, rank=48, method="qlora")
    fake_vllm_python(ws)
    cmd = vllm.command(load_settings(ws / "settings.toml"), ws, device=GPU)
    # vLLM has no bitsandbytes method: the base in 16-bit, not in 4-bit as it was trained.
    assert "--quantization" not in cmd and "-q" not in cmd
    assert option(cmd, "--dtype") == "bfloat16"
    assert option(cmd, "--max-lora-rank") == "64"


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        (Device(cuda=False), "float32"),
        (Device(cuda=True, capability=(7, 5)), "float16"),  # T4: bfloat16 only emulated
        (Device(cuda=True, capability=(8, 0)), "bfloat16"),  # A100
        (Device(cuda=True, capability=(9, 0)), "bfloat16"),  # H100
    ],
)
def test_dtype_follows_the_precision_policy(render_factory, tmp_path: Path, device: Device, dtype: str) -> None:
    ws = workspace(render_factory, tmp_path, method="qlora", compute_dtype="bfloat16")
    fake_vllm_python(ws)
    settings = load_settings(ws / "settings.toml")
    assert option(vllm.command(settings, ws, device=device), "--dtype") == dtype
    assert option(vllm.command(settings, ws, baseonly=True, device=device), "--dtype") == dtype


@pytest.mark.parametrize(("rank", "allowed"), [(1, 1), (8, 8), (12, 16), (48, 64), (64, 64), (300, 320), (512, 512)])
def test_rank_rounds_up_to_one_vllm_accepts(rank: int, allowed: int) -> None:
    assert vllm.max_lora_rank(rank) == allowed


def test_rank_over_vllm_maximum_is_one_line(render_factory, tmp_path: Path) -> None:
    ws = workspace(render_factory, tmp_path, rank=600)
    fake_vllm_python(ws)
    with pytest.raises(EngineError, match="LoRA rank is 600, and vLLM serves ranks up to 512"):
        vllm.command(load_settings(ws / "settings.toml"), ws)


# ---------------------------------------------------------------- one-line errors


def serve_fails(ws: Path, *args: str) -> str:
    result = run_py(ws, "inference/gradio_chat.py", "--set", "serve.backend=vllm", *args, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_vllm_environment_is_one_line(render_factory, tmp_path: Path) -> None:
    line = serve_fails(workspace(render_factory, tmp_path))
    assert "vLLM's environment is missing" in line and "bash setup/setup.sh --vllm" in line, line


def test_vllm_on_a_cpu_platform_is_one_line(render_factory, tmp_path: Path) -> None:
    ws = workspace(render_factory, tmp_path, platform="cpu")
    fake_vllm_python(ws)
    line = serve_fails(ws)
    assert "NVIDIA GPUs (CUDA) only" in line and 'backend = "engine"' in line, line
    assert not (ws / "setup" / "requirements-vllm.txt").exists()


def test_missing_adapter_is_one_line(render_factory, tmp_path: Path) -> None:
    ws = workspace(render_factory, tmp_path)
    fake_vllm_python(ws)
    shutil.rmtree(ws / "models")
    assert "adapter not found" in serve_fails(ws)


def test_unknown_serve_backend_is_one_line(render_factory, tmp_path: Path) -> None:
    ws = workspace(render_factory, tmp_path)
    result = run_py(ws, "inference/gradio_chat.py", "--set", "serve.backend=tgi", timeout=120)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
    assert 'serve.backend = "tgi" is not valid: it must be one of "engine", "vllm"' in result.stderr


def test_vllm_that_dies_while_starting_is_one_line(render_factory, tmp_path: Path) -> None:
    ws = workspace(render_factory, tmp_path)
    path = ws / ".venv-vllm" / "bin" / "python"
    path.parent.mkdir(parents=True)
    path.write_text("#!/usr/bin/env bash\nexit 3\n", "utf-8")
    path.chmod(0o755)
    assert "vLLM exited with code 3 while starting" in serve_fails(ws, "--set", f"serve.vllm_port={free_port()}")


# ---------------------------------------------------------------- gradio_chat.py in front of a fake vLLM


class Front:
    """gradio_chat.py with backend vllm, and what its fake vLLM has seen."""

    def __init__(self, srv: Server, events: Path, ws: Path, vllm_port: int) -> None:
        self.srv, self.events, self.ws, self.vllm_port = srv, events, ws, vllm_port

    def seen(self, kind: str) -> list[dict[str, Any]]:
        lines = self.events.read_text("utf-8").splitlines() if self.events.exists() else []
        return [e for e in map(json.loads, lines) if e["event"] == kind]

    def wait_for(self, kind: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(found := self.seen(kind)) < count:
            assert time.monotonic() < deadline, f"the fake vLLM saw no {kind!r}: {self.events.read_text('utf-8')}"
            time.sleep(0.1)
        return found


@pytest.fixture(scope="module")
def front(render_factory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    # A system message and a text template to see on the way to vLLM.
    ws = workspace(render_factory, tmp_path_factory.mktemp("vllm"), system_prompt=SYSTEM, text_template=TEMPLATE)
    fake_vllm_python(ws)
    events = ws / "fake_vllm.jsonl"
    port = free_port()
    srv = start_server(
        ws,
        ws / "gradio_chat.log",
        "--set",
        "serve.backend=vllm",
        "--set",
        f"serve.vllm_port={port}",
        env={"FINETUNE_API_KEY": KEY, "FAKE_VLLM_LOG": str(events)},
        key=KEY,
    )
    try:
        yield Front(srv, events, ws, port)
    finally:
        srv.stop()


def test_vllm_started_with_the_adapter_on_localhost(front: Front) -> None:
    start = front.wait_for("start")
    assert len(start) == 1
    argv = start[0]["argv"]
    assert argv[:3] == ["-m", "vllm.entrypoints.cli.main", "serve"]
    assert option(argv, "--host") == "127.0.0.1" and option(argv, "--port") == str(front.vllm_port)
    assert option(argv, "--lora-modules") == f"tiny-random-finetuned={front.ws / 'models' / 'adapter'}"
    assert option(argv, "--max-lora-rank") == "16"
    assert len(start[0]["key"]) >= 32 and start[0]["key"] not in argv  # a fresh key, not on the command line
    models = httpx.get(f"{front.srv.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in models["data"]] == ["tiny-random-finetuned"]


def test_streamed_answer_through_the_front_door(front: Front) -> None:
    """The openai client against our server: pieces, finish reason and usage come back from vLLM;
    vLLM got our prompt format, the LoRA module as the model, the options and its own key."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{front.srv.url}/v1", api_key=KEY, timeout=60, max_retries=0)
    before = len(front.seen("request"))
    chunks = list(
        client.chat.completions.create(
            model="tiny-random-finetuned",
            messages=[{"role": "user", "content": "The puppy fell asleep on my lap."}],
            stream=True,
            stream_options={"include_usage": True},
            temperature=0.7,
            top_p=0.9,
            max_tokens=20,
            stop=["END"],
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 3, 14)

    request = front.seen("request")[before]
    body = request["body"]
    assert body["model"] == "tiny-random-finetuned"
    assert body["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Phrase: The puppy fell asleep on my lap.\nTone:"},
    ]
    assert (body["temperature"], body["top_p"], body["max_completion_tokens"], body["stop"]) == (0.7, 0.9, 20, ["END"])
    assert "max_tokens" not in body  # deprecated in vLLM 0.33
    assert body["top_k"] == 50  # the torch engine's default, not the model's generation_config
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert request["authorization"] == f"Bearer {front.seen('start')[0]['key']}"


def test_plain_answer_with_length_finish(front: Front) -> None:
    r = front.srv.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["message"]["content"] == "Hello,"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    sent = front.seen("request")[-1]["body"]
    assert (sent["temperature"], sent["max_completion_tokens"]) == (0.0, 2)  # greedy, as asked
    assert sent["top_k"] == 0  # vLLM's "no top-k", sent: else the model's generation_config top_k


def test_our_api_key_is_still_required(front: Front) -> None:
    before = len(front.seen("request"))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    vllm_key = front.seen("start")[0]["key"]  # vLLM's own key is no key for us
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {vllm_key}"}):
        r = httpx.post(f"{front.srv.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
    assert len(front.seen("request")) == before  # nothing reached vLLM


def test_prompt_over_the_context_is_a_400(front: Front) -> None:
    for stream in (False, True):
        r = front.srv.post({"messages": [{"role": "user", "content": "TOO_LONG"}], "stream": stream}, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and "maximum context length" in error["message"]


def test_client_going_away_closes_the_upstream_stream(front: Front) -> None:
    data = json.dumps({"messages": [{"role": "user", "content": "LONG"}], "stream": True, "max_tokens": 200}).encode()
    sock = socket.create_connection(("127.0.0.1", front.srv.port), timeout=30)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    seen = b""
    while seen.count(b"data: ") < 4:
        part = sock.recv(65536)
        assert part, seen
        seen += part
    assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
    sock.close()
    # 200 pieces take 10 s; the fake vLLM sees its client go within a few.
    front.wait_for("closed_early", timeout=8)
    # And the server takes the next request at once.
    r = front.srv.post({"messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello, world"


def test_sigterm_stops_vllm_and_its_workers(front: Front) -> None:
    start = front.wait_for("start")[0]
    front.srv.proc.send_signal(signal.SIGTERM)
    front.srv.proc.wait(60)
    assert front.seen("sigterm"), "the fake vLLM was not sent SIGTERM"
    for pid in (start["pid"], start["worker"]):
        # Gone: not running, and no zombie either (its parent waited, or init reaped it).
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} is still there"
    left = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and str(front.ws) in cmdline(p)]
    assert left == [], f"processes of the workspace still running: {left}"


def cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
