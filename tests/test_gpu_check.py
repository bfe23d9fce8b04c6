"""bench/gpu_check.sh in its CPU plumbing mode: every step of the GPU check (render, offline model,
the four fine-tuning runs, precision policy, both benches, the table) runs here on a tiny model, so
the check is known to work before a GPU machine is lent (about 90 s on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_plumbing(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_CPU": "1", "PYTHON": sys.executable, "OUT": str(tmp_path)}
    run = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = (tmp_path / "table.txt").read_text("utf-8")
    assert table.strip() in run.stdout
    for name in ("invoke_olive-lora", "train_sft-lora"):
        row = next(line for line in table.splitlines() if line.startswith(name))
        assert row.split()[1] == "ok", row
    # QLoRA on the CPU: refused today, allowed once the trainers use the precision policy.
    for name in ("invoke_olive-qlora", "train_sft-qlora"):
        row = next(line for line in table.splitlines() if line.startswith(name))
        assert row.split()[1] in ("ok", "refused"), row
    assert "precision qlora on cpu: compute float32" in table
    assert "ours / anchor:" in table and "engine, 2 clients at once" in table
    measured = json.loads((tmp_path / "measurements.json").read_text("utf-8"))
    assert measured["run-train_sft-lora"]["train"]["steps"] == 3
    assert measured["run-train_sft-lora"]["train"]["tokens"] > 0
    assert (tmp_path / "logs.txt").is_file()
