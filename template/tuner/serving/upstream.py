"""The chat engine as a client of an OpenAI-compatible server: vLLM, which tuner/serving/vllm.py starts.

Messages arrive in the training prompt format, as for every engine (the front-ends call
tuner.serving.engine.formatted/conversation: our system message, user turns in [prompt] text_template); vLLM
adds only the model's chat template. Each job streams from POST /v1/chat/completions in a thread of
its own, without the base class's queue: the server batches concurrent requests itself
(continuous batching). A cancelled job closes its upstream stream at the next piece, and vLLM
stops generating it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx

from tuner.serving.engine import DONE, ChatEngine, EngineError, Job, PromptTooLong, sampling


class OpenAIEngine(ChatEngine):
    """Forwards each job to `base_url` (".../v1") as model `model`, streamed, with usage counts."""

    def __init__(
        self,
        settings: dict[str, Any],
        base_url: str,
        model: str,
        context: int,
        api_key: str | None = None,
        read_timeout_s: float = 600,
    ) -> None:
        super().__init__()
        self.settings, self.model, self.model_name, self.context = settings, model, model, context
        self.base_url = base_url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No pool limit: every waiting request is vLLM's to schedule. A read timeout only for a
        # server that stopped sending (vLLM streams every token; queued requests wait for a slot).
        # trust_env=False: the server is local; no HTTP(S)_PROXY from the environment in between.
        self.client = httpx.Client(
            base_url=base_url,
            headers=headers,
            trust_env=False,
            timeout=httpx.Timeout(10, read=read_timeout_s, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        )

    def submit(self, messages: list[dict[str, str]], on_item: Any = None, **options: Any) -> Job:
        """Start streaming the answer (options as ChatEngine.stream's) in a daemon thread."""
        job = Job(messages, options, on_item)
        with self.lock:
            if self.closing:
                raise EngineError("the server is shutting down")
            self.pending.add(job)
        threading.Thread(target=self._run, args=(job,), name="openai-job", daemon=True).start()
        return job

    def request(self, job: Job) -> dict[str, Any]:
        """The upstream request body of a job."""
        temperature, top_p, top_k = sampling(job.options)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": job.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            # max_tokens is deprecated in vLLM 0.33's protocol.
            "max_completion_tokens": int(job.options.get("max_new_tokens", self.settings["chat"]["max_new_tokens"])),
            "temperature": temperature,
            "top_p": top_p,
            # vLLM's extension of the OpenAI request, sent even when 0 (vLLM's "no top-k"): left
            # out, vLLM takes the model's generation_config top_k, which the torch engine ignores.
            "top_k": top_k,
        }
        if job.options.get("stop"):
            body["stop"] = job.options["stop"]
        return body

    def _run(self, job: Job) -> None:
        stats = job.stats
        try:
            if job.cancel.is_set():
                stats["finish_reason"] = "cancelled"
                return
            # Leaving this block before the end closes the connection: vLLM aborts the request.
            with self.client.stream("POST", "/chat/completions", json=self.request(job)) as response:
                if response.status_code != 200:
                    raise refusal(response.status_code, response.read())
                for line in response.iter_lines():
                    if job.cancel.is_set():
                        stats["finish_reason"] = "cancelled"
                        return
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    self._take(job, json.loads(line.removeprefix("data: ")))
        except EngineError as err:
            job.put(err)
        except (httpx.HTTPError, ValueError) as err:  # gone, timed out, or not speaking the protocol
            job.put(EngineError(f"the model server at {self.base_url} failed: {err}"))
        finally:
            with self.lock:
                self.pending.discard(job)
            job.put(DONE)

    def _take(self, job: Job, chunk: dict[str, Any]) -> None:
        """One streamed chunk: text pieces, the finish reason, and (last) the usage counts."""
        if "error" in chunk:
            raise EngineError(f"the model server failed: {chunk['error'].get('message', chunk['error'])}")
        for choice in chunk.get("choices") or []:
            if text := (choice.get("delta") or {}).get("content"):
                job.stats["completion_tokens"] += 1  # about a token a chunk, until the usage comes
                job.put(text)
            if choice.get("finish_reason"):
                job.stats["finish_reason"] = choice["finish_reason"]
        if usage := chunk.get("usage"):
            job.stats["prompt_tokens"] = usage["prompt_tokens"]
            job.stats["completion_tokens"] = usage["completion_tokens"]


def refusal(status: int, body: bytes) -> EngineError:
    """The upstream's error response as one line; a prompt too long for the context is PromptTooLong."""
    try:
        error = json.loads(body)
        message = str(error.get("error", error).get("message") or error)  # OpenAI's shape, or vLLM's older one
    except (ValueError, AttributeError):
        message = body.decode("utf-8", "replace")[:300]
    if status == 400 and "context length" in message:
        return PromptTooLong(message)
    return EngineError(f"the model server refused the request ({status}): {message}")
