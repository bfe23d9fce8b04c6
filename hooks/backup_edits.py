"""copier update migration (stage "before"): keep a copy of the files users edit most.

`copier update` merges template changes into your workspace and marks conflicts inline; this
copies settings.toml and finetuning/olive-config.json, as they were before the update, to
.copier-backup/<old version>/ so a conflict resolved the wrong way loses nothing.
Runs in the workspace folder; copier passes the old version in $VERSION_FROM.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

FILES = ["settings.toml", "finetuning/olive-config.json"]


def main() -> None:
    workspace = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()
    version = re.sub(r"[^\w.+-]", "_", os.environ.get("VERSION_FROM") or "unknown")
    backup = workspace / ".copier-backup" / version
    for name in FILES:
        source = workspace / name
        if source.is_file():
            (backup / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, backup / name)
    print(f"copier-finetune: your settings before the update are in {backup.relative_to(workspace)}")


if __name__ == "__main__":
    main()
