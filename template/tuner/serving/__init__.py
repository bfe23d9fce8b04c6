"""Chat and serving: the engine base and its backends, vLLM, the OpenAI-compatible API, the ONNX export.

load_engine() picks the backend the settings (or the command line) ask for; each backend's
libraries are imported only when it is picked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuner.serving.engine import ChatEngine


def load_engine(settings: dict[str, Any], root: Path, backend: str | None = None, baseonly: bool = False) -> ChatEngine:
    """The engine for `backend` (torch, onnx or gguf; default [chat] backend). EngineError says
    what to run first (download, fine-tune, export)."""
    backend = backend or settings["chat"]["backend"]
    if backend == "onnx":
        from tuner.serving.ort import OnnxEngine  # onnxruntime-genai only when asked for

        return OnnxEngine(settings, root, baseonly=baseonly)
    if backend == "gguf":
        from tuner.serving.llamacpp import LlamaCppEngine  # llama-cpp-python only when asked for

        return LlamaCppEngine(settings, root, baseonly=baseonly)
    from tuner.serving.hf import Engine

    return Engine(settings, root, baseonly=baseonly)
