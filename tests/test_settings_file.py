"""settings.toml is read by every script through one function: a broken file (a `copier update`
conflict, invalid TOML) stops each script with one line naming the file and the line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_py

SCRIPTS = [
    "finetuning/invoke_olive.py",
    "finetuning/evaluate_adapter.py",
    "setup/download_model.py",
    "setup/download_onnx.py",
    "inference/console_chat.py",
    "inference/gradio_chat.py",
    "inference/export_onnx.py",
]

CONFLICT = """<<<<<<< before updating
max_new_tokens = 128
=======
max_new_tokens = 256
>>>>>>> after updating
"""


@pytest.fixture(scope="module")
def broken(render_factory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    src = render_factory(model="tiny-random", platform="cpu", mode="local")
    workspaces = {}
    for name in ("conflict", "invalid"):
        ws = tmp_path_factory.mktemp(name) / "ws"
        shutil.copytree(src, ws)
        text = (ws / "settings.toml").read_text("utf-8")
        if name == "conflict":
            text = text.replace("max_new_tokens = 128\n", CONFLICT)
        else:
            text = text.replace("max_new_tokens = 128", "max_new_tokens = = 128")
        (ws / "settings.toml").write_text(text, "utf-8")
        workspaces[name] = ws
    return workspaces


def line_of(ws: Path, start: str) -> int:
    return next(n for n, line in enumerate((ws / "settings.toml").read_text().split("\n"), 1) if line.startswith(start))


@pytest.mark.parametrize("kind", ["conflict", "invalid"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_broken_settings_give_one_line_with_the_line_number(broken: dict[str, Path], script: str, kind: str) -> None:
    ws = broken[kind]
    run = run_py(ws, script)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1, run.stderr
    if kind == "conflict":
        line = line_of(ws, "<<<<<<<")
        assert f"settings.toml:{line}: a conflict marker left by `copier update`" in run.stderr
        assert "delete the <<<<<<< ======= >>>>>>> lines" in run.stderr
    else:
        assert "settings.toml: invalid TOML:" in run.stderr
        assert f"(at line {line_of(ws, 'max_new_tokens')}, column" in run.stderr
