"""A smoke run of the whole pipeline on the tiny random model, in a copy of this workspace:
build the model, fine-tune, and answer one prompt. Skipped for real models (they are large);
run it after setting up the environment to check that everything works together.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tuner.settings import adapter_dir

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.smoke

STEPS = [
    ["setup/download_model.py"],
    ["finetuning/invoke_olive.py"],
    ["inference/console_chat.py", "--prompt", "The puppy fell asleep on my lap again."],
]
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv*", "venv", "model-cache", "models", "__pycache__", ".pytest_cache", ".ruff_cache"
)


def test_pipeline(settings: dict[str, Any], tmp_path: Path) -> None:
    if settings["model"]["id"] != "tiny-random":
        pytest.skip(f"the smoke run uses tiny-random only; this workspace fine-tunes {settings['model']['id']}")
    missing = [step[0] for step in STEPS if not (ROOT / step[0]).is_file()]
    if missing:
        pytest.skip(f"pipeline scripts missing: {', '.join(missing)}")
    work = tmp_path / "workspace"
    shutil.copytree(ROOT, work, ignore=NOT_COPIED)
    output = ""
    for step in STEPS:
        result = subprocess.run(
            [sys.executable, *step], cwd=work, capture_output=True, text=True, timeout=900, check=False
        )
        assert result.returncode == 0, (
            f"python {' '.join(step)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        output = result.stdout
    adapter = adapter_dir(work)
    assert adapter.is_dir() and any(adapter.iterdir()), f"no adapter written to {adapter}"
    assert output.strip(), "the chat printed no answer"
