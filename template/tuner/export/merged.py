"""The adapter merged into the base model: one plain Hugging Face folder that transformers loads
with no peft (AutoModelForCausalLM.from_pretrained), and the source of the GGUF and ONNX exports.

Always written in float32, never in 4 bits: merging into a 4-bit model would round the adapter's
small updates into the 4-bit grid (the "merged QLoRA model is worse" reports). But the weights
under the adapter must be the ones it was trained on: a LoRA adapter learned its updates against
the base as it is, a QLoRA adapter against the base rounded to 4 bits. So a QLoRA adapter's base is
loaded in 4 bits as it was trained, then dequantised to float32 before the merge; merged into the
original weights instead, the demo's QLoRA adapter lost 7 points of exact match (81.0 % to 73.8 %).
The GGUF and ONNX exports convert down from this folder to the precision they are asked for.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tuner.export import ExportError
from tuner.serving.engine import END_TOKENS
from tuner.serving.hf import load_adapter
from tuner.settings import adapter_dir, in_workspace, trained_with
from tuner.training.precision import Device, decide

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


def base_as_trained(settings: dict[str, Any], base: Path, adapter: Path) -> Any:
    """The base model in float32 on the CPU, with the weights the adapter was trained on: as they
    are for LoRA; rounded to 4 bits (the run's quantisation, as the evaluation loads it) and
    dequantised for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    train = (trained_with(adapter) or settings)["train"]
    if train["method"] != "qlora":
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map="cpu")
    from transformers.utils import logging

    precision = decide(train, Device.detect())
    model = AutoModelForCausalLM.from_pretrained(base, **precision.load_kwargs())
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its note on the dtype, said here once: the compute dtype, then float32
    try:
        # In the compute dtype: the values the 4-bit layers handed their matmuls during training.
        model = model.dequantize(dtype=getattr(torch, precision.compute_dtype))
    finally:
        logging.set_verbosity(verbosity)
    return model.to("cpu", torch.float32)


def save(model: Any, settings: dict[str, Any], base: Path, out: Path) -> None:
    """A model as a plain Hugging Face folder: model.safetensors, config.json,
    generation_config.json, the base's tokenizer and chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model.generation_config = generation_config(settings, tokenizer, model.generation_config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if (base / CHAT_TEMPLATE_FILE).is_file() and not (out / CHAT_TEMPLATE_FILE).is_file():
        shutil.copy2(base / CHAT_TEMPLATE_FILE, out / CHAT_TEMPLATE_FILE)


def merge(settings: dict[str, Any], root: Path, out: Path) -> None:
    """Write the merged model to the folder `out` (created)."""
    base, adapter = sources(settings, root)
    model = load_adapter(base_as_trained(settings, base, adapter), adapter).merge_and_unload()
    save(model, settings, base, out)


def trained_base(settings: dict[str, Any], root: Path, scratch: Path) -> Path:
    """A folder with the weights under the adapter, for a builder that keeps the adapter apart
    (the ONNX export): the base's own folder for LoRA; for QLoRA its dequantised 4-bit weights,
    written into `scratch`."""
    base, adapter = sources(settings, root)
    if (trained_with(adapter) or settings)["train"]["method"] != "qlora":
        return base
    save(base_as_trained(settings, base, adapter), settings, base, scratch)
    return scratch
