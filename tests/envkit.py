"""What the environment tests share: the pinned version set, the Makefile targets the README
shows, readers for requirement files, and running setup/setup.sh."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import yaml
from conftest import REPO
from packaging.requirements import Requirement

VERSIONS: dict = yaml.safe_load((REPO / "includes" / "versions.yml").read_text("utf-8"))
PIP = "-m pip install --disable-pip-version-check"
SCHEMA = REPO / "tests" / "schemas" / "devcontainer.schema.json"
COMMON = set(VERSIONS["common"])
ORT_GENAI = {"onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml"}
REMOTE_TARGETS = [
    "provision-finetuning",
    "set-secret",
    "upload",
    "run-finetuning",
    "status",
    "logs",
    "fetch",
    "provision-inference",
    "deploy-inference",
    "endpoint",
]
LOCAL_TARGETS = ["setup", "download", "finetune", "chat", "serve", "test", "export-onnx"]
PHI3 = "microsoft/Phi-3-mini-4k-instruct"
LLAMA = "meta-llama/Llama-3.2-1B-Instruct"


def settings_of(root: Path) -> dict:
    return tomllib.loads((root / "settings.toml").read_text("utf-8"))


def read_requirements(path: Path) -> tuple[dict[str, Requirement], list[str], list[str]]:
    """Requirements by name, the options (--extra-index-url ...) and the nested -r files."""
    reqs: dict[str, Requirement] = {}
    options: list[str] = []
    nested: list[str] = []
    for line in path.read_text("utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            nested.append(line[3:].strip())
        elif line.startswith("--"):
            options.append(line)
        else:
            req = Requirement(line)
            assert req.name not in reqs, f"{path.name}: {req.name} listed twice"
            reqs[req.name] = req
    return reqs, options, nested


def pinned(req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{req} is not pinned exactly"
    return specs[0].version


def expected_files(platform: str, mode: str) -> set[str]:
    files = {"requirements.txt", "requirements-benchmarks.txt", "requirements-gguf.txt"}
    if platform != "cpu" or mode != "local":
        files |= {"requirements-cuda.txt", "requirements-torch-cuda.txt", "requirements-vllm.txt"}
    if platform == "cpu":
        files |= {"requirements-cpu.txt", "requirements-torch-cpu.txt"}
    if platform == "windows-gpu":
        files.add("requirements-directml.txt")
    return files


TORCH_SKIPPED = f"torch {VERSIONS['torch']} already installed; skipping the PyTorch index"


def run_setup(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "setup/setup.sh", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )


def make_n(root: Path, target: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", target], cwd=root, capture_output=True, text=True, timeout=60, check=False)
