"""settings.toml, the workspace's one settings file, read by every script through load_settings()."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

MARKERS = ("<<<<<<<", "=======", ">>>>>>>")  # what a `copier update` conflict leaves behind


class SettingsError(Exception):
    """A missing or broken settings file, said in one line (file and line)."""


def load_settings(path: Path) -> dict[str, Any]:
    """The parsed settings; SettingsError names the file and the line of what is wrong."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"cannot read {path}: {err}") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if line.startswith(MARKERS):
            raise SettingsError(
                f"{path}:{number}: a conflict marker left by `copier update`: keep the lines you want, "
                "delete the <<<<<<< ======= >>>>>>> lines, then run again"
            )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends with "(at line N, column M)"
        raise SettingsError(f"{path}: invalid TOML: {err}") from None


def in_workspace(root: Path, value: str) -> Path:
    """A path from the settings: relative ones are relative to the workspace root."""
    path = Path(value)
    return path if path.is_absolute() else root / path


def settings_for_script(path: Path) -> dict[str, Any]:
    """For the scripts: the settings, or exit 1 with the one-line error (never a traceback)."""
    try:
        return load_settings(path)
    except SettingsError as err:
        raise SystemExit(f"error: {err}") from None
