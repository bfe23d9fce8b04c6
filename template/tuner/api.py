"""The OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models) and the Gradio chat
page, on one FastAPI app around a chat engine. inference/gradio_chat.py serves it.

Every request is checked before it reaches the model: a body over [serve] max_request_bytes
is a 413 before it is read; bad JSON, fields, non-Unicode text, or a prompt longer than the
context are 400s naming the field, with an OpenAI-style error object; a failing model server
behind this one (vLLM) is a 502. An answer is cancelled when its client goes away, so an
abandoned request never holds up the next one.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request)
# at run time, and they are imported inside create_app.
import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from tuner.chat import DONE, ChatEngine, EngineError, Job, PromptTooLong, conversation, formatted, is_text

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


def _text(value: str, param: str) -> str:
    """`value`, or a 400 when JSON spelled a lone surrogate ("\\udc80") into it."""
    if not is_text(value):
        raise ApiError(400, f"{param} is not valid Unicode text (it holds a lone surrogate)", param)
    return value


def parse_request(body: Any, context: int, defaults: dict[str, Any]) -> dict[str, Any]:
    """Validate a chat completion request; every problem becomes a 400 naming the field.
    `defaults`: the settings' [chat] table (max_new_tokens, temperature, top_p)."""
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
        clean.append({"role": m["role"], "content": _text(content, f"messages[{i}].content")})
    if clean[-1]["role"] == "assistant":
        raise ApiError(400, "the last message must be from the user or the system", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = defaults["max_new_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= context:
        raise ApiError(400, f"'max_tokens' must be an integer between 1 and {context}", "max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    stop = [_text(s, "stop") for s in stop]
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
            "temperature": _number(body, "temperature", 0, 2, defaults["temperature"]),
            "top_p": _number(body, "top_p", 0, 1, defaults["top_p"]),
            "stop": stop,
        },
    }


def evaluation_summary(adapter: Path) -> str:
    """One line from the held-out evaluation written beside the adapter (finetuning/evaluate_adapter.py)."""
    try:
        report = json.loads((adapter / "eval.json").read_text("utf-8"))
        base, tuned = report["base"], report["tuned"]
        if "exact_match" in tuned:
            base_em, tuned_em = 100 * base["exact_match"], 100 * tuned["exact_match"]
            result = f"exact match {base_em:.1f} % (base) → {tuned_em:.1f} % (fine-tuned)"
        else:
            result = f"perplexity {base['perplexity']:.2f} (base) → {tuned['perplexity']:.2f} (fine-tuned)"
        return f"Held-out evaluation on {report['held_out_rows']} rows it never trained on: {result}."
    except (OSError, ValueError, KeyError, TypeError):
        return "No held-out evaluation yet (python finetuning/evaluate_adapter.py writes one)."


def create_app(engine: ChatEngine, api_key: str | None, description: str | None = None) -> Any:
    """The FastAPI app: the API under /v1, the page at / (a login with the key as password when
    `api_key` is set)."""
    import gradio as gr
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    defaults = engine.settings["chat"]
    max_bytes = int(engine.settings["serve"].get("max_request_bytes", 2_097_152))

    app = FastAPI(title=f"{engine.model_name} chat")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        kind = "server_error" if err.status >= 500 else "invalid_request_error"
        kind = "authentication_error" if err.status == 401 else kind
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

    async def read_body(request: Request) -> bytes:
        """The body, refused with a 413 as soon as it is known to be too big: by its declared
        length before anything is read, or while it streams in."""
        too_big = ApiError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_bytes:
                raise too_big
        return bytes(body)

    async def pieces(request: Request, job: Job, items: asyncio.Queue[Any]) -> AsyncIterator[str]:
        """The job's answer as it comes. The job is cancelled when the client goes away (checked
        every 0.25 s) or when this generator is closed or cancelled, so the engine moves on."""

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            job.cancel.set()

        watcher = asyncio.create_task(watch())
        try:
            while (item := await items.get()) is not DONE:
                if isinstance(item, PromptTooLong):
                    raise ApiError(400, str(item), "messages", "context_length_exceeded")
                if isinstance(item, EngineError):  # the model server behind us (vLLM) failed
                    raise ApiError(502, str(item), code="upstream_error")
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            watcher.cancel()
            job.cancel.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        try:
            body = json.loads(await read_body(request))
        except (ValueError, RecursionError):  # bad JSON or UTF-8, huge integers, deep nesting
            raise ApiError(400, "the request body is not valid JSON") from None
        req = parse_request(body, engine.context, defaults)
        # The same prompt format as training and the other front-ends.
        req["messages"] = formatted(req["messages"], engine.settings)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": created, "model": engine.model_name}
        # The engine's worker thread hands each piece to this event loop.
        loop, items = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(item: Any) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        try:
            job = engine.submit(req["messages"], on_item=deliver, **req["options"])
        except EngineError as err:  # shutting down
            raise ApiError(503, str(err), code="server_shutting_down") from None
        answer = pieces(request, job, items)
        # The first piece, before any header is sent: a prompt too long for the context is a 400.
        first = await anext(answer, None)

        def usage() -> dict[str, int]:
            p, c = job.stats["prompt_tokens"], job.stats["completion_tokens"]
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        shutdown = {"message": "the server is shutting down", "type": "server_error", "code": "server_shutting_down"}

        def cut_short() -> bool:
            return job.stats["finish_reason"] == "cancelled" and engine.closing

        if not req["stream"]:
            text = (first or "") + "".join([piece async for piece in answer])
            if cut_short():
                raise ApiError(503, shutdown["message"], code=shutdown["code"])
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": job.stats["finish_reason"],
            }
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage()}

        async def events() -> AsyncIterator[str]:
            def chunk(delta: dict[str, str], finish: str | None = None) -> str:
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"

            yield chunk({"role": "assistant", "content": ""})
            if first is not None:
                yield chunk({"content": first})
            async for piece in answer:
                yield chunk({"content": piece})
            if cut_short():  # an error event and no [DONE]: the client knows the answer is cut
                yield f"data: {json.dumps({'error': shutdown})}\n\n"
                return
            yield chunk({}, job.stats["finish_reason"])
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
        try:
            for piece in engine.stream(conversation(turns, message, engine.settings), top_k=int(top_k), **options):
                answer += piece
                yield answer
        except EngineError as err:  # a prompt too long for the context: said on the page
            raise gr.Error(str(err)) from None

    page = gr.ChatInterface(
        respond,
        title=f"Chat with {engine.model_name}",
        description=description,
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
