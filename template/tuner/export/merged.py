"""The adapter merged into the base model: one plain Hugging Face folder that transformers loads
with no peft (AutoModelForCausalLM.from_pretrained), and the source of the GGUF and ONNX exports.

The base is loaded in float32, never in 4 bits, whatever the adapter was trained on: merging into
a 4-bit base would round the adapter's small updates into the 4-bit grid (the "merged QLoRA model
is worse" reports), while the full-precision base plus the adapter is exactly the model the
held-out evaluation scored. float32 keeps that sum exact; the GGUF and ONNX exports convert down
from it to the precision they are asked for.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tuner.export import ExportError
from tuner.serving.engine import END_TOKENS
from tuner.serving.hf import load_adapter
from tuner.settings import adapter_dir, in_workspace, trained_with

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 writes the template here


def sources(settings: dict[str, Any], root: Path) -> tuple[Path, Path]:
    """The base model folder and the adapter folder, or ExportError saying what to run first."""
    base = in_workspace(root, settings["model"]["path"])
    adapter = adapter_dir(root)
    if not (base / "config.json").is_file():
        raise ExportError(f"base model not found in {base}: run `python setup/download_model.py` first")
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"adapter not found in {adapter}: run `python finetuning/invoke_olive.py` first")
    trained = trained_with(adapter)
    if trained is not None and trained["model"]["id"] != settings["model"]["id"]:
        raise ExportError(
            f"the adapter in {adapter} was trained on {trained['model']['id']}, not on [model] id = "
            f"{settings['model']['id']}: fine-tune again, or set the model it was trained on"
        )
    return base, adapter


def end_token_ids(tokenizer: Any, eos: int | list[int] | None) -> list[int]:
    """The tokens that end a turn: the chat engine's END_TOKENS the vocabulary has, and the base's
    own eos. Without them in generation_config.json, plain transformers (and every tool reading the
    folder) generates past the end of the answer."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_TOKENS if t in vocab}
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def generation_config(settings: dict[str, Any], tokenizer: Any, base: Any) -> Any:
    """The base's generation config with our end-of-turn tokens and [chat]'s sampling defaults
    (temperature 0: greedy)."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_dict(base.to_dict())
    config._from_model_config = False  # ours now: transformers must not rebuild it from config.json
    config.eos_token_id = end_token_ids(tokenizer, base.eos_token_id)
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.eos_token_id[0]
    chat = settings["chat"]
    config.max_new_tokens = chat["max_new_tokens"]
    if chat["temperature"] > 0:
        config.do_sample = True
        config.temperature, config.top_p, config.top_k = chat["temperature"], chat["top_p"], chat["top_k"]
    else:  # sampling values beside do_sample=False make transformers warn at every generate
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    return config


def merge(settings: dict[str, Any], root: Path, out: Path) -> None:
    """Write the merged model to the folder `out` (created): model.safetensors, config.json,
    generation_config.json, the tokenizer and the chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = sources(settings, root)
    # float32 on the CPU, never quantized: a QLoRA adapter's run.json asks for a 4-bit base, which
    # is ignored here on purpose (see the module's docstring).
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = load_adapter(model, adapter).merge_and_unload()
    model.generation_config = generation_config(settings, tokenizer, model.generation_config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if (base / CHAT_TEMPLATE_FILE).is_file() and not (out / CHAT_TEMPLATE_FILE).is_file():
        shutil.copy2(base / CHAT_TEMPLATE_FILE, out / CHAT_TEMPLATE_FILE)
