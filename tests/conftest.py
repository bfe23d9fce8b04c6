"""Shared fixtures: render the template with copier's Python API, and the render matrix.

The matrix is generated from the model catalog (includes/models.yml) x platform x mode, in the
style of cookiecutter-data-science's config generator; combinations the template refuses are
dropped here explicitly (and tests/test_questions.py checks that copier refuses them).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
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
def _workspace_package_importable() -> None:
    # A rendered workspace's scripts import its package, tuner/, which setup/setup.sh installs
    # (pip install -e .). The tests run them with the test environment's Python instead, always
    # from the workspace folder: a relative PYTHONPATH entry puts that folder's tuner/ first.
    os.environ["PYTHONPATH"] = "."


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


# (model, platform, mode) for the environment tests: every platform, every mode, a gated model
# and a model without an ONNX build.
ENV_RENDERS = [
    ("tiny-random", "cpu", "local"),
    ("microsoft/Phi-3-mini-4k-instruct", "cuda", "local"),
    ("microsoft/Phi-3-mini-4k-instruct", "windows-gpu", "both"),
    ("meta-llama/Llama-3.2-1B-Instruct", "cpu", "remote"),
    ("meta-llama/Llama-3.2-1B-Instruct", "windows-gpu", "local"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "cuda", "remote"),
]


@pytest.fixture(params=ENV_RENDERS, ids=[f"{m.split('/')[-1]}-{p}-{mo}" for m, p, mo in ENV_RENDERS])
def ws(request, render_factory) -> tuple[Path, dict]:
    """One render per row of ENV_RENDERS, with its answers."""
    model, platform, mode = request.param
    root = render_factory(model=model, platform=platform, mode=mode)
    return root, {"model": model, "platform": platform, "mode": mode}


PYTHON = sys.executable


def run_py(ws: Path, *args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    """Run a workspace script with the test environment's Python."""

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OLIVE_DISABLE_TELEMETRY": "1"}
    env.update(kw.pop("env", {}))
    return subprocess.run([PYTHON, *args], cwd=ws, capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.fixture(scope="session")
def tiny_built(render_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-random CPU workspace with its model built (not fine-tuned). Read-only for tests:
    copy it to change it."""
    ws = tmp_path_factory.mktemp("tiny-built") / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform="cpu", mode="local"), ws)
    build = run_py(ws, "setup/download_model.py")
    assert build.returncode == 0, build.stderr[-3000:]
    return ws


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
    assert (ws / "models" / "adapter" / "adapter_config.json").is_file()
    (ws / "finetune.log").write_text(tune.stdout + tune.stderr, "utf-8")
    return ws


SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smol_base(render_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default CPU workspace (SmolLM2-135M-Instruct, a real pretrained model) with its model
    built from the offline copy (the Hub is unreachable in tests: HF_HUB_OFFLINE=1), not fine-tuned.
    Read-only for tests: copy it to change it."""
    ws = tmp_path_factory.mktemp("smol-base") / "ws"
    shutil.copytree(render_factory(model=SMOL, platform="cpu", mode="local"), ws)
    build = run_py(ws, "setup/download_model.py")
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (ws / "download.log").write_text(build.stdout + build.stderr, "utf-8")
    return ws


@pytest.fixture(scope="session")
def smol_workspace(smol_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """smol_base fine-tuned on the sample once per pytest run, with the held-out evaluation
    invoke_olive.py ends with."""
    ws = tmp_path_factory.mktemp("smol") / "ws"
    shutil.copytree(smol_base, ws)
    tune = run_py(ws, "finetuning/invoke_olive.py", timeout=1200)
    assert tune.returncode == 0, tune.stdout[-3000:] + tune.stderr[-3000:]
    (ws / "finetune.log").write_text(tune.stdout + tune.stderr, "utf-8")
    return ws


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running inference/gradio_chat.py, its output in `log`."""

    def __init__(self, port: int, proc: subprocess.Popen, log: Path, key: str | None) -> None:
        self.port, self.proc, self.log, self.key = port, proc, log, key
        self.url = f"http://127.0.0.1:{port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text("utf-8", errors="replace")[-chars:]

    def assert_clean_log(self) -> None:
        """The log has the server's start line (an empty log is not a clean one: its output went
        elsewhere) and no traceback."""
        log = self.log_tail(10**7)
        assert f" on http://127.0.0.1:{self.port} (API at /v1)" in log, log[-4000:]
        assert "Traceback" not in log and "Internal Server Error" not in log, log[-4000:]

    def post(self, body: object, raw: bytes | None = None, timeout: float = 300) -> httpx.Response:
        """POST /v1/chat/completions (with the key): `body` as JSON, or `raw` bytes as they are."""
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        content = raw if raw is not None else json.dumps(body).encode()
        return httpx.post(f"{self.url}/v1/chat/completions", content=content, headers=headers, timeout=timeout)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(ws: Path, log: Path, *args: str, env: dict[str, str] | None = None, key: str | None = None) -> Server:
    """Start inference/gradio_chat.py in `ws` on a free port; return once /v1/models answers."""
    port = free_port()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    full_env.update(env or {})
    with log.open("w") as out:
        command = [PYTHON, "inference/gradio_chat.py", "--port", str(port), *args]
        proc = subprocess.Popen(command, cwd=ws, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    srv = Server(port, proc, log, key)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{srv.log_tail()}")
        if time.monotonic() > deadline:
            srv.stop()
            raise AssertionError(f"server not up after 300 s:\n{srv.log_tail()}")
        try:
            if httpx.get(f"{srv.url}/v1/models", headers=headers, timeout=5).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        time.sleep(1)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextlib.contextmanager
def browser_page(url: str) -> Iterator[tuple[Any, Any]]:
    """Debian's Chromium, headless, driven by playwright, on `url`: (the page, playwright's sync_api
    for its `expect`). Skips where playwright or chromium is missing (never `playwright install`)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(180_000)
            page.goto(url)
            yield page, sync_api
        finally:
            browser.close()


def sample_rows() -> list[dict]:
    import json

    path = REPO / "template" / "dataset" / "{% if dataset_source == 'sample' %}sample.jsonl{% endif %}"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def bare_workspace(render_factory, tmp_path: Path, **answers: str) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", mode="local", **answers), ws)
    return ws


def set_train(ws: Path, **values: object) -> None:
    """Edit [train] values in the workspace's settings.toml, as a user would."""
    path = ws / "settings.toml"
    text = path.read_text("utf-8")
    for key, value in values.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {json.dumps(value)}", text, flags=re.M)
        assert n == 1, key
    path.write_text(text, "utf-8")


def killed_at_swap(folder: Path, work: Callable[[], object]) -> None:
    """Run `work` in a forked child process that is killed (SIGKILL) at the swap of tuner.files:
    when the new folder is about to be renamed to `folder`, the previous one already moved aside.
    The child's own os.replace is the hook; the parent's is untouched."""
    import multiprocessing
    import signal

    target = folder.resolve()

    def child() -> None:
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            if Path(os.path.realpath(dst)) == target:
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)

        os.replace = replace  # type: ignore[assignment]
        work()

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(300)
    assert process.exitcode == -signal.SIGKILL, f"the child ended with {process.exitcode}, never reaching the swap"
