"""A stand-in for vLLM's OpenAI-compatible server, for tests on CPU: tests/test_vllm.py makes a fake
`vllm_python` that runs this file with the arguments gradio_chat.py gives vLLM.

It serves /health and a streamed /v1/chat/completions (a canned answer, then the usage), checks the
key it was started with (VLLM_API_KEY), and writes what happens as JSON lines to $FAKE_VLLM_LOG: its
start (argv, pid, the pid of a worker it starts in its process group, as vLLM does), every request,
a client that went away mid-answer, and SIGTERM. A user message with LONG gets a slow answer of 400
pieces; one with TOO_LONG gets vLLM's 400 for a prompt over the context.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANSWER = ["Hello", ",", " world"]
PROMPT_TOKENS = 11


def log(**event: Any) -> None:
    with open(os.environ["FAKE_VLLM_LOG"], "a", encoding="utf-8") as out:
        out.write(json.dumps(event) + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes: plain streaming

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.reply(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        log(event="request", path=self.path, body=body, authorization=self.headers.get("Authorization"))
        if self.headers.get("Authorization") != f"Bearer {os.environ['VLLM_API_KEY']}":
            return self.reply(401, {"error": {"message": "Unauthorized"}})
        text = " ".join(m["content"] for m in body["messages"])
        if "TOO_LONG" in text:
            message = "This model's maximum context length is 256 tokens. However, you requested 900 tokens."
            return self.reply(400, {"error": {"message": message, "type": "BadRequestError", "code": 400}})
        pieces, pause = (["word "] * 400, 0.05) if "LONG" in text else (ANSWER, 0.0)
        # As vLLM: max_completion_tokens, else the deprecated max_tokens (extra fields are ignored).
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 256  # else to the context (256)
        pieces = pieces[:limit]
        finish = "stop" if len(pieces) < limit else "length"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}

        def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            self.wfile.write(f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n".encode())
            self.wfile.flush()

        try:
            send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            for piece in pieces:
                send([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
                time.sleep(pause)
            send([{"index": 0, "delta": {}, "finish_reason": finish}])
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(pieces)}
            send([], usage={**usage, "total_tokens": PROMPT_TOKENS + len(pieces)})
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            log(event="closed_early", model=body["model"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", dest="module")
    parser.add_argument("--port", type=int)
    args, _ = parser.parse_known_args()
    worker = subprocess.Popen(["sleep", "600"])  # like vLLM's engine process, in its process group

    def on_sigterm(*_: Any) -> None:
        log(event="sigterm")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    log(event="start", argv=sys.argv[1:], pid=os.getpid(), worker=worker.pid, key=os.environ["VLLM_API_KEY"])
    time.sleep(float(os.environ.get("FAKE_VLLM_LOAD_S", "1")))  # loading the model: /health waits
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
