"""The chat engine on transformers (+ peft): the base model and the fine-tuned adapter."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuner.chat import END_TOKENS, ChatEngine, EngineError
from tuner.settings import adapter_dir, in_workspace, trained_with


class Engine(ChatEngine):
    """transformers (+ peft): the base model and the fine-tuned adapter."""

    def __init__(self, settings: dict[str, Any], root: Path, baseonly: bool = False) -> None:
        super().__init__()
        self.settings = settings
        model_path = in_workspace(root, settings["model"]["path"])
        adapter_path = adapter_dir(root)
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
        trained = (None if baseonly else trained_with(adapter_path)) or settings
        if trained["train"]["method"] == "qlora" and cuda and importlib.util.find_spec("bitsandbytes"):
            from transformers import BitsAndBytesConfig

            load["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4"
            )
        if settings["model"]["id"] == "tiny-random":
            torch.set_num_threads(1)  # tiny matrices: threads cost more than they save
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, **load)
        if not baseonly:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path)
        self.model = model.to(self.device) if "quantization_config" not in load else model
        self.model.eval()
        self.model_name = settings["model"]["id"] + ("" if baseonly else "-finetuned")
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
