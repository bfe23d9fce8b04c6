"""tuner/training/runs.py: one fine-tuning run per workspace, checkpoints torn by a kill, and an adapter
published so that a half-written one never looks finished (through invoke_olive.py, and the
functions themselves)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, bare_workspace, killed_at_swap, run_py, set_train
from tuner.training import runs

pytestmark = pytest.mark.slow


def test_torn_checkpoints_are_skipped_and_moved_aside(render_factory, tuned_workspace: Path, tmp_path: Path) -> None:
    """A kill while a checkpoint is written leaves an empty folder, or weights without
    trainer_state.json: the next run resumes from the last complete checkpoint instead."""
    ws = bare_workspace(render_factory, tmp_path, platform="cpu")
    shutil.copytree(tuned_workspace / "model-cache", ws / "model-cache")
    set_train(ws, max_steps=10, save_steps=5)
    first = run_py(ws, "finetuning/invoke_olive.py", "--no-eval")
    assert first.returncode == 0, first.stderr[-3000:]
    [run_dir] = (ws / "models" / "checkpoints").iterdir()
    # As if killed while saving after step 5 (a finished run is not resumed: test_run_guards.py).
    shutil.rmtree(ws / "models" / "adapter")
    os.replace(run_dir / "checkpoint-10", run_dir / "checkpoint-20")  # shape 2: no trainer_state.json
    (run_dir / "checkpoint-20" / "trainer_state.json").unlink()
    (run_dir / "checkpoint-15").mkdir()  # shape 1: killed right after the folder was made
    again = run_py(ws, "finetuning/invoke_olive.py", "--no-eval")
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
    for step in (15, 20):
        assert f"Skipping checkpoint-{step}, written only in part (moved to models/checkpoints/torn/" in again.stdout
        assert (ws / "models" / "checkpoints" / "torn" / f"{run_dir.name}-checkpoint-{step}").is_dir()
    assert "Resuming from checkpoint-5" in again.stdout and "Adapter written to models/adapter" in again.stdout


def test_kill_inside_publish_keeps_the_previous_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """publish_run killed between moving the old adapter aside and putting the new one in place:
    the old one is kept aside, and the next run (start_run's recover_adapter) puts it back."""
    adapter = tmp_path / "models" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("old")
    staging = adapter.with_name("adapter.tmp")
    staging.mkdir()
    (staging / "adapter_config.json").write_text("new")
    killed_at_swap(adapter, lambda: runs.publish_run(staging, adapter, {"run": "abc"}, []))
    assert not adapter.exists() and (tmp_path / "models" / "adapter.previous" / "adapter_config.json").is_file()
    runs.recover_adapter(adapter, tmp_path)
    assert "Restored the previous adapter in models/adapter" in capsys.readouterr().out
    assert (adapter / "adapter_config.json").read_text() == "old"
    assert not (tmp_path / "models" / "adapter.previous").exists()
    # Published again, the new adapter is the one in place, with its run record.
    runs.publish_run(staging, adapter, {"run": "abc"}, [])
    assert (adapter / "adapter_config.json").read_text() == "new" and (adapter / "run.json").is_file()


def test_one_run_at_a_time_and_stale_locks_are_taken_over(
    render_factory, tuned_workspace: Path, tmp_path: Path
) -> None:
    ws = bare_workspace(render_factory, tmp_path, platform="cpu")
    shutil.copytree(tuned_workspace / "model-cache", ws / "model-cache")
    set_train(ws, max_steps=400)
    lock = ws / "models" / ".finetune.lock"
    command = [PYTHON, "finetuning/invoke_olive.py", "--no-eval"]
    first = subprocess.Popen(command, cwd=ws, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not lock.exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert lock.exists() and first.poll() is None
        second = run_py(ws, "finetuning/invoke_olive.py", "--no-eval")
        assert second.returncode == 1 and second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert f"another fine-tuning run is in progress in this workspace (PID {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock.read_text() == str(first.pid)  # a kill leaves the lock behind
    set_train(ws, max_steps=2)
    third = run_py(ws, "finetuning/invoke_olive.py", "--no-eval")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"Taking over the stale lock of PID {first.pid}, which has ended" in third.stderr
    assert not lock.exists()  # released at exit
