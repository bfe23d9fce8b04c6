"""Get the base model into model-cache/: download it from the Hugging Face Hub, or build
tiny-random offline.

    python setup/download_model.py

Downloads show progress and resume where they stopped. For gated models (Llama, Mistral),
accept the licence on the model's Hub page, then set HF_TOKEN (never stored in any file).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = tomllib.loads((ROOT / "settings.toml").read_text("utf-8"))


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def fetch(repo: str, revision: str | None, dest: Path, allow_patterns: list[str]) -> None:
    """snapshot_download with one clear line (and exit 1) for each way it fails. Partial files
    resume on the next run. Also used by setup/download_onnx.py."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        snapshot_download(
            repo,
            revision=revision or None,
            local_dir=dest,
            token=os.environ.get("HF_TOKEN") or None,
            allow_patterns=allow_patterns,
        )
    except GatedRepoError:
        fail(f"{repo} is gated and this token has no access: accept the licence at https://huggingface.co/{repo}")
    except RepositoryNotFoundError:
        fail(f"{repo} not found on the Hugging Face Hub (or HF_TOKEN lacks access)")
    except RevisionNotFoundError:
        fail(f"{repo} has no revision {revision!r}")
    except LocalEntryNotFoundError:
        # Raised when the Hub cannot be reached (or HF_HUB_OFFLINE=1) and nothing is cached.
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        fail(f"cannot reach the Hugging Face Hub to download {repo}{offline}: check the network or proxy")
    except HfHubHTTPError as err:
        fail(f"download of {repo} failed: {str(err).splitlines()[0]}")
    except OSError as err:  # connection errors that escape huggingface_hub, disk full, ...
        fail(f"download of {repo} failed: {err}")


def download(repo: str, revision: str, dest: Path, gated: bool) -> None:
    if gated and not os.environ.get("HF_TOKEN"):
        fail(f"{repo} is gated: accept its licence at https://huggingface.co/{repo}, then export HF_TOKEN=...")
    # Only what transformers needs.
    fetch(repo, revision, dest, ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rebuild tiny-random even if present")
    args = parser.parse_args()

    model = SETTINGS["model"]
    dest = ROOT / model["path"]
    if not model["hf_repo"]:
        if (dest / "config.json").is_file() and not args.force:
            print(f"{model['id']} is already built in {dest.relative_to(ROOT)}")
            return
        subprocess.run([sys.executable, str(ROOT / "setup" / "build_tiny_model.py")], check=True)
        return
    print(f"Downloading {model['hf_repo']} to {dest.relative_to(ROOT)}")
    download(model["hf_repo"], model["revision"], dest, model["gated"])
    print(f"Done: {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
