"""Web chat page and OpenAI-compatible API in one process.

    python inference/gradio_chat.py                 # http://127.0.0.1:7860
    python inference/gradio_chat.py --host 0.0.0.0  # listen on all interfaces (containers)

The page (Gradio ChatInterface, multi-turn, streaming) is at /, the API at
POST /v1/chat/completions and GET /v1/models (tuner/serving/api.py). When the environment variable named
in settings.toml ([serve] api_key_env) is set, API calls need `Authorization: Bearer <key>`
and the page asks for a login (any user name, the key as password).

With [serve] backend = "vllm" (CUDA), this server first starts vLLM's from its own environment, on
127.0.0.1 (tuner/serving/vllm.py), and forwards every answer to it; it stops vLLM when it stops itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tuner.serving import load_engine, vllm
from tuner.serving.api import create_app, evaluation_summary
from tuner.serving.engine import ChatEngine
from tuner.settings import adapter_dir, check_value, run_script, script_parser, settings_for_script

ROOT = Path(__file__).resolve().parents[1]


def port_number(text: str) -> int:
    """--port: as [serve] port, and 0 for a free one."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not between 0 and 65535")
    return port


def main() -> None:
    parser = script_parser(__doc__, ROOT, "serve.backend=vllm")
    parser.add_argument("--baseonly", action="store_true", help="serve the base model, no adapter")
    parser.add_argument("--host", help="default: [serve] host; use 0.0.0.0 only inside a container")
    parser.add_argument("--port", type=port_number, help="default: [serve] port; 0: a free port (printed)")
    parser.add_argument("--backend", choices=["torch", "onnx", "gguf"], help="default: [chat] backend")
    args = parser.parse_args()
    settings = settings_for_script(args.settings, args.overrides)
    serve = settings["serve"]
    host = serve["host"] if args.host is None else check_value(settings, "serve", "host", args.host, "--host")
    port = serve["port"] if args.port is None else args.port

    upstream = None
    if serve["backend"] == "vllm":
        # SIGTERM (a container stopping) ends this process through `finally`, which stops vLLM.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        engine: ChatEngine
        if serve["backend"] == "vllm":
            upstream = vllm.start(settings, ROOT, args.baseonly)
            engine = vllm.engine(settings, ROOT, upstream, args.baseonly)
        else:
            engine = load_engine(settings, ROOT, args.backend, args.baseonly)
        serve_app(engine, settings, host, port, args.baseonly)
    finally:
        if upstream is not None:
            vllm.stop(upstream)


def serve_app(engine: ChatEngine, settings: dict[str, Any], host: str, port: int, baseonly: bool) -> None:
    import uvicorn

    api_key = os.environ.get(settings["serve"]["api_key_env"]) or None
    app = create_app(engine, api_key, None if baseonly else evaluation_summary(adapter_dir(ROOT)))

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Ctrl-C or SIGTERM: cancel the answers being generated, so their streams end at once
            # (with an error event) and the server stops within seconds, not after every answer.
            engine.close()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    # Bound here rather than inside uvicorn, to print the port it got: port 0 is a free one.
    sock = config.bind_socket()
    print(f"Serving {engine.model_name} on http://{host}:{sock.getsockname()[1]} (API at /v1)", flush=True)
    Server(config).run(sockets=[sock])


if __name__ == "__main__":
    run_script(main)
