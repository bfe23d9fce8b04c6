"""The bookkeeping of a fine-tuning run: one run per workspace, checkpoints that may be torn by a
kill, and publishing the adapter so that a half-written one never looks finished."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
from pathlib import Path


class RunError(Exception):
    """A run that cannot start, said in one line."""


def take_lock(path: Path) -> None:
    """One fine-tuning run per workspace: a lock file holding the PID, removed at exit. A lock
    left by a process that is gone (killed, machine restarted) is taken over."""
    import psutil  # installed with accelerate

    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = path.read_text("utf-8").strip()
            # The PID must be alive and older than the lock (PIDs are reused after a reboot).
            try:
                alive = holder.isdigit() and psutil.Process(int(holder)).create_time() <= path.stat().st_mtime + 1
            except (psutil.Error, OSError):  # the process (or the lock) is gone
                alive = False
            if alive:
                busy = f"another fine-tuning run is in progress in this workspace (PID {holder}, lock {path})"
                raise RunError(busy) from None
            print(f"Taking over the stale lock of PID {holder or '?'}, which has ended", file=sys.stderr)
            path.unlink(missing_ok=True)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        atexit.register(path.unlink, missing_ok=True)
        return
    raise RunError(f"cannot take the lock {path}: another run took it at the same moment")


def last_complete_checkpoint(folder: Path, root: Path) -> Path | None:
    """The newest checkpoint that was written completely (trainer_state.json, written last, is
    there and parses). Torn ones, from a run killed while saving, are moved aside to torn/."""
    good = None
    for checkpoint in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text("utf-8"))
            good = checkpoint
        except (OSError, ValueError):
            aside = folder.parent / "torn" / f"{folder.name}-{checkpoint.name}"
            shutil.rmtree(aside, ignore_errors=True)
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(checkpoint, aside)
            print(f"Skipping {checkpoint.name}, written only in part (moved to {aside.relative_to(root)})")
    return good


def publish(new: Path, adapter: Path) -> None:
    """Put `new` in place of `adapter` by two renames, keeping the previous adapter until the
    new one is in place; a kill between them is repaired by recover_adapter()."""
    previous = adapter.with_name(adapter.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if adapter.exists():
        os.replace(adapter, previous)
    os.replace(new, adapter)
    shutil.rmtree(previous, ignore_errors=True)


def recover_adapter(adapter: Path, root: Path) -> None:
    previous = adapter.with_name(adapter.name + ".previous")
    if previous.is_dir() and not adapter.exists():
        os.replace(previous, adapter)
        print(f"Restored the previous adapter in {adapter.relative_to(root)} (a run was stopped while publishing)")
