"""load_engine(): the chat engine the settings (or the command line) ask for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuner.chat import ChatEngine


def load_engine(settings: dict[str, Any], root: Path, backend: str | None = None, baseonly: bool = False) -> ChatEngine:
    """The engine for `backend` (torch or onnx; default [chat] backend). EngineError says
    what to run first (download, fine-tune, export)."""
    if (backend or settings["chat"]["backend"]) == "onnx":
        from tuner.onnx_engine import OnnxEngine  # onnxruntime-genai only when asked for

        return OnnxEngine(settings, root, baseonly=baseonly)
    from tuner.torch_engine import Engine

    return Engine(settings, root, baseonly=baseonly)
