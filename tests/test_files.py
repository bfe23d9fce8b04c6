"""tuner/files.py: replace_folder, killed at every step of the swap, leaves the previous folder or
the new one, whole; recover_folder (which the next replace_folder calls first) finishes the swap.
Each caller is killed at the swap in its own tests: test_runs.py (the adapter), test_hub.py (the
model download, the offline copy), test_onnx.py (the ONNX export), test_remote.py (the fetch)."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest
from tuner import files

OLD = {"config.json": "old", "a.bin": "old-a", "b.bin": "old-b"}
NEW = {"config.json": "new", "a.bin": "new-a", "c.bin": "new-c"}


def write(folder: Path, content: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    for name, text in content.items():
        (folder / name).write_text(text)
    return folder


def read(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


def swap_killed(new: Path, folder: Path, step: str) -> None:
    """In a child process: replace_folder, killed at `step`."""
    replaces: list[str] = []
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(src: Path, dst: Path) -> None:
        replaces.append(str(dst))
        if step == f"rename-{len(replaces)}":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    def rmtree(path: Path, **kw: object) -> None:
        if step == "delete-start":
            os.kill(os.getpid(), signal.SIGKILL)
        if step == "delete-halfway":  # one file of the old folder deleted, the rest still there
            next(Path(path).iterdir()).unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        real_rmtree(path, **kw)

    files.os.replace = replace  # type: ignore[assignment]  (the child's own modules)
    files.shutil.rmtree = rmtree  # type: ignore[assignment]
    files.replace_folder(new, folder)


@pytest.mark.parametrize("step", ["rename-1", "rename-2", "delete-start", "delete-halfway"])
def test_a_kill_at_any_step_keeps_one_whole_folder(tmp_path: Path, step: str) -> None:
    folder = write(tmp_path / "model", OLD)
    new = write(tmp_path / ".staging", NEW)
    child = multiprocessing.get_context("fork").Process(target=swap_killed, args=(new, folder, step))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    previous = files.previous_of(folder)
    # Right after the kill: the folder is whole (old or new), or missing with the old one aside.
    if folder.exists():
        assert read(folder) in (OLD, NEW)
    else:
        assert read(previous) == OLD
    # The repair: the old folder back (the new one never arrived), or the swap finished.
    files.recover_folder(folder)
    expected = OLD if step in ("rename-1", "rename-2") else NEW
    assert read(folder) == expected and not previous.exists()
    # A next replace_folder finishes the job.
    if expected == OLD:
        files.replace_folder(new, folder)
        assert read(folder) == NEW and not new.exists() and not previous.exists()


def test_replace_folder_puts_the_new_folder_in_place(tmp_path: Path) -> None:
    new = write(tmp_path / ".staging", NEW)
    files.replace_folder(new, tmp_path / "model")  # no previous folder
    assert read(tmp_path / "model") == NEW and not new.exists()
    files.replace_folder(write(tmp_path / ".staging", OLD), tmp_path / "model")
    assert read(tmp_path / "model") == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replace_folder_finishes_a_stopped_swap_first(tmp_path: Path) -> None:
    """A swap killed while deleting the old folder leaves both; the next replace_folder deletes
    the rest of the old one before moving the current one aside (a rename onto it would fail)."""
    folder = write(tmp_path / "model", OLD)
    write(files.previous_of(folder), {"b.bin": "older"})  # what a kill halfway through the delete left
    files.replace_folder(write(tmp_path / ".staging", NEW), folder)
    assert read(folder) == NEW and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # Killed between the renames: only the old folder, aside; recover_folder puts it back.
    shutil.move(folder, files.previous_of(folder))
    assert files.recover_folder(folder) is True and read(folder) == NEW
    assert files.recover_folder(folder) is False and read(folder) == NEW
