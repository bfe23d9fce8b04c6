"""The workspace's own tests pass and catch a bad dataset; its README names only files and
commands that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from conftest import PYTHON
from envkit import (
    PHI3,
    REMOTE_TARGETS,
    make_n,
    run_setup,
    settings_of,
)

# ---------------------------------------------------------------- workspace tests


def test_workspace_tests_fast(render_factory) -> None:
    """The workspace's own checks pass on a fresh render (the smoke run is slow: deselected)."""
    for answers in (
        {"model": "tiny-random", "platform": "cpu"},
        {"model": PHI3, "platform": "cuda", "mode": "both"},
    ):
        root = render_factory(**answers)
        result = subprocess.run(
            [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not smoke", "tests"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-4000:]


def test_workspace_tests_catch_bad_dataset(render_factory, tmp_path: Path) -> None:
    root = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform="cpu"), root)
    with (root / "dataset" / "sample.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"phrase": "no tone here"}\n')
    result = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_dataset.py"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1 and "column 'tone' is missing" in result.stdout


# ---------------------------------------------------------------- README

WORKSPACE_PATH = re.compile(
    r"(?<![\w./-])((?:setup|finetuning|inference|dataset|tests|infra|\.vscode|\.devcontainer)"
    r"(?:[/\\][\w.-]+)+|settings\.toml|pyproject\.toml|Makefile)"
)


def readme_paths(text: str) -> set[str]:
    return {m.replace("\\", "/") for m in WORKSPACE_PATH.findall(text)}


def readme_commands(text: str) -> tuple[set[str], set[str]]:
    """(python scripts, make targets) the README shows, in code blocks or inline code."""
    code = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
    scripts, targets = set(), set()
    for chunk in code:
        scripts |= set(re.findall(r"(?:^|[\s:])python\s+([\w/.-]+\.py)\b", chunk, flags=re.M))
        targets |= set(re.findall(r"(?:^|\s|`)make\s+([a-z][\w-]*)", chunk, flags=re.M))
    return scripts, targets


def test_readme_is_true(ws) -> None:
    root, answers = ws
    text = (root / "README.md").read_text("utf-8")
    settings = settings_of(root)
    user_files = {settings["dataset"]["path"]} if settings["dataset"]["source"] == "local" else set()
    missing = sorted(p for p in readme_paths(text) - user_files if not (root / p).exists())
    assert not missing, f"README names files the render lacks: {missing}"

    scripts, targets = readme_commands(text)
    shown = {"setup/download_model.py", "inference/console_chat.py", "inference/gradio_chat.py"}
    if answers["mode"] != "remote":
        shown.add("finetuning/invoke_olive.py")
    assert shown <= scripts
    for script in sorted(scripts):
        result = subprocess.run(
            [PYTHON, script, "--help"], cwd=root, capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, f"python {script} --help failed:\n{result.stderr[-2000:]}"
    for target in sorted(targets - {"help"}):
        assert make_n(root, target).returncode == 0, f"README shows `make {target}`, the Makefile lacks it"
    assert run_setup(root, "--help").returncode == 0

    # Only the sections for its own answers, and the outputs where settings.toml puts them.
    assert "models/adapter" in text
    assert settings["model"]["path"] in text
    assert ("infra/remote.py" in text) == (answers["mode"] != "local")
    if answers["mode"] != "local":
        assert set(REMOTE_TARGETS) <= targets
    assert ("DirectML" in text) == (answers["platform"] == "windows-gpu")
    assert ("WSL2" in text) == (answers["platform"] == "windows-gpu")
    assert ("make finetune" in text) == (answers["mode"] != "remote")
    assert "--set train." in text and "settings.toml" in text and "olive-config.json" in text
