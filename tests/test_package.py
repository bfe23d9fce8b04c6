"""The workspace package, tuner/: every module imports with no workspace around it, no import
circle, the layers import one way, cloud/ needs nothing but the standard library, and no code in
a rendered workspace touches sys.path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "template" / "tuner"
# Dotted names under tuner: "settings", "training.runs", "serving.api", "cloud.az", ...
MODULES = sorted(
    ".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
)
LAYERS = ("training", "serving", "export", "cloud")
# The workspace's entry scripts live in these folders; the package never imports them.
SCRIPT_FOLDERS = {"setup", "finetuning", "inference", "infra", "tests"}


def source(module: str) -> str:
    return (PACKAGE / (module.replace(".", "/") + ".py")).read_text("utf-8")


def imports_of(module: str) -> set[str]:
    """Every module `module` imports, at any depth of its code (lazy imports included), as
    written: "tuner.training.runs", "torch", "json", ..."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source(module))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in ("tuner", *(f"tuner.{layer}" for layer in LAYERS)):
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def package_imports(module: str) -> set[str]:
    """The tuner modules `module` imports, as dotted names under tuner."""
    return {name.removeprefix("tuner.") for name in imports_of(module) if name.startswith("tuner.")} & set(MODULES)


def test_the_layout() -> None:
    """The layers of tuner/__init__.py's docstring, and no module outside them but the four
    shared ones."""
    assert {m for m in MODULES if "." not in m} == {"settings", "files", "data", "hub"}
    assert {m.split(".")[0] for m in MODULES if "." in m} == set(LAYERS)
    docstring = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text("utf-8"))) or ""
    for module in MODULES:
        assert module.split(".")[-1] in docstring, f"tuner/__init__.py does not say what {module} is for"


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_without_a_workspace(module: str, tmp_path: Path) -> None:
    """In an empty folder (no settings.toml, no dataset), importing reads nothing and runs nothing."""
    code = f"import sys, tuner.{module}; print(sorted(m for m in sys.modules if m.startswith('tuner.')))"
    env = {"PYTHONPATH": str(REPO / "template"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not list(tmp_path.iterdir()), "importing wrote files"


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


def test_the_layers_import_one_way() -> None:
    """settings, files, data and hub import no layer; serving takes only the precision policy from
    training (never its trainers: Olive's config, a run's bookkeeping, the evaluation); training
    loads an adapter for its evaluation as the chat engine does, and nothing else of serving;
    export builds on training and serving, and no other layer imports it; cloud imports none of
    them; nothing imports an entry script."""
    for module in MODULES:
        layer = module.split(".")[0] if "." in module else None
        deps = package_imports(module)
        if layer is None:
            assert not {d for d in deps if "." in d}, (module, deps)
        elif layer == "serving":
            assert {d for d in deps if d.startswith("training.")} <= {"training.precision"}, (module, deps)
            assert not {d for d in deps if d.startswith("cloud.")}, (module, deps)
        elif layer == "cloud":
            assert not {d for d in deps if d.startswith(("training.", "serving.", "export."))}, (module, deps)
        elif layer == "export":
            assert not {d for d in deps if d.startswith("cloud.")}, (module, deps)
        if layer != "export":
            assert not {d for d in deps if d.startswith("export.")}, (module, deps)
        elif layer == "training":
            allowed = {"serving.hf"} if module == "training.evaluation" else set()
            assert {d for d in deps if d.startswith(("serving.", "cloud."))} <= allowed, (module, deps)
        scripts = {name for name in imports_of(module) if name.split(".")[0] in SCRIPT_FOLDERS}
        assert not scripts, (module, scripts)


def test_cloud_needs_only_the_standard_library() -> None:
    """Everything tuner/cloud/ reaches, through the package's own modules too, is the standard
    library: infra/remote.py runs on a machine with nothing but Python and the Azure CLI."""
    seen: set[str] = set()
    todo = [m for m in MODULES if m.startswith("cloud.")]
    assert todo
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in imports_of(module):
            if name.startswith("tuner."):
                todo.extend(sorted({name.removeprefix("tuner.")} & set(MODULES)))
            else:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top == "__future__", f"tuner/{module} imports {name}"
    assert "settings" in seen  # the import graph was followed out of the subpackage


@pytest.mark.parametrize("mode", ["local", "both"])
def test_rendered_code_never_touches_sys_path(render_factory, mode: str) -> None:
    ws = render_factory(model="tiny-random", platform="cpu", mode=mode)
    offenders = [str(p.relative_to(ws)) for p in ws.rglob("*.py") if "sys.path" in p.read_text("utf-8")]
    assert offenders == []
