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
import time
from collections.abc import Callable, Iterator
from typing import Any

from tuner.data import system_messages, user_message
from tuner.settings import WorkspaceError

# End-of-turn tokens of the catalog's chat templates (Phi-3, Llama 3, Qwen 2.5, Mistral).
END_TOKENS = ["<|end|>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>", "</s>"]


class EngineError(WorkspaceError):
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


def is_text(text: str) -> bool:
    """False for text holding lone surrogates: JSON can spell them ("\\udc80") and Python keeps
    undecodable terminal bytes as them; they are not Unicode, and the tokenizer cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class StopStrings:
    """Finds stop strings in a text that arrives piece by piece, in time linear in the new piece
    (Knuth-Morris-Pratt): rescanning the text for every prefix of every stop string on each token
    cost the square of the stop string's length, so one request with a long stop string froze
    the worker, and every client with it."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.fallback = [_fallback(s) for s in stops]
        # For each stop string, how many of its first characters the text fed so far ends with.
        self.matched = [0] * len(stops)
        self.fed = 0

    def feed(self, new: str) -> int | None:
        """Take the next piece of text; where (in all the text fed) the earliest stop string
        starts, or None."""
        hit = None
        for n, (stop, fallback) in enumerate(zip(self.stops, self.fallback, strict=True)):
            k = self.matched[n]
            for i, char in enumerate(new):
                while k and stop[k] != char:
                    k = fallback[k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):
                    start = self.fed + i + 1 - k
                    hit = start if hit is None else min(hit, start)
                    break
            self.matched[n] = k
        self.fed += len(new)
        return hit

    def held(self) -> int:
        """How many characters at the end of the text may be the start of a stop string (the
        next token may complete it): not to be shown yet."""
        return max(self.matched, default=0)


def _fallback(stop: str) -> list[int]:
    """For each prefix stop[:i + 1], the length of its longest proper prefix that is also its
    suffix: where a partial match goes on after a mismatch."""
    table, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        if stop[i] == stop[k]:
            k += 1
        table[i] = k
    return table


class Piece(str):
    """A piece of an answer, with the log-probabilities of the tokens that made it (for a job
    that asked for them: options["logprobs"], the number of alternatives per token)."""

    logprobs: list[dict[str, Any]]


class PromptTooLong(EngineError):
    """The prompt alone fills the model's context: nothing is left to answer with."""


DONE = object()  # the end of a job's pieces


class Job:
    """One answer being generated: pieces, an error and finally DONE go through `deliver` (the
    caller's callback, or the `out` queue that pieces() reads); `cancel` stops it within a token."""

    def __init__(
        self, messages: list[dict[str, str]], options: dict[str, Any], on_item: Callable[[Any], None] | None = None
    ) -> None:
        self.messages, self.options = messages, options
        self.out: queue.Queue[Any] = queue.Queue()
        self.deliver: Callable[[Any], None] = on_item or self.out.put
        self.cancel = threading.Event()
        self.stats: dict[str, Any] = {"prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "stop"}

    def put(self, item: Any) -> None:
        try:
            self.deliver(item)
        except RuntimeError:  # the caller's event loop has closed: nobody is listening
            self.cancel.set()

    def pieces(self) -> Iterator[str]:
        """The answer piece by piece (blocking; only for a job without on_item); raises the
        engine's error, if any."""
        while (item := self.out.get()) is not DONE:
            if isinstance(item, Exception):
                raise item
            yield item


def sampling(options: dict[str, Any]) -> tuple[float, float, int]:
    """(temperature, top_p, top_k) of a job: jobs batch together only when these are equal, as
    one generate call samples every row alike. Greedy ignores top_p and top_k."""
    temperature = float(options.get("temperature", 0.0))
    if temperature <= 0:
        return (0.0, 1.0, 0)
    return (temperature, float(options.get("top_p", 1.0)), int(options.get("top_k", 50)))


class Row:
    """One job's answer as its tokens arrive: incremental detokenisation (a few tokens decoded per
    step, so the cost per token stays constant), end tokens, stop strings, the token limit, the
    caller's cancel, and the pieces handed to the job."""

    def __init__(self, engine: ChatEngine, job: Job) -> None:
        options = job.options
        self.job, self.tokenizer, self.end_ids = job, engine.tokenizer, engine.end_ids
        self.stop = StopStrings(options.get("stop") or [])
        self.top: int | None = options.get("logprobs")  # None: no log-probabilities wanted
        self.logprobs: list[dict[str, Any]] = []  # of tokens whose text is not handed out yet
        self.prompt = engine.prompt_ids(job.messages)
        if len(self.prompt) >= engine.context:
            raise PromptTooLong(
                f"the prompt is {len(self.prompt)} tokens, and the model's context is {engine.context} tokens: "
                "shorten the conversation"
            )
        self.limit = min(int(options.get("max_new_tokens", 128)), engine.context - len(self.prompt))
        self.sampling = sampling(options)
        self.ids: list[int] = []
        # Decoding window, as in vLLM: ids[prefix:read] decode to text already taken; decoding
        # from `prefix` on keeps the spaces and merges that depend on the tokens before.
        self.prefix = self.read = 0
        self.text = ""  # decoded so far, without a trailing half character
        self.sent = 0  # how much of text was handed out
        self.done = False
        job.stats.update(prompt_tokens=len(self.prompt), completion_tokens=0, finish_reason="length")

    def add(self, token: int, logprobs: tuple[float, list[tuple[int, float]]] | None = None) -> bool:
        """Take the next token (with its log-probability and the top alternatives', from a
        backend with has_logprobs); True once this row is finished."""
        if self.done:
            return True
        stats = self.job.stats
        if self.job.cancel.is_set():
            stats["finish_reason"] = "cancelled"
            return self._end(flush=False)
        if token in self.end_ids:
            stats["finish_reason"] = "stop"
            return self._end()
        self.ids.append(token)
        stats["completion_tokens"] = len(self.ids)
        if self.top is not None and logprobs is not None:
            chosen, top = logprobs
            self.logprobs.append({**self._token(token, chosen), "top_logprobs": [self._token(*t) for t in top]})
        new = self._delta(final=False)
        self.text += new
        hit = self.stop.feed(new)
        if hit is not None:
            stats["finish_reason"] = "stop"
            self.text = self.text[:hit]
            return self._end(tail=False)
        # Not half a multi-byte character, and not what may be the start of a stop string.
        ready = min(len(self.text.rstrip("\ufffd")), len(self.text) - self.stop.held())
        if ready > self.sent:
            self._put(self.text[self.sent : ready])
            self.sent = ready
        if len(self.ids) >= self.limit:
            return self._end()  # finish_reason stays "length"
        return False

    def finish(self) -> None:
        """The backend ran out of tokens (its own limit): hand out what is left."""
        if not self.done:
            self._end()

    def _delta(self, final: bool) -> str:
        decode = self.tokenizer.decode
        taken = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        text = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(text) <= len(taken) or (text.endswith("\ufffd") and not final):
            return ""  # nothing new, or half a character: wait for the next token
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(taken) :]

    def _end(self, flush: bool = True, tail: bool = True) -> bool:
        self.done = True
        if flush:
            if tail:
                self.text += self._delta(final=True)  # a held-back half character, shown as is
            if len(self.text) > self.sent or self.logprobs:  # every token's log-probability is given
                self._put(self.text[self.sent :])
                self.sent = len(self.text)
        return True

    def _put(self, text: str) -> None:
        if self.top is None:
            self.job.put(text)
            return
        piece = Piece(text)
        piece.logprobs, self.logprobs = self.logprobs, []
        self.job.put(piece)

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        """A token as OpenAI's logprobs list it (its text alone; half a character shows as \ufffd)."""
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}


class ChatEngine:
    """What every backend shares: the chat template, the worker thread that batches queued jobs,
    and streaming text with end tokens, stop strings and token counts. A backend supplies
    `generate()` (a batch of rows) or `tokens()` (one prompt; then max_batch stays 1).

    Callers never hold a lock while they consume an answer: they queue a Job and read its pieces.
    A caller that goes away sets job.cancel (stream() does it when closed), and its row finishes
    after at most one more token, without disturbing the other rows of its batch.
    """

    tokenizer: Any
    end_ids: set[int]
    context: int
    model_name: str
    settings: dict[str, Any]
    max_batch = 1  # jobs generated together
    has_logprobs = False  # whether generate() hands Row.add each token's log-probabilities
    gather_s = 0.01  # how long the worker waits for more jobs to join a batch it is starting

    def __init__(self) -> None:
        self.waiting: list[Job] = []
        self.pending: set[Job] = set()  # queued or being generated
        self.worker: threading.Thread | None = None
        self.lock = threading.Condition()
        self.closing = False

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokens(
        self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, top_k: int
    ) -> Iterator[int]:
        """The next token ids after the prompt `ids`, one at a time."""
        raise NotImplementedError

    def generate(self, rows: list[Row]) -> None:
        """Feed each row its tokens (row.add) until every row is done. All rows sample alike.
        This default runs them one after another through tokens()."""
        for row in rows:
            for token in self.tokens(row.prompt, row.limit, *row.sampling):
                if row.add(token):
                    break
            row.finish()

    def submit(
        self, messages: list[dict[str, str]], on_item: Callable[[Any], None] | None = None, **options: Any
    ) -> Job:
        """Queue an answer; options are stream()'s. The worker (a daemon thread, so it never keeps
        the process alive) starts with the first job."""
        job = Job(messages, options, on_item)
        with self.lock:
            if self.closing:
                raise EngineError("the server is shutting down")
            self.pending.add(job)
            self.waiting.append(job)
            self.lock.notify()
            if self.worker is None:
                self.worker = threading.Thread(target=self._work, name="chat-engine", daemon=True)
                self.worker.start()
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
        with self.lock:
            self.closing = True
            for job in self.pending:
                job.cancel.set()

    def _take(self) -> list[Job]:
        """The next batch: the oldest waiting job and those that sample like it, after a short
        wait so that clients arriving together start together."""
        with self.lock:
            while not self.waiting:
                self.lock.wait()
            if self.max_batch > 1 and len(self.waiting) < self.max_batch:
                deadline = time.monotonic() + self.gather_s
                while len(self.waiting) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self.lock.wait(left)
            key = sampling(self.waiting[0].options)
            batch = [job for job in self.waiting if sampling(job.options) == key][: self.max_batch]
            self.waiting = [job for job in self.waiting if job not in batch]
            return batch

    def _work(self) -> None:
        while True:
            rows = []
            jobs = self._take()
            for job in jobs:
                try:
                    if job.cancel.is_set():
                        job.stats["finish_reason"] = "cancelled"
                    else:
                        rows.append(Row(self, job))
                except Exception as err:  # PromptTooLong: that job alone fails
                    job.put(err)
            try:
                if rows:
                    self.generate(rows)
            except Exception as err:  # handed to the callers, who report it; the worker goes on
                for row in rows:
                    if not row.done:
                        row.done = True
                        row.job.put(err)
            for row in rows:
                row.finish()
            with self.lock:
                self.pending.difference_update(jobs)
            for job in jobs:
                job.put(DONE)
