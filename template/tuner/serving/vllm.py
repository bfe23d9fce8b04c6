"""vLLM's OpenAI-compatible server as a child process ([serve] backend = "vllm"): its command line
(the base model, with the fine-tuned adapter as a LoRA module), starting it, waiting until it is
ready, and stopping it with the workers it starts.

vLLM runs from an environment of its own ([serve] vllm_python; `bash setup/setup.sh --vllm` makes
.venv-vllm): it pins its own torch and transformers, older than this workspace's. It listens on
127.0.0.1 only, with a key made for each start, so only inference/gradio_chat.py reaches it: that
server stays the front door (our API key, our prompt format) and forwards through openai_engine.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.serving.engine import EngineError
from tuner.serving.upstream import OpenAIEngine
from tuner.settings import adapter_dir, in_workspace, trained_with
from tuner.training.precision import Device, vllm_dtype

# The values vLLM accepts for --max-lora-rank (its default, 16, is below our usual r of 64);
# tests/test_vllm_contract.py checks them against vLLM's own parser.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's command-line entry (the `vllm` console script's module), run by the environment's Python.
CLI_MODULE = "vllm.entrypoints.cli.main"
# Loading the weights, compiling and capturing CUDA graphs: minutes.
START_TIMEOUT_S = 900
STOP_TIMEOUT_S = 30  # after SIGTERM, before SIGKILL


def max_lora_rank(rank: int) -> int:
    """The adapter's rank rounded up to one vLLM accepts."""
    for allowed in LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise EngineError(
        f"the adapter's LoRA rank is {rank}, and vLLM serves ranks up to {LORA_RANKS[-1]}: "
        'fine-tune with a lower [train] lora_r, or set [serve] backend = "engine"'
    )


def adapter_rank(adapter: Path) -> int:
    """The largest rank in the adapter (adapter_config.json: r, and any per-module rank_pattern)."""
    config = json.loads((adapter / "adapter_config.json").read_text("utf-8"))
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def max_model_len(settings: dict[str, Any], root: Path) -> int:
    """The longest sequence vLLM serves: the model's context, capped by [serve] vllm_max_model_len
    (vLLM reserves KV cache for one sequence that long before it starts)."""
    cap = int(settings["serve"]["vllm_max_model_len"])
    config = json.loads((in_workspace(root, settings["model"]["path"]) / "config.json").read_text("utf-8"))
    return min(cap, int(config.get("max_position_embeddings", cap)))


def lora_name(settings: dict[str, Any]) -> str:
    """The adapter's model name in vLLM: the name the torch engine serves the fine-tuned model under."""
    return settings["model"]["id"] + "-finetuned"


def command(settings: dict[str, Any], root: Path, baseonly: bool = False, device: Device | None = None) -> list[str]:
    """vLLM's server command line (`vllm serve`) for `device` (None: this machine's); EngineError
    says what to do first (one line)."""
    serve = settings["serve"]
    if settings["model"]["platform"] == "cpu":
        raise EngineError(
            'vLLM runs on NVIDIA GPUs (CUDA) only, and this workspace\'s [model] platform is "cpu": '
            'set [serve] backend = "engine"'
        )
    python = in_workspace(root, serve["vllm_python"])
    if not python.is_file():
        raise EngineError(f"vLLM's environment is missing ({python} not found): run `bash setup/setup.sh --vllm` first")
    model = in_workspace(root, settings["model"]["path"])
    if not (model / "config.json").is_file():
        raise EngineError(f"base model not found in {model}: run `python setup/download_model.py` first")
    adapter = adapter_dir(root)
    if not baseonly and not (adapter / "adapter_config.json").is_file():
        raise EngineError(
            f"adapter not found in {adapter}: run `python finetuning/invoke_olive.py` first "
            "(or serve the base model: --baseonly)"
        )
    # `vllm serve MODEL`: python -m vllm.entrypoints.openai.api_server is deprecated in vLLM 0.33.
    cmd = [str(python), "-m", CLI_MODULE, "serve", str(model)]
    cmd += ["--served-model-name", settings["model"]["id"], "--host", "127.0.0.1", "--port", str(serve["vllm_port"])]
    cmd += ["--max-model-len", str(max_model_len(settings, root))]
    cmd += ["--gpu-memory-utilization", str(serve["gpu_memory_utilization"])]
    if not baseonly:
        rank = max_lora_rank(adapter_rank(adapter))
        cmd += ["--enable-lora", "--lora-modules", f"{lora_name(settings)}={adapter}", "--max-lora-rank", str(rank)]
    # As the adapter was trained (its run.json; else the settings), in the policy's dtype for this
    # GPU, like the torch engine. Never quantized: vLLM has no bitsandbytes method, so a QLoRA
    # adapter is served on the 16-bit base it was quantized from, not the 4-bit base it was
    # trained on: answers differ from the torch engine's (the demo's QLoRA adapter on the original
    # weights: 73.8 % held-out exact match on the CPU, against 81.0 % on the 4-bit ones).
    train = ((None if baseonly else trained_with(adapter)) or settings)["train"]
    cmd += ["--dtype", vllm_dtype(train, device or Device.detect())]
    return cmd


@dataclass
class Upstream:
    """A running vLLM server: its process, address and key."""

    process: subprocess.Popen[bytes]
    url: str
    key: str


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def start(settings: dict[str, Any], root: Path, baseonly: bool = False, timeout: float = START_TIMEOUT_S) -> Upstream:
    """Start vLLM and return once it is ready; its output goes to this process's. EngineError (after
    stopping it) when it exits or is not ready in time."""
    cmd = command(settings, root, baseonly)
    port = int(settings["serve"]["vllm_port"])
    # Checked first: the readiness check must not take another server on the port for ours.
    if port_taken(port):
        raise EngineError(f"port {port} on 127.0.0.1 is taken (another vLLM?): stop it, or set [serve] vllm_port")
    key = secrets.token_urlsafe(32)  # in the environment (VLLM_API_KEY), never on the command line
    # A session of its own, so that stop() signals vLLM and the engine processes it starts together.
    process = subprocess.Popen(cmd, env={**os.environ, "VLLM_API_KEY": key}, start_new_session=True)
    upstream = Upstream(process, f"http://127.0.0.1:{port}", key)
    try:
        wait_ready(upstream, timeout)
    except BaseException:  # also Ctrl-C or SIGTERM while it loads: no vLLM is left behind
        stop(upstream)
        raise
    return upstream


def wait_ready(upstream: Upstream, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while (code := upstream.process.poll()) is None:
        try:
            # trust_env=False: no HTTP(S)_PROXY from the environment between us and 127.0.0.1.
            if httpx.get(f"{upstream.url}/health", timeout=5, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise EngineError(f"vLLM was not ready on {upstream.url} after {timeout:.0f} s (its output is above)")
        time.sleep(1)
    raise EngineError(f"vLLM exited with code {code} while starting (its output is above)")


def stop(upstream: Upstream) -> None:
    """SIGTERM to vLLM and its workers (its process group); SIGKILL to whatever is left of the group
    once vLLM has exited, or STOP_TIMEOUT_S have passed."""
    pid = upstream.process.pid
    with contextlib.suppress(ProcessLookupError):  # already gone, workers too
        os.killpg(pid, signal.SIGTERM)
    try:
        upstream.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # nothing left: the usual case
        os.killpg(pid, signal.SIGKILL)
    upstream.process.wait()


def engine(settings: dict[str, Any], root: Path, upstream: Upstream, baseonly: bool = False) -> OpenAIEngine:
    """The chat engine that forwards to `upstream`: the adapter (or the base model)."""
    model = settings["model"]["id"] if baseonly else lora_name(settings)
    return OpenAIEngine(settings, f"{upstream.url}/v1", model, max_model_len(settings, root), upstream.key)
