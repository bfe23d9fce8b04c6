"""Drop files from a wheel in place (and their lines from its RECORD): scripts/gpu_wheels.sh uses it
to carry bitsandbytes without the libraries built for the GPUs the GPU machine does not have.

    python scripts/slim_wheel.py WHEEL REGEX   # REGEX: full match of the paths to drop
"""

from __future__ import annotations

import os
import re
import sys
import zipfile


def slim(path: str, pattern: str) -> int:
    """Rewrite `path` without the members whose name matches `pattern`; how many were dropped."""
    drop = re.compile(pattern)
    dropped = 0
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if drop.fullmatch(item.filename):
                dropped += 1
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                # RECORD lists every file with its hash: a line for a dropped file would lie.
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not drop.fullmatch(line.split(",")[0])).encode()
            dst.writestr(item, data)
    os.replace(path + ".tmp", path)
    return dropped


if __name__ == "__main__":
    print(f"{sys.argv[1]}: {slim(sys.argv[1], sys.argv[2])} files dropped")
