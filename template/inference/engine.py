"""The one chat engine behind every front-end (console, web page, OpenAI-compatible API).

It loads the base model and the fine-tuned adapter named in settings.toml, formats the
conversation with the model's own chat template (the format it was fine-tuned with), and
streams the answer token by token until an end-of-turn token, a stop string or the limit.
One generation runs at a time (a lock): callers queue, so outputs never mix.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = tomllib.loads((ROOT / "settings.toml").read_text("utf-8"))
sys.path.insert(0, str(ROOT / "finetuning"))

from data import system_messages, user_message  # noqa: E402

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


class ChatEngine:
    """What every backend shares: the chat template, one answer at a time, and streaming text
    with end tokens, stop strings and token counts. A backend only supplies `tokens()`."""

    tokenizer: Any
    end_ids: set[int]
    context: int
    model_name: str

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_prompt_tokens = self.last_completion_tokens = 0
        self.last_finish_reason = "stop"

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokens(
        self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, top_k: int
    ) -> Iterator[int]:
        """The next token ids after the prompt `ids`, one at a time."""
        raise NotImplementedError

    def stream(
        self,
        messages: list[dict[str, str]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 50,
        stop: list[str] | None = None,
        stats: dict[str, Any] | None = None,
    ) -> Iterator[str]:
        """Yield the answer piece by piece. Holds the engine for the whole answer; token counts
        and the finish reason land in `stats` (per call, so concurrent callers never mix them)."""
        with self.lock:
            yield from self._stream(messages, max_new_tokens, temperature, top_p, top_k, stop or [])
            if stats is not None:
                stats.update(
                    prompt_tokens=self.last_prompt_tokens,
                    completion_tokens=self.last_completion_tokens,
                    finish_reason=self.last_finish_reason,
                )

    def _stream(
        self,
        messages: list[dict[str, str]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        stop: list[str],
    ) -> Iterator[str]:
        ids = self.prompt_ids(messages)
        self.last_prompt_tokens, self.last_completion_tokens = len(ids), 0
        self.last_finish_reason = "length"
        max_new_tokens = min(max_new_tokens, max(self.context - len(ids), 0))
        generated: list[int] = []
        sent = text = ""
        for token in self.tokens(ids, max_new_tokens, temperature, top_p, top_k) if max_new_tokens > 0 else ():
            if token in self.end_ids:
                self.last_finish_reason = "stop"
                break
            generated.append(token)
            self.last_completion_tokens = len(generated)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            hit = min((text.find(s) for s in stop if s in text), default=-1)
            if hit >= 0:
                self.last_finish_reason = "stop"
                text = text[:hit]
                break
            ready = shown_length(text, stop)
            if ready > len(sent):
                yield text[len(sent) : ready]
                sent = text[:ready]
        if len(text) > len(sent):
            yield text[len(sent) :]

    def reply(self, messages: list[dict[str, str]], **options: Any) -> str:
        return "".join(self.stream(messages, **options))


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
