"""The one chat engine behind every front-end (console, web page, OpenAI-compatible API).

It loads the base model and the fine-tuned adapter named in settings.toml, formats the
conversation with the model's own chat template (the format it was fine-tuned with), and
streams the answer token by token until an end-of-turn token, a stop string or the limit.
One generation runs at a time, in a worker thread: callers queue jobs, so outputs never mix,
and a caller that goes away cancels its job.
"""

from __future__ import annotations

import importlib.util
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "finetuning"))

from data import system_messages, user_message  # noqa: E402
from settings import load_settings  # noqa: E402

SETTINGS = load_settings()

# End-of-turn tokens of the catalog's chat templates (Phi-3, Llama 3, Qwen 2.5, Mistral).
END_TOKENS = ["<|end|>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>", "</s>"]


class EngineError(Exception):
    """Something to do first (download, fine-tune), said in one line."""


def formatted(messages: list[dict[str, str]], system: str | None = None) -> list[dict[str, str]]:
    """Messages as the model was fine-tuned on them: user turns put into the training text
    template, and the configured system message unless `system` or the messages bring one."""
    out = [
        {"role": m["role"], "content": user_message(m["content"]) if m["role"] == "user" else m["content"]}
        for m in messages
    ]
    if any(m["role"] == "system" for m in out):
        return out
    return ([{"role": "system", "content": system}] if system else system_messages()) + out


def conversation(history: list[dict[str, str]], text: str, system: str | None = None) -> list[dict[str, str]]:
    """Messages for a new user turn after `history` (turns as the user typed them)."""
    return formatted([*history, {"role": "user", "content": text}], system)


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


def load_engine(backend: str = "torch", baseonly: bool = False) -> ChatEngine:
    """The engine for `backend` (torch or onnx); EngineError says what to run first."""
    if backend == "onnx":
        from onnx_backend import OnnxEngine

        return OnnxEngine(baseonly=baseonly)
    return Engine(baseonly=baseonly)


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


class Engine(ChatEngine):
    """transformers (+ peft): the base model and the fine-tuned adapter."""

    def __init__(self, baseonly: bool = False) -> None:
        super().__init__()
        model_path = ROOT / SETTINGS["model"]["path"]
        adapter_path = ROOT / SETTINGS["inference"]["adapter_path"]
        if not (model_path / "config.json").is_file():
            raise EngineError(f"base model not found in {model_path}: run `python setup/download_model.py` first")
        if not baseonly and not (adapter_path / "adapter_config.json").is_file():
            raise EngineError(
                f"adapter not found in {adapter_path}: run `python finetuning/invoke_olive.py` first "
                "(or chat with the base model: --baseonly)"
            )
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        load: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
        # Load the base in 4-bit only where it was fine-tuned that way (QLoRA on CUDA).
        if SETTINGS["inference"]["load_in_4bit"] and cuda and importlib.util.find_spec("bitsandbytes"):
            from transformers import BitsAndBytesConfig

            load["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4"
            )
        if SETTINGS["model"]["id"] == "tiny-random":
            torch.set_num_threads(1)  # tiny matrices: threads cost more than they save
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, **load)
        if not baseonly:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path)
        self.model = model.to(self.device) if "quantization_config" not in load else model
        self.model.eval()
        self.model_name = SETTINGS["model"]["id"] + ("" if baseonly else "-finetuned")
        vocab = self.tokenizer.get_vocab()
        ends = {vocab[t] for t in END_TOKENS if t in vocab}
        eos = self.model.generation_config.eos_token_id
        ends.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.end_ids = ends
        self.context = int(getattr(self.model.config, "max_position_embeddings", 4096))

    def _next_token(self, logits: Any, temperature: float, top_p: float, top_k: int) -> int:
        torch = self.torch
        if temperature <= 0:
            return int(logits.argmax())
        logits = logits.float() / temperature
        if 0 < top_k < logits.numel():
            logits[logits < torch.topk(logits, top_k).values[-1]] = -float("inf")
        probs = torch.softmax(logits, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            drop = sorted_probs.cumsum(0) - sorted_probs > top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs / probs.sum(), 1))

    def tokens(
        self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, top_k: int
    ) -> Iterator[int]:
        torch = self.torch
        past = None
        inputs = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                out = self.model(input_ids=inputs, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = self._next_token(out.logits[0, -1], temperature, top_p, top_k)
                yield token
                inputs = torch.tensor([[token]], device=self.device)
