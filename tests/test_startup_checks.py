"""Settings that would do the wrong thing are refused at start, in one line, before any model
loads: an empty [serve] host (every interface, IPv4 and IPv6) and an [onnx] precision the export
cannot build. A bare tiny-random render is enough: the checks come before the model is needed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import free_port, run_py


@pytest.fixture
def ws(render_factory, tmp_path: Path) -> Path:
    dst = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform="cpu", mode="local"), dst)
    return dst


def set_value(ws: Path, section: str, key: str, value: str) -> None:
    path = ws / "settings.toml"
    text = path.read_text("utf-8")
    table = re.search(rf"^\[{section}\]\n(?:(?!\[).*\n)*", text, flags=re.M)
    assert table, section
    body, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", table.group(0), count=1, flags=re.M)
    assert n == 1, (section, key)
    path.write_text(text[: table.start()] + body + text[table.end() :], "utf-8")


def one_line(result) -> str:
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("how", ["settings", "--set", "--host"])
def test_an_empty_serve_host_is_refused(ws: Path, how: str) -> None:
    args = ["--port", str(free_port())]
    if how == "settings":
        set_value(ws, "serve", "host", '""')
    else:
        args += ["--set", "serve.host="] if how == "--set" else ["--host", " "]
    line = one_line(run_py(ws, "inference/gradio_chat.py", *args, timeout=300))
    assert "serve.host" in line and '"127.0.0.1"' in line and '"0.0.0.0"' in line, line


def test_an_unknown_onnx_precision_is_refused_by_the_export(ws: Path) -> None:
    set_value(ws, "onnx", "precision", '"int8"')
    line = one_line(run_py(ws, "inference/export.py", "--format", "onnx", timeout=300))
    assert 'onnx.precision = "int8" is not valid: it must be one of "int4", "fp16", "fp32"' in line, line


def test_an_unknown_onnx_precision_is_refused_by_the_chat(ws: Path) -> None:
    """Not "run export.py --format onnx --precision int8", which argparse would refuse."""
    set_value(ws, "onnx", "precision", '"int8"')
    line = one_line(run_py(ws, "inference/console_chat.py", "--backend", "onnx", "--prompt", "hi", timeout=300))
    assert 'onnx.precision = "int8" is not valid: it must be one of "int4", "fp16", "fp32"' in line, line
    assert "--precision" not in line, line
