"""The OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models) and the Gradio chat
page, on one FastAPI app around a chat engine. inference/gradio_chat.py serves it.

Every request is checked before it reaches the model: a wrong key is a 401; a body over [serve]
max_request_bytes is a 413 before it is read; bad JSON, fields, non-Unicode text, or a prompt
longer than the context are 400s naming the field, with an OpenAI-style error object; a failing
model server behind this one (vLLM) is a 502. An answer is cancelled when its client goes away,
so an abandoned request never holds up the next one.

The routes are plain functions on `router`; what they share (the engine, the key, the body cap)
is on `app.state`, set by create_app(), and reaches them through dependencies.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import gradio as gr
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tuner.serving.engine import DONE, ChatEngine, EngineError, Job, PromptTooLong, conversation, formatted, is_text

ROLES = {"system", "user", "assistant"}
# OpenAI's newer name for the system role.
ALIASES = {"developer": "system"}
# A stop string can be a few words; one of megabytes is an attack on the worker, not a stop.
MAX_STOP_CHARS = 1000
# OpenAI chat-completions fields that change nothing in an answer: identifiers and labels.
LABELS = {"model", "user", "safety_identifier", "prompt_cache_key", "metadata"}
# OpenAI fields this server does not implement, with the values that ask for nothing (their
# defaults, or no tools at all); any other value would be ignored, so it is a 400 instead.
DEFAULTS_ONLY: dict[str, list[Any]] = {
    "n": [1],
    "frequency_penalty": [0, 0.0],
    "presence_penalty": [0, 0.0],
    "logit_bias": [{}],
    "tools": [[]],
    "functions": [[]],
    "tool_choice": ["none", "auto"],
    "function_call": ["none", "auto"],
    "parallel_tool_calls": [True, False],
    "response_format": [{"type": "text"}],
    "modalities": [["text"]],
    "store": [False],
    "service_tier": ["auto", "default"],
    "verbosity": ["medium"],
    "seed": [],
    "audio": [],
    "prediction": [],
    "reasoning_effort": [],
    "web_search_options": [],
    "prompt_cache_retention": [],
}
SUPPORTED = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream"}
SUPPORTED |= {"stream_options", "logprobs", "top_logprobs"} | LABELS


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, allow: str = ""
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.allow = status, message, param, code, allow


def _number(body: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number between {low} and {high}", name)
    return float(value)


def _text(value: str, param: str) -> str:
    """`value`, or a 400 when JSON spelled a lone surrogate ("\\udc80") into it."""
    if not is_text(value):
        raise ApiError(400, f"{param} is not valid Unicode text (it holds a lone surrogate)", param)
    return value


def _message(m: Any, i: int) -> dict[str, str]:
    """One message as {"role", "content"}: text content, or text parts ({"type": "text",
    "text": ...}) joined; images, audio, tool calls and the like are a 400 naming the field."""
    where = f"messages[{i}]"
    role = m.get("role") if isinstance(m, dict) else None
    role = ALIASES.get(role, role) if isinstance(role, str) else None
    if role not in ROLES:
        raise ApiError(400, f"{where}.role must be one of {sorted(ROLES | set(ALIASES))}", f"{where}.role")
    # A null field is an absent one: clients send back answers with "refusal": null and the like.
    extra = sorted(k for k, v in m.items() if v is not None and k not in ("role", "content"))
    if extra:
        raise ApiError(400, f"{where}.{extra[0]} is not supported by this server", f"{where}.{extra[0]}")
    content = m.get("content")
    if isinstance(content, list) and content:
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        message = f"{where}.content must be a string or a list of text parts (images and audio are not supported)"
        raise ApiError(400, message, f"{where}.content")
    return {"role": role, "content": _text(content, f"{where}.content")}


def parse_request(body: Any, context: int, defaults: dict[str, Any], logprobs: bool = False) -> dict[str, Any]:
    """Validate a chat completion request; every problem, and every field this server would
    otherwise ignore, becomes a 400 naming the field. `defaults`: the settings' [chat] table
    (max_new_tokens, temperature, top_p); `logprobs`: whether the engine can return them."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # null means "the default", as in OpenAI's API
    for name, value in body.items():
        if name in DEFAULTS_ONLY:
            if not any(type(value) is type(ok) and value == ok for ok in DEFAULTS_ONLY[name]):
                raise ApiError(400, f"'{name}' is not supported by this server (only its default)", name)
        elif name not in SUPPORTED:
            raise ApiError(400, f"unrecognized request argument: '{name}'", name)
        elif name in LABELS and not isinstance(value, dict if name == "metadata" else str):
            raise ApiError(400, f"'{name}' must be {'an object' if name == 'metadata' else 'a string'}", name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    clean = [_message(m, i) for i, m in enumerate(messages)]
    if clean[-1]["role"] == "assistant":
        raise ApiError(400, "the last message must be from the user or the system", "messages")
    limit = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(limit, defaults["max_new_tokens"])
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= context:
        raise ApiError(400, f"'{limit}' must be an integer between 1 and {context}", limit)
    stop = body.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"a stop string may be at most {MAX_STOP_CHARS} characters long", "stop")
    stop = [_text(s, "stop") for s in stop]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    stream_options = body.get("stream_options", {})
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    for key, value in stream_options.items():
        if key != "include_usage" or not isinstance(value, bool | None):
            raise ApiError(400, "'stream_options' takes include_usage (true or false)", f"stream_options.{key}")
    want = body.get("logprobs", False)
    if not isinstance(want, bool):
        raise ApiError(400, "'logprobs' must be true or false", "logprobs")
    if want and not logprobs:
        raise ApiError(400, "'logprobs' is not supported by this server's backend", "logprobs")
    top = body.get("top_logprobs", 0)
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20 or (top and not want):
        raise ApiError(400, "'top_logprobs' must be an integer from 0 to 20, with logprobs: true", "top_logprobs")
    return {
        "messages": clean,
        "stream": stream,
        "include_usage": bool(stream_options.get("include_usage")),
        "options": {
            "max_new_tokens": max_tokens,
            "temperature": _number(body, "temperature", 0, 2, defaults["temperature"]),
            "top_p": _number(body, "top_p", 0, 1, defaults["top_p"]),
            "stop": stop,
            **({"logprobs": top} if want else {}),
        },
    }


def evaluation_summary(adapter: Path) -> str:
    """One line from the held-out evaluation written beside the adapter (finetuning/evaluate_adapter.py)."""
    try:
        report = json.loads((adapter / "eval.json").read_text("utf-8"))
        base, tuned = report["base"], report["tuned"]
        prompted = report.get("prompted")  # absent for chat datasets and older eval.json files
        if "exact_match" in tuned:
            middle = f", {100 * prompted['exact_match']:.1f} % (base, prompted)" if prompted else ""
            result = (
                f"exact match {100 * base['exact_match']:.1f} % (base){middle} → "
                f"{100 * tuned['exact_match']:.1f} % (fine-tuned)"
            )
        else:
            result = f"perplexity {base['perplexity']:.2f} (base) → {tuned['perplexity']:.2f} (fine-tuned)"
        paid = "" if report.get("fine_tuning_paid", True) else " Fine-tuning did not pay on this data."
        return f"Held-out evaluation on {report['held_out_rows']} rows it never trained on: {result}.{paid}"
    except (OSError, ValueError, KeyError, TypeError):
        return "No held-out evaluation yet (python finetuning/evaluate_adapter.py writes one)."


async def api_error(_: Request, err: ApiError) -> JSONResponse:
    """An ApiError as OpenAI's error object."""
    kind = "server_error" if err.status >= 500 else "invalid_request_error"
    kind = "authentication_error" if err.status == 401 else kind
    body = {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers={"Allow": err.allow} if err.allow else None)


def engine_of(request: Request) -> ChatEngine:
    return request.app.state.engine


def check_key(request: Request) -> None:
    """A 401 unless the request bears the server's key (when it has one), compared in constant time."""
    key = request.app.state.api_key
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if key and (scheme.lower() != "bearer" or not matches(given.strip(), key)):
        raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key")


def matches(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode(), key.encode())


async def json_body(request: Request) -> Any:
    """The body as JSON. Over the cap, a 413 as soon as that is known: by its declared length
    before anything is read, or while it streams in."""
    max_bytes = request.app.state.max_bytes
    too_big = ApiError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise too_big
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, huge integers, deep nesting
        raise ApiError(400, "the request body is not valid JSON") from None


Engine = Annotated[ChatEngine, Depends(engine_of)]
KEYED = [Depends(check_key)]  # before the body is read: a client without the key sends nothing big

router = APIRouter(prefix="/v1")
SHUTDOWN = {"message": "the server is shutting down", "type": "server_error", "code": "server_shutting_down"}


@router.get("/models", dependencies=KEYED)
def models(engine: Engine) -> dict[str, Any]:
    card = {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "local"}
    return {"object": "list", "data": [card]}


@router.post("/chat/completions", dependencies=KEYED)
async def chat_completions(request: Request, engine: Engine, body: Annotated[Any, Depends(json_body)]) -> Any:
    req = parse_request(body, engine.context, engine.settings["chat"], engine.has_logprobs)
    # The same prompt format as training and the other front-ends.
    req["messages"] = formatted(req["messages"], engine.settings)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_name}
    # The engine's worker thread hands each piece to this event loop.
    loop, items = asyncio.get_running_loop(), asyncio.Queue[Any]()
    try:
        job = engine.submit(req["messages"], partial(loop.call_soon_threadsafe, items.put_nowait), **req["options"])
    except EngineError as err:  # shutting down
        raise ApiError(503, str(err), code="server_shutting_down") from None
    answer = pieces(request, job, items)
    # The first piece, before any header is sent: a prompt too long for the context is a 400.
    first = [piece] if (piece := await anext(answer, None)) is not None else []
    if req["stream"]:
        return StreamingResponse(sse_events(engine, job, req, head, first, answer), media_type="text/event-stream")
    parts = first + [piece async for piece in answer]
    if cut_short(engine, job):
        raise ApiError(503, SHUTDOWN["message"], code=SHUTDOWN["code"])
    message = {"role": "assistant", "content": "".join(parts)}
    choice = {"index": 0, "message": message, **logprobs(req, parts), "finish_reason": job.stats["finish_reason"]}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(job)}


@router.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
def elsewhere(path: str) -> None:
    """What the two routes above do not take: another method (a 405 with Allow), another path (a
    404 as an error object; without this route, the page mounted at / would answer an HTML 404)."""
    if allow := {"chat/completions": "POST", "models": "GET"}.get(path):
        raise ApiError(405, f"use {allow} for /v1/{path}", code="method_not_allowed", allow=allow)
    raise ApiError(404, f"no such endpoint: /v1/{path} (this server has /v1/chat/completions and /v1/models)")


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


async def sse_events(
    engine: ChatEngine, job: Job, req: dict[str, Any], head: dict[str, Any], first: list[str], rest: AsyncIterator[str]
) -> AsyncIterator[str]:
    """The answer as server-sent events of OpenAI's chunks: the role, each piece (`first`, then
    `rest`), the finish reason, the usage when asked for, then `data: [DONE]`."""

    def chunk(delta: dict[str, str], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, **logprobs(req, [delta.get("content", "")]), "finish_reason": finish}
        return event({**head, "object": "chat.completion.chunk", "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    for piece in first:
        yield chunk({"content": piece})
    async for piece in rest:
        yield chunk({"content": piece})
    if cut_short(engine, job):  # an error event and no [DONE]: the client knows the answer is cut
        yield event({"error": SHUTDOWN})
        return
    yield chunk({}, job.stats["finish_reason"])
    if req["include_usage"]:
        yield event({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(job)})
    yield "data: [DONE]\n\n"


def event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def usage(job: Job) -> dict[str, int]:
    p, c = job.stats["prompt_tokens"], job.stats["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def cut_short(engine: ChatEngine, job: Job) -> bool:
    """Whether the answer was cancelled by the server shutting down (not by its client)."""
    return job.stats["finish_reason"] == "cancelled" and engine.closing


def logprobs(req: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """The log-probabilities of `parts`, only when asked for: OpenAI's field is null otherwise."""
    if "logprobs" not in req["options"]:
        return {}
    return {"logprobs": {"content": [t for p in parts for t in getattr(p, "logprobs", [])], "refusal": None}}


def slider(low: float, high: float, value: float, step: float, label: str) -> gr.Slider:
    """A slider whose value out of range (typed into its number box) is said on the page: gradio's
    own check logs a traceback for each. Within half a step of an end (float steps) it is that end.
    Not a subclass: gradio writes a .pyi stub beside the module of every component class."""
    widget = gr.Slider(low, high, value=value, step=step, label=label)
    preprocess = widget.preprocess

    def checked(payload: Any) -> Any:
        number = isinstance(payload, int | float) and not isinstance(payload, bool)
        if not number or not low - step / 2 <= payload <= high + step / 2:
            raise gr.Error(f"{label}: {payload!r} is not between {low} and {high}", print_exception=False)
        return preprocess(min(max(payload, low), high))

    widget.preprocess = checked  # type: ignore[method-assign]
    return widget


def chat_page(engine: ChatEngine, description: str | None) -> gr.ChatInterface:
    """The chat page: multi-turn, streaming, with the generation settings folded away."""

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
        except EngineError as err:  # a prompt too long for the context: said on the page, not logged
            raise gr.Error(str(err), print_exception=False) from None

    defaults, most = engine.settings["chat"], min(2048, engine.context)
    return gr.ChatInterface(
        respond,
        title=f"Chat with {engine.model_name}",
        description=description,
        additional_inputs=[
            slider(1, most, min(defaults["max_new_tokens"], most), 1, "Max new tokens"),
            slider(0.0, 2.0, defaults["temperature"], 0.05, "Temperature (0 = greedy)"),
            slider(0.05, 1.0, defaults["top_p"], 0.05, "Top-p"),
            slider(1, 200, defaults["top_k"], 1, "Top-k"),
        ],
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
    )


def create_app(engine: ChatEngine, api_key: str | None, description: str | None = None) -> FastAPI:
    """The FastAPI app: the API under /v1, the page at / (a login with the key as password when
    `api_key` is set)."""
    max_bytes = engine.settings["serve"]["max_request_bytes"]  # checked by the settings: positive
    app = FastAPI(title=f"{engine.model_name} chat")
    # A key read from a file or a secret store often ends in a newline that no client sends.
    key = (api_key or "").strip() or None
    app.state.engine, app.state.api_key, app.state.max_bytes = engine, key, max_bytes
    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    app.include_router(router)
    auth = (lambda _user, password: matches(password, key)) if key else None
    return gr.mount_gradio_app(
        app, chat_page(engine, description), path="/", auth=auth, auth_message="Password: the API key"
    )
