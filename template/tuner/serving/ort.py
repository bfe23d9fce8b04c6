"""The chat engine on ONNX Runtime GenAI: the same interface as tuner.serving.hf.Engine.

It loads the model exported by `inference/export.py --format onnx` (models/onnx/<precision>/) and the
fine-tuned adapter file through og.Adapters, formats the conversation with the model's own
chat template (the one it was fine-tuned with), and streams the answer token by token until an
end-of-turn token, a stop string or the limit. With baseonly=True and no export, it falls back
to the published int4 model fetched by setup/download_onnx.py.

    from tuner.serving.ort import OnnxEngine
    engine = OnnxEngine(settings, root)   # [onnx] precision + adapter
    print(engine.reply(conversation([], "The puppy fell asleep on my lap again.", settings)))
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuner.serving.engine import END_TOKENS, ChatEngine, EngineError
from tuner.settings import in_workspace

ADAPTER_FILE = "adapter.onnx_adapter"


def export_dir(settings: dict[str, Any], root: Path, precision: str) -> Path:
    """Where `inference/export.py --format onnx` writes the model at `precision`."""
    return in_workspace(root, settings["onnx"]["output_dir"]) / precision


def downloaded_dir(settings: dict[str, Any], root: Path) -> Path | None:
    """The published ONNX model for this platform, if setup/download_onnx.py fetched it."""
    onnx = settings["onnx"]
    if not (onnx["repo"] and onnx["variant"]):
        return None
    path = in_workspace(root, onnx["path"]) / onnx["variant"]
    return path if (path / "genai_config.json").is_file() else None


class OnnxEngine(ChatEngine):
    """onnxruntime-genai: the exported model, with the adapter file through og.Adapters."""

    def __init__(
        self, settings: dict[str, Any], root: Path, baseonly: bool = False, precision: str | None = None
    ) -> None:
        super().__init__()
        self.settings = settings
        precision = precision or settings["onnx"]["precision"]
        command = "python inference/export.py --format onnx" + (
            "" if precision == "int4" else f" --precision {precision}"
        )
        path = export_dir(settings, root, precision)
        adapter = path / ADAPTER_FILE
        if not (path / "genai_config.json").is_file():
            fallback = downloaded_dir(settings, root) if baseonly and precision == "int4" else None
            if fallback is None:
                raise EngineError(f"ONNX model not found in {path}: run `{command}` first")
            path = fallback
        elif not baseonly and not adapter.is_file():
            raise EngineError(f"adapter file {adapter} is missing: run `{command}` again")
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        self.og = og
        config = og.Config(str(path))
        threads = settings["model"]["threads"]
        if threads:  # [model] threads, as in the torch engine
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.adapters = None
        if not baseonly:
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter), "finetuned")
        # The Hugging Face tokenizer of the base model, for the very same chat template as the
        # torch path; the export's copy where the base model was never downloaded.
        base = in_workspace(root, settings["model"]["path"])
        self.tokenizer = AutoTokenizer.from_pretrained(base if (base / "config.json").is_file() else path)
        self.model_name = settings["model"]["id"] + ("" if baseonly else "-finetuned") + f"-onnx-{precision}"
        self.path = path
        genai = json.loads((path / "genai_config.json").read_text("utf-8"))["model"]
        eos = genai.get("eos_token_id", [])
        vocab = self.tokenizer.get_vocab()
        self.end_ids = {vocab[t] for t in END_TOKENS if t in vocab} | set(eos if isinstance(eos, list) else [eos])
        self.context = int(genai.get("context_length", 4096))

    def tokens(
        self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, top_k: int
    ) -> Iterator[int]:
        import numpy as np

        og = self.og
        params = og.GeneratorParams(self.model)
        search: dict[str, Any] = {"max_length": len(ids) + max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            search.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else 0)
        params.set_search_options(**search)
        generator = og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, "finetuned")
        generator.append_tokens(np.array([ids], dtype=np.int32))
        for _ in range(max_new_tokens):
            if generator.is_done():
                break
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])
