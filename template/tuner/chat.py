"""The chat engine base behind every front-end (console, web page, OpenAI-compatible API).

It formats the conversation as the model was fine-tuned (the workspace's prompt format, then the
model's own chat template) and streams the answer token by token until an end-of-turn token, a
stop string or the limit. One generation runs at a time, in a worker thread: callers queue jobs,
so outputs never mix, and a caller that goes away cancels its job. Backends (torch_engine,
onnx_engine) only supply the model's next tokens.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from tuner.data import system_messages, user_message

# End-of-turn tokens of the catalog's chat templates (Phi-3, Llama 3, Qwen 2.5, Mistral).
END_TOKENS = ["<|end|>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>", "</s>"]


class EngineError(Exception):
    """Something to do first (download, fine-tune), said in one line."""


def formatted(
    messages: list[dict[str, str]], settings: dict[str, Any], system: str | None = None
) -> list[dict[str, str]]:
    """Messages as the model was fine-tuned on them: user turns put into the training text
    template, and the configured system message unless `system` or the messages bring one."""
    out = [
        {"role": m["role"], "content": user_message(m["content"], settings) if m["role"] == "user" else m["content"]}
        for m in messages
    ]
    if any(m["role"] == "system" for m in out):
        return out
    return ([{"role": "system", "content": system}] if system else system_messages(settings)) + out


def conversation(
    history: list[dict[str, str]], text: str, settings: dict[str, Any], system: str | None = None
) -> list[dict[str, str]]:
    """Messages for a new user turn after `history` (turns as the user typed them)."""
    return formatted([*history, {"role": "user", "content": text}], settings, system)


def shown_length(text: str, stop: list[str]) -> int:
    """How much of `text` can be shown yet: not half a multi-byte character, and not what may
    be the start of a stop string (the next token may complete it)."""
    ready = len(text.rstrip("\ufffd"))
    for s in stop:
        for k in range(len(s) - 1, 0, -1):
            if text.endswith(s[:k]):
                ready = min(ready, len(text) - k)
                break
    return ready


class PromptTooLong(EngineError):
    """The prompt alone fills the model's context: nothing is left to answer with."""


DONE = object()  # the end of a job's pieces


class Job:
    """One answer being generated: its pieces arrive in `out`; `cancel` stops it within a token."""

    def __init__(
        self, messages: list[dict[str, str]], options: dict[str, Any], on_item: Callable[[Any], None] | None = None
    ) -> None:
        self.messages, self.options, self.on_item = messages, options, on_item
        self.out: queue.Queue[Any] = queue.Queue()
        self.cancel = threading.Event()
        self.stats: dict[str, Any] = {"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "stop"}

    def put(self, item: Any) -> None:
        """Hand a piece, an error or DONE to the caller: through `on_item` when given (an event
        loop's queue), else through `out`."""
        if self.on_item is None:
            self.out.put(item)
            return
        try:
            self.on_item(item)
        except RuntimeError:  # the caller's event loop has closed: nobody is listening
            self.cancel.set()

    def pieces(self) -> Iterator[str]:
        """The answer piece by piece (blocking); raises the engine's error, if any."""
        while (item := self.out.get()) is not DONE:
            if isinstance(item, Exception):
                raise item
            yield item


class ChatEngine:
    """What every backend shares: the chat template, one generation at a time in a worker thread,
    and streaming text with end tokens, stop strings and token counts. A backend only supplies
    `tokens()`.

    Callers never hold a lock while they consume an answer: they queue a Job and read its pieces.
    A caller that goes away sets job.cancel (stream() does it when closed), and the worker moves
    on to the next job after at most one more token.
    """

    tokenizer: Any
    end_ids: set[int]
    context: int
    model_name: str
    settings: dict[str, Any]

    def __init__(self) -> None:
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.pending: set[Job] = set()  # queued or being generated
        self.worker: threading.Thread | None = None
        self.start_lock = threading.Lock()
        self.closing = False

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokens(
        self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, top_k: int
    ) -> Iterator[int]:
        """The next token ids after the prompt `ids`, one at a time."""
        raise NotImplementedError

    def submit(
        self, messages: list[dict[str, str]], on_item: Callable[[Any], None] | None = None, **options: Any
    ) -> Job:
        """Queue an answer; options are stream()'s. The worker (a daemon thread, so it never keeps
        the process alive) starts with the first job."""
        job = Job(messages, options, on_item)
        with self.start_lock:
            if self.closing:
                raise EngineError("the server is shutting down")
            self.pending.add(job)
            if self.worker is None:
                self.worker = threading.Thread(target=self._work, name="chat-engine", daemon=True)
                self.worker.start()
        self.jobs.put(job)
        return job

    def stream(
        self, messages: list[dict[str, str]], stats: dict[str, Any] | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield the answer piece by piece (options: max_new_tokens, temperature, top_p, top_k,
        stop). Token counts and the finish reason land in `stats`. Closing the generator early
        cancels the generation."""
        job = self.submit(messages, **options)
        try:
            yield from job.pieces()
            if stats is not None:
                stats.update(job.stats)
        finally:
            job.cancel.set()

    def reply(self, messages: list[dict[str, str]], **options: Any) -> str:
        return "".join(self.stream(messages, **options))

    def close(self) -> None:
        """Refuse new jobs and cancel the pending ones (a server shutting down)."""
        with self.start_lock:
            self.closing = True
            for job in self.pending:
                job.cancel.set()

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if not job.cancel.is_set():
                    for piece in self._generate(job, **job.options):
                        job.put(piece)
                        if job.cancel.is_set():
                            break
            except Exception as err:  # handed to the caller, who reports it; the worker goes on
                job.put(err)
            with self.start_lock:
                self.pending.discard(job)
            job.put(DONE)

    def _generate(
        self,
        job: Job,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 50,
        stop: list[str] | None = None,
    ) -> Iterator[str]:
        stop = stop or []
        ids = self.prompt_ids(job.messages)
        if len(ids) >= self.context:
            raise PromptTooLong(
                f"the prompt is {len(ids)} tokens, and the model's context is {self.context} tokens: "
                "shorten the conversation"
            )
        stats = job.stats
        stats.update(prompt_tokens=len(ids), completion_tokens=0, finish_reason="length")
        max_new_tokens = min(max_new_tokens, self.context - len(ids))
        generated: list[int] = []
        sent = text = ""
        for token in self.tokens(ids, max_new_tokens, temperature, top_p, top_k):
            if job.cancel.is_set():
                stats["finish_reason"] = "cancelled"
                return
            if token in self.end_ids:
                stats["finish_reason"] = "stop"
                break
            generated.append(token)
            stats["completion_tokens"] = len(generated)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            hit = min((text.find(s) for s in stop if s in text), default=-1)
            if hit >= 0:
                stats["finish_reason"] = "stop"
                text = text[:hit]
                break
            ready = shown_length(text, stop)
            if ready > len(sent):
                yield text[len(sent) : ready]
                sent = text[:ready]
        if len(text) > len(sent):
            yield text[len(sent) :]
