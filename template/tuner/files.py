"""Replacing a folder (the adapter, the base model, an ONNX export) so that a kill at any moment
leaves the previous folder or the new one, never neither and never a mix of both.

The swap is two renames: the old folder to `<name>.previous`, the new one to `<name>`, and then
the old one is deleted. A kill between the renames leaves only `<name>.previous`; a kill while
deleting leaves both. recover_folder() finishes either case, and replace_folder() calls it
first. Standard library only: tuner/cloud uses it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def previous_of(folder: Path) -> Path:
    """Where replace_folder() keeps the previous `folder` during the swap."""
    return folder.with_name(folder.name + ".previous")


def recover_folder(folder: Path) -> bool:
    """Finish a replace_folder() that was stopped: put the previous folder back when the new one
    never arrived, or delete it when the new one did. Returns True when it put one back."""
    previous = previous_of(folder)
    if not previous.exists():
        return False
    if folder.exists():  # the swap was done; only deleting the old folder was left
        shutil.rmtree(previous, ignore_errors=True)
        return False
    os.replace(previous, folder)
    return True


def replace_folder(new: Path, folder: Path) -> None:
    """Put the complete folder `new` (on the same file system) in place of `folder`, which may be
    missing. `new` is gone afterwards."""
    recover_folder(folder)
    previous = previous_of(folder)
    if folder.exists():
        os.replace(folder, previous)
    os.replace(new, folder)
    shutil.rmtree(previous, ignore_errors=True)
