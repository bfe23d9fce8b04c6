"""settings.toml, the workspace's one settings file, read by every script through load_settings()."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ("<<<<<<<", "=======", ">>>>>>>")  # what a `copier update` conflict leaves behind


def load_settings(path: Path = ROOT / "settings.toml") -> dict[str, Any]:
    """The parsed settings; a missing or broken file stops the script with one line naming the
    file and the line, never a traceback."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        sys.exit(f"error: cannot read {path}: {err}")
    for number, line in enumerate(text.split("\n"), start=1):
        if line.startswith(MARKERS):
            sys.exit(
                f"error: {path}:{number}: a conflict marker left by `copier update`: keep the lines you want, "
                "delete the <<<<<<< ======= >>>>>>> lines, then run again"
            )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends with "(at line N, column M)"
        sys.exit(f"error: {path}: invalid TOML: {err}")
