"""A smoke run of the whole pipeline on the tiny random model, in a copy of this workspace:
build the model, fine-tune, and answer one prompt of the sample in the trained form. Skipped for
real models (they are large); run it after setting up the environment to check that everything
works together. A missing script fails it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tuner.data import load_rows
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
    assert (adapter / "adapter_config.json").is_file(), f"no adapter written to {adapter}"
    answer = output.strip()
    assert answer, "the chat printed no answer"
    if settings["dataset"]["source"] == "sample":
        # Fine-tuned on the sample, the model answers in the trained form: one of its tones.
        tones = {row["tone"] for row in load_rows(settings, work)}
        assert answer in tones, f"the fine-tuned model answered {answer!r}, not one of the tones {sorted(tones)}"
