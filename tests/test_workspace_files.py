"""The Makefile, the dev container, the editor settings and the workspace's pyproject.toml."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import yaml
from conftest import PYTHON, REPO
from envkit import (
    REMOTE_TARGETS,
    SCHEMA,
    VERSIONS,
    make_n,
)

# ---------------------------------------------------------------- Makefile


def test_makefile_targets(ws) -> None:
    root, answers = ws
    expected = {
        "setup": "bash setup/setup.sh",
        "download": "setup/download_model.py",
        "finetune": "finetuning/invoke_olive.py",
        "chat": "inference/console_chat.py",
        "serve": "inference/gradio_chat.py",
        "test": "-m pytest tests",
        "export": "inference/export.py",
        "export-onnx": "inference/export.py --format onnx",
    }
    for target, command in expected.items():
        result = make_n(root, target)
        assert result.returncode == 0 and command in result.stdout, f"make {target}: {result.stderr}"
    info = next(
        m for m in yaml.safe_load((REPO / "includes" / "models.yml").read_text()) if m["id"] == answers["model"]
    )
    has_onnx = bool(info["onnx"] and answers["platform"] in info["onnx"]["variants"])
    result = make_n(root, "download-onnx")
    assert (result.returncode == 0) == has_onnx
    if has_onnx:
        assert "setup/download_onnx.py" in result.stdout
    for target in REMOTE_TARGETS:
        result = make_n(root, target)
        if answers["mode"] == "local":
            assert result.returncode != 0, f"make {target} exists in a local workspace"
        else:
            assert result.returncode == 0 and f"infra/remote.py {target}" in result.stdout
    help_text = subprocess.run(["make"], cwd=root, capture_output=True, text=True, check=True).stdout
    assert "make finetune" in help_text


# ---------------------------------------------------------------- dev container and editor


def test_devcontainer(ws) -> None:
    root, answers = ws
    path = root / ".devcontainer" / "devcontainer.json"
    result = subprocess.run(
        [PYTHON, "-m", "check_jsonschema", "--schemafile", str(SCHEMA), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = json.loads(path.read_text("utf-8"))
    assert config["image"].startswith("nvidia/cuda:")
    assert config["hostRequirements"]["gpu"] == "optional"
    assert "--gpus" not in " ".join(config.get("runArgs", []))
    assert 7860 in config["forwardPorts"]
    assert "setup/setup.sh" in config["postCreateCommand"]
    features = config["features"]
    assert features["ghcr.io/devcontainers/features/python:1"]["version"] == VERSIONS["python"]
    has_az = any("azure-cli" in f for f in features)
    assert has_az == (answers["mode"] != "local")
    assert not (root / ".devcontainer" / "Dockerfile").exists()


def test_devcontainer_schema_bites(tmp_path: Path, render_factory) -> None:
    """The minimal schema catches a misspelt key and a wrong gpu value."""
    root = render_factory(model="tiny-random", platform="cpu")
    config = json.loads((root / ".devcontainer" / "devcontainer.json").read_text("utf-8"))
    for bad in ({"hostRequirement": {"gpu": "optional"}}, {"hostRequirements": {"gpu": "maybe"}}):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**config, **bad}))
        result = subprocess.run(
            [PYTHON, "-m", "check_jsonschema", "--schemafile", str(SCHEMA), str(path)],
            capture_output=True,
            check=False,
        )
        assert result.returncode == 1, bad


def test_vscode(ws) -> None:
    root, answers = ws
    vscode = root / ".vscode"
    launch = json.loads((vscode / "launch.json").read_text("utf-8"))
    programs = {c.get("program", "").replace("${workspaceFolder}/", "") for c in launch["configurations"]}
    for script in ("finetuning/invoke_olive.py", "inference/console_chat.py", "inference/gradio_chat.py"):
        assert script in programs
        assert (root / script).is_file(), f"launch.json runs {script}, which the render lacks"
    recommendations = json.loads((vscode / "extensions.json").read_text("utf-8"))["recommendations"]
    assert {"ms-python.python", "charliermarsh.ruff"} <= set(recommendations)
    assert ("ms-azuretools.vscode-bicep" in recommendations) == (answers["mode"] != "local")
    settings = json.loads((vscode / "settings.json").read_text("utf-8"))
    assert settings["python.testing.pytestArgs"] == ["tests"]


def test_workspace_pyproject_and_python(ws) -> None:
    root, _ = ws
    pyproject = tomllib.loads((root / "pyproject.toml").read_text("utf-8"))
    assert pyproject["tool"]["ruff"]["line-length"] == 120
    assert pyproject["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    for args in (["check", "tests"], ["format", "--check", "tests"]):
        result = subprocess.run([PYTHON, "-m", "ruff", *args], cwd=root, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
