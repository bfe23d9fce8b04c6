"""The chat engine on transformers (+ peft): the base model and the fine-tuned adapter.

Waiting requests are batched: one `model.generate` runs them together, left-padded, and a
stopping criterion hands each row's new token to its job and ends that row alone (end token,
stop string, its own limit, or its caller gone).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tuner.chat import END_TOKENS, ChatEngine, EngineError, Row
from tuner.settings import adapter_dir, in_workspace, trained_with


def cuda_dtype(name: str) -> Any:
    """The torch dtype `name` for CUDA, with float16 for bfloat16 on GPUs without bf16 (T4, V100):
    there bf16 is emulated, many times slower, or refused by the kernels."""
    import torch

    if name == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return getattr(torch, name)


def quantization_config(settings: dict[str, Any]) -> Any:
    """The 4-bit config the base was fine-tuned with ([train] of the settings it was trained with),
    so that serving computes what training did."""
    from transformers import BitsAndBytesConfig

    train = settings["train"]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=train["quant_type"],
        bnb_4bit_use_double_quant=train["double_quant"],
        bnb_4bit_compute_dtype=cuda_dtype(train["compute_dtype"]),
    )


class Engine(ChatEngine):
    """transformers (+ peft): the base model and the fine-tuned adapter."""

    max_batch = 16  # rows per generate: past this a CPU gains little and each row slows down

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
        # fp32 on CPU: bf16 matmuls are slow there, and batched answers match single ones.
        load: dict[str, Any] = {"dtype": cuda_dtype("bfloat16") if cuda else torch.float32}
        # As the adapter was trained (its run.json; else the settings): 4-bit only for QLoRA on CUDA.
        trained = (None if baseonly else trained_with(adapter_path)) or settings
        if trained["train"]["method"] == "qlora" and cuda and importlib.util.find_spec("bitsandbytes"):
            load["quantization_config"] = quantization_config(trained)
            load["dtype"] = load["quantization_config"].bnb_4bit_compute_dtype
        if settings["model"]["id"] == "tiny-random":
            torch.set_num_threads(1)  # tiny matrices: threads cost more than they save
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, **load)
        if not baseonly:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path)
            if "quantization_config" not in load:
                # Folded into the weights, the adapter costs nothing per token. A 4-bit base
                # keeps it apart: merging would round the adapter into 4 bits.
                model = model.merge_and_unload()
        self.model = model.to(self.device) if "quantization_config" not in load else model
        self.model.eval()
        self.model_name = settings["model"]["id"] + ("" if baseonly else "-finetuned")
        vocab = self.tokenizer.get_vocab()
        ends = {vocab[t] for t in END_TOKENS if t in vocab}
        eos = self.model.generation_config.eos_token_id
        ends.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.end_ids = ends
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(ends, default=0))
        self.context = int(getattr(self.model.config, "max_position_embeddings", 4096))

    def generate(self, rows: list[Row]) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        torch = self.torch
        width = max(len(row.prompt) for row in rows)
        # Left padding, masked out: every row's next token comes from the last column.
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt)) + r.prompt for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=self.device)

        class Deliver(StoppingCriteria):
            """Called by generate after every step: each row takes its token, and says if it is done."""

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                last = input_ids[:, -1].tolist()
                return torch.tensor([row.add(t) for row, t in zip(rows, last, strict=True)], device=input_ids.device)

        temperature, top_p, top_k = rows[0].sampling
        options: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(row.limit for row in rows),
                pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([Deliver()]),
                **options,
            )
