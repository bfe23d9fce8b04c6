"""What the benches share: a rendered workspace with its base model in place."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def workspace_env(ws: Path) -> dict[str, str]:
    """The environment a workspace's scripts run in: its package (tuner/) importable, as its setup
    would install it, ahead of any PYTHONPATH already set (packages carried as wheels, say)."""
    path = os.pathsep.join(filter(None, [str(ws), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OLIVE_DISABLE_TELEMETRY": "1", "PYTHONPATH": path}


def workspace(model: str, ws: Path | None, prefix: str) -> Path:
    """A CPU workspace for `model` (rendered from this checkout unless `ws` holds one), with the
    base model downloaded, or built from its offline copy when the Hub is unreachable."""
    ws = ws or Path(tempfile.mkdtemp(prefix=prefix)) / "ws"
    if not (ws / "settings.toml").is_file():
        from copier import run_copy

        data = {"project_name": "bench", "model": model, "platform": "cpu"}
        run_copy(str(REPO), str(ws), data=data, defaults=True, quiet=True, vcs_ref="HEAD")
    subprocess.run([sys.executable, "setup/download_model.py"], cwd=ws, env=workspace_env(ws), check=True)
    return ws
