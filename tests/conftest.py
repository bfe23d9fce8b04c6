"""Shared fixtures: render the template with copier's Python API, and the render matrix.

The matrix is generated from the model catalog (includes/models.yml) x platform x mode, in the
style of cookiecutter-data-science's config generator; combinations the template refuses are
dropped here explicitly (and tests/test_questions.py checks that copier refuses them).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CATALOG: list[dict] = yaml.safe_load((REPO / "includes" / "models.yml").read_text("utf-8"))
PLATFORMS = ["cuda", "windows-gpu", "cpu"]
MODES = ["local", "remote", "both"]
ARTIFACTS = REPO / "test-artifacts"


def model_info(model_id: str) -> dict:
    return next(m for m in CATALOG if m["id"] == model_id)


def is_valid(model_id: str, platform: str, mode: str) -> bool:
    """The combinations the template accepts: a model only on the platforms it is sensible on."""
    return platform in model_info(model_id)["platforms"]


def render_matrix() -> list[tuple[str, str, str]]:
    combos = itertools.product([m["id"] for m in CATALOG], PLATFORMS, MODES)
    return [c for c in combos if is_valid(*c)]


def invalid_combinations() -> list[tuple[str, str, str]]:
    combos = itertools.product([m["id"] for m in CATALOG], PLATFORMS, ["local"])
    return [c for c in combos if not is_valid(*c)]


@pytest.fixture(autouse=True, scope="session")
def _isolate_copier_settings(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The user's own copier settings (defaults, trusted templates) must not leak into tests.
    settings = tmp_path_factory.mktemp("copier-settings") / "settings.yml"
    settings.write_text("{}\n", "utf-8")
    os.environ["COPIER_SETTINGS_PATH"] = str(settings)
    os.environ.setdefault("GIT_AUTHOR_NAME", "test")
    os.environ.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    os.environ.setdefault("GIT_COMMITTER_NAME", "test")
    os.environ.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")


@pytest.fixture(scope="session")
def template_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain-directory copy of the template (no .git), so copier renders the working tree
    as it is, quickly, without cloning."""
    dst = tmp_path_factory.mktemp("template-src")
    for name in ("copier.yml", "template", "includes", "hooks"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(
                src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".ruff_cache", ".pytest_cache")
            )
        elif src.exists():
            shutil.copy2(src, dst / name)
    return dst


def render(src: Path, dst: Path, **data: object) -> Path:
    from copier import run_copy

    run_copy(str(src), str(dst), data=data, defaults=True, unsafe=False, quiet=True, vcs_ref=None)
    return dst


@pytest.fixture(scope="session")
def render_factory(template_src: Path, tmp_path_factory: pytest.TempPathFactory):
    """Render once per distinct set of answers for the whole session."""
    cache: dict[tuple, Path] = {}

    def _render(**data: object) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in data.items()))
        if key not in cache:
            cache[key] = render(template_src, tmp_path_factory.mktemp("ws"), **data)
        return cache[key]

    return _render


PYTHON = sys.executable


def run_py(ws: Path, *args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    """Run a workspace script with the test environment's Python."""

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OLIVE_DISABLE_TELEMETRY": "1"}
    env.update(kw.pop("env", {}))
    return subprocess.run([PYTHON, *args], cwd=ws, capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.fixture(scope="session")
def tuned_workspace(render_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-random CPU workspace, with its model built and fine-tuned once per pytest run."""
    src = render_factory(model="tiny-random", platform="cpu", mode="local")
    ws = tmp_path_factory.mktemp("tuned") / "ws"
    shutil.copytree(src, ws)
    build = run_py(ws, "setup/download_model.py")
    assert build.returncode == 0, build.stderr[-3000:]
    tune = run_py(ws, "finetuning/invoke_olive.py")
    assert tune.returncode == 0, tune.stdout[-3000:] + tune.stderr[-3000:]
    assert (ws / "models" / "lora" / "adapter" / "adapter_config.json").is_file()
    (ws / "finetune.log").write_text(tune.stdout + tune.stderr, "utf-8")
    return ws


SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smol_workspace(render_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default CPU workspace (SmolLM2-135M-Instruct, a real pretrained model), its model built
    from the offline copy (the Hub is unreachable in tests: HF_HUB_OFFLINE=1), fine-tuned on the
    sample once per pytest run, with the held-out evaluation invoke_olive.py ends with."""
    ws = tmp_path_factory.mktemp("smol") / "ws"
    shutil.copytree(render_factory(model=SMOL, platform="cpu", mode="local"), ws)
    build = run_py(ws, "setup/download_model.py")
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (ws / "download.log").write_text(build.stdout + build.stderr, "utf-8")
    tune = run_py(ws, "finetuning/invoke_olive.py", timeout=1200)
    assert tune.returncode == 0, tune.stdout[-3000:] + tune.stderr[-3000:]
    (ws / "finetune.log").write_text(tune.stdout + tune.stderr, "utf-8")
    return ws


def sample_rows() -> list[dict]:
    import json

    path = REPO / "template" / "dataset" / "{% if dataset_source == 'sample' %}sample.jsonl{% endif %}"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
