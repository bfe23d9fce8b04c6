"""The workspace package, tuner/: every module imports with no workspace around it, no import
circle, and no code in a rendered workspace touches sys.path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "template" / "tuner"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_without_a_workspace(module: str, tmp_path: Path) -> None:
    """In an empty folder (no settings.toml, no dataset), importing reads nothing and runs nothing."""
    code = f"import sys, tuner.{module}; print(sorted(m for m in sys.modules if m.startswith('tuner.')))"
    env = {"PYTHONPATH": str(REPO / "template"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not list(tmp_path.iterdir()), "importing wrote files"


def package_imports(module: str) -> set[str]:
    """The tuner modules `module` imports, at any depth of its code."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text("utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tuner."):
            found.add(node.module.removeprefix("tuner."))
        elif isinstance(node, ast.ImportFrom) and node.module == "tuner":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("tuner.") for a in node.names if a.name.startswith("tuner."))
    return found & set(MODULES)


def test_no_import_circle() -> None:
    graph = {module: package_imports(module) for module in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import circle: {' -> '.join([*path, module])}"
        if module in done:
            return
        for child in sorted(graph[module]):
            visit(child, [*path, module])
        done.add(module)

    for module in MODULES:
        visit(module, [])
    assert graph["settings"] == set()  # the root of everything: it imports no other module


@pytest.mark.parametrize("mode", ["local", "both"])
def test_rendered_code_never_touches_sys_path(render_factory, mode: str) -> None:
    ws = render_factory(model="tiny-random", platform="cpu", mode=mode)
    offenders = [str(p.relative_to(ws)) for p in ws.rglob("*.py") if "sys.path" in p.read_text("utf-8")]
    assert offenders == []
