"""Exports of the fine-tuned model, each checked on the held-out rows before it is called done."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuner.settings import WorkspaceError, in_workspace


class ExportError(WorkspaceError):
    """An export that cannot be made, or that answers worse than the model it came from."""


def export_folder(settings: dict[str, Any], root: Path, fmt: str, kind: str = "") -> Path:
    """Where an export lives: [export] output_dir / <format>[-<kind>], e.g. models/exports/gguf-q8_0."""
    return in_workspace(root, settings["export"]["output_dir"]) / (f"{fmt}-{kind}" if kind else fmt)
