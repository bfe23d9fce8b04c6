"""Web chat page and OpenAI-compatible API in one process.

    python inference/gradio_chat.py                 # http://127.0.0.1:7860
    python inference/gradio_chat.py --host 0.0.0.0  # listen on all interfaces (containers)

The page (Gradio ChatInterface, multi-turn, streaming) is at /, the API at
POST /v1/chat/completions and GET /v1/models. When the environment variable named in
settings.toml ([inference] api_key_env) is set, API calls need `Authorization: Bearer <key>`
and the page asks for a login (any user name, the key as password).
"""

import argparse
import hmac
import json
import os
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = tomllib.loads((ROOT / "settings.toml").read_text("utf-8"))
ROLES = {"system", "user", "assistant"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _number(body: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number between {low} and {high}", name)
    return float(value)


def parse_request(body: Any, context: int) -> dict[str, Any]:
    """Validate a chat completion request; every problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {sorted(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            content = "".join(texts) if all(isinstance(t, str) for t in texts) else None
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        clean.append({"role": m["role"], "content": content})
    if clean[-1]["role"] == "assistant":
        raise ApiError(400, "the last message must be from the user or the system", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = SETTINGS["inference"]["max_new_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= context:
        raise ApiError(400, f"'max_tokens' must be an integer between 1 and {context}", "max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    return {
        "messages": clean,
        "stream": stream,
        "include_usage": bool(stream_options.get("include_usage")),
        "options": {
            "max_new_tokens": max_tokens,
            "temperature": _number(body, "temperature", 0, 2, SETTINGS["inference"]["temperature"]),
            "top_p": _number(body, "top_p", 0, 1, SETTINGS["inference"]["top_p"]),
            "stop": stop,
        },
    }


def create_app(engine: Any, api_key: str | None) -> Any:
    import gradio as gr
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    sys.path.insert(0, str(ROOT / "inference"))
    from engine import conversation, formatted

    app = FastAPI(title=f"{engine.model_name} chat")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        kind = "authentication_error" if err.status == 401 else "invalid_request_error"
        body = {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
        return JSONResponse(body, status_code=err.status)

    def check_key(request: Request) -> None:
        if not api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key")

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        check_key(request)
        card = {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "local"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):  # bad JSON or UTF-8, huge integers, deep nesting
            raise ApiError(400, "the request body is not valid JSON") from None
        req = parse_request(body, engine.context)
        # The same prompt format as training and the other front-ends.
        req["messages"] = formatted(req["messages"])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": created, "model": engine.model_name}
        stats: dict[str, Any] = {}

        def usage() -> dict[str, int]:
            p, c = stats.get("prompt_tokens", 0), stats.get("completion_tokens", 0)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not req["stream"]:
            # A plain (sync) call in FastAPI's thread pool: the engine lock queues requests.
            from starlette.concurrency import run_in_threadpool

            text = await run_in_threadpool(
                lambda: "".join(engine.stream(req["messages"], stats=stats, **req["options"]))
            )
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": stats.get("finish_reason", "stop"),
            }
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage()}

        def events() -> Iterator[str]:
            def chunk(delta: dict[str, str], finish: str | None = None) -> str:
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"

            yield chunk({"role": "assistant", "content": ""})
            for piece in engine.stream(req["messages"], stats=stats, **req["options"]):
                yield chunk({"content": piece})
            yield chunk({}, stats.get("finish_reason", "stop"))
            if req["include_usage"]:
                last = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage()}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def respond(
        message: str, history: list[dict[str, Any]], max_new_tokens: int, temperature: float, top_p: float, top_k: int
    ) -> Iterator[str]:
        turns = [{"role": h["role"], "content": str(h["content"])} for h in history if h["role"] in ROLES]
        options = {"max_new_tokens": int(max_new_tokens), "temperature": temperature, "top_p": top_p}
        answer = ""
        for piece in engine.stream(conversation(turns, message), top_k=int(top_k), **options):
            answer += piece
            yield answer

    defaults = SETTINGS["inference"]
    page = gr.ChatInterface(
        respond,
        title=f"Chat with {engine.model_name}",
        additional_inputs=[
            gr.Slider(1, min(2048, engine.context), value=defaults["max_new_tokens"], step=1, label="Max new tokens"),
            gr.Slider(0.0, 2.0, value=defaults["temperature"], step=0.05, label="Temperature (0 = greedy)"),
            gr.Slider(0.05, 1.0, value=defaults["top_p"], step=0.05, label="Top-p"),
            gr.Slider(1, 200, value=defaults["top_k"], step=1, label="Top-k"),
        ],
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
    )
    auth = (lambda _user, password: hmac.compare_digest(password.encode(), api_key.encode())) if api_key else None
    return gr.mount_gradio_app(app, page, path="/", auth=auth, auth_message="Password: the API key")


def main() -> None:
    defaults = SETTINGS["inference"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseonly", action="store_true", help="serve the base model, no adapter")
    parser.add_argument("--host", default=defaults["host"], help="use 0.0.0.0 only inside a container")
    parser.add_argument("--port", type=int, default=defaults["port"])
    parser.add_argument("--backend", choices=["torch", "onnx"], default=defaults["backend"])
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "inference"))
    from engine import EngineError, load_engine

    try:
        engine = load_engine(args.backend, args.baseonly)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    import uvicorn

    api_key = os.environ.get(defaults["api_key_env"]) or None
    app = create_app(engine, api_key)
    print(f"Serving {engine.model_name} on http://{args.host}:{args.port} (API at /v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
