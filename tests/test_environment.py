"""The workspace's environments: pinned requirements per platform, the conda file, the setup
command, the Makefile, the dev container, the editor settings, the workspace's own tests, and a
README whose files and commands all exist.

The one pinned version set is includes/versions.yml; every requirement line checked here must
come from it. torch comes alone from the PyTorch index, the rest from the default index only.
The slow test installs the CPU requirements into a fresh venv for real.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import jinja2
import pytest
import yaml
from conftest import PYTHON, REPO
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

# (model, platform, mode): every platform, every mode, a gated model, an ONNX-less model.
RENDERS = [
    ("tiny-random", "cpu", "local"),
    (PHI3, "cuda", "local"),
    (PHI3, "windows-gpu", "both"),
    (LLAMA, "cpu", "remote"),
    (LLAMA, "windows-gpu", "local"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "cuda", "remote"),
]
IDS = [f"{m.split('/')[-1]}-{p}-{mo}" for m, p, mo in RENDERS]


@pytest.fixture(params=RENDERS, ids=IDS)
def ws(request, render_factory) -> tuple[Path, dict]:
    model, platform, mode = request.param
    root = render_factory(model=model, platform=platform, mode=mode)
    return root, {"model": model, "platform": platform, "mode": mode}


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
    files = {"requirements.txt"}
    if platform != "cpu" or mode != "local":
        files |= {"requirements-cuda.txt", "requirements-torch-cuda.txt"}
    if platform == "cpu":
        files |= {"requirements-cpu.txt", "requirements-torch-cpu.txt"}
    if platform == "windows-gpu":
        files.add("requirements-directml.txt")
    return files


# ---------------------------------------------------------------- the pinned version set


def test_versions_yml_is_quoted_and_complete() -> None:
    def strings(node):
        if isinstance(node, dict | list):
            for value in node.values() if isinstance(node, dict) else node:
                yield from strings(value)
        else:
            yield node

    assert all(isinstance(v, str) for v in strings(VERSIONS)), "quote every version in includes/versions.yml"
    assert VERSIONS["torch"] == "2.13.0"
    assert {"olive-ai", "peft", "accelerate", "datasets", "requests", "transformers"} <= COMMON


def test_test_environment_uses_the_same_pins() -> None:
    """requirements-dev.txt installs what users install, so the tests exercise those versions."""
    dev = {}
    for line in (REPO / "requirements-dev.txt").read_text("utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            dev[req.name] = pinned(req)
    pins = dict(VERSIONS["common"], **VERSIONS["onnxruntime_genai"]["cpu"])
    for name, version in pins.items():
        if name in dev:
            assert dev[name] == version, f"requirements-dev.txt has {name}=={dev[name]}, versions.yml {version}"
    assert "olive-ai" in dev and "transformers" in dev


def test_copier_loads_versions_hidden(template_src: Path) -> None:
    config = yaml.safe_load(
        (template_src / "copier.yml").read_text("utf-8").replace("!include", "")  # tag only
    )
    question = config["versions"]
    assert question["when"] is False and question["type"] == "yaml"
    assert question["default"].strip() == "includes/versions.yml"


# ---------------------------------------------------------------- requirements and conda


def test_requirements_files(ws) -> None:
    root, answers = ws
    platform, mode = answers["platform"], answers["mode"]
    setup = root / "setup"
    present = {p.name for p in setup.glob("requirements*.txt")}
    assert present == expected_files(platform, mode)

    _, _, nested = read_requirements(setup / "requirements.txt")
    assert nested == ["requirements-cpu.txt" if platform == "cpu" else "requirements-cuda.txt"]

    for name in present - {"requirements.txt"}:
        reqs, options, _ = read_requirements(setup / name)
        for req in reqs.values():
            assert req.marker is None and not req.extras, f"{name}: {req}"
            version = pinned(req)
            expected = VERSIONS["common"].get(req.name) or {
                "torch": VERSIONS["torch"],
                "bitsandbytes": VERSIONS["bitsandbytes"],
                "jinja2": VERSIONS["jinja2"],
            }.get(req.name)
            for variants in VERSIONS["onnxruntime_genai"].values():
                expected = expected or variants.get(req.name)
            assert version == expected, f"{name}: {req} does not match includes/versions.yml"
        names = set(reqs)
        if name.startswith("requirements-torch-"):
            # torch alone, from its index only: no other package ever waits on that index.
            target = name.removeprefix("requirements-torch-").removesuffix(".txt")
            assert options == [f"--index-url {VERSIONS['torch_index'][target]}"]
            assert [str(r) for r in reqs.values()] == ["torch==2.13.0"]
            continue
        # Everything else names no index: it resolves from the default one (PyPI or a mirror).
        assert options == [], f"{name}: {options}"
        if name == "requirements-cuda.txt":
            assert names == COMMON | {"torch", "bitsandbytes", "onnxruntime-genai-cuda"}
        elif name == "requirements-cpu.txt":
            assert str(reqs["torch"]) == "torch==2.13.0"  # exactly: the installed +cpu build satisfies it
            method = settings_of(root)["train"]["method"]
            assert ("bitsandbytes" in names) == (method == "qlora")
            assert names - {"bitsandbytes"} == COMMON | {"torch", "onnxruntime-genai"}
        else:  # requirements-directml.txt: Windows-native inference only
            assert options == []
            assert names == {"onnxruntime-genai-directml", "jinja2", *VERSIONS["directml_from_common"]}
            assert "torch" not in names
        assert len(names & ORT_GENAI) == 1, f"{name}: exactly one ONNX Runtime GenAI build"


def test_cpu_qlora_would_get_bitsandbytes() -> None:
    """copier refuses qlora on cpu, so the macro's branch is checked directly."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(REPO)), undefined=jinja2.StrictUndefined)
    macro = env.get_template("includes/requirements.jinja").module.pip_lines
    assert "bitsandbytes==" in macro("cpu", [VERSIONS], "qlora")
    assert "bitsandbytes==" not in macro("cpu", VERSIONS, "lora")
    assert "bitsandbytes==" in macro("cuda", VERSIONS, "lora")
    assert "torch==" not in macro("directml", VERSIONS, "qlora")
    assert "index" not in macro("cpu", VERSIONS, "lora") + macro("cuda", VERSIONS, "lora")


def test_conda_environment(ws) -> None:
    root, answers = ws
    env = yaml.safe_load((root / "setup" / "conda-environment.yml").read_text("utf-8"))
    answers_file = yaml.safe_load((root / ".copier-answers.yml").read_text("utf-8"))
    assert env["name"] == answers_file["env_name"]
    # Python and pip only: a conda file cannot order pip steps (torch from its index first), so
    # setup.sh --conda installs the same two requirements files into it as into a venv.
    assert env["dependencies"] == [f"python={VERSIONS['python']}", "pip"]
    target = "cpu" if answers["platform"] == "cpu" else "cuda"
    text = (root / "setup" / "conda-environment.yml").read_text("utf-8")
    for name in (f"requirements-torch-{target}.txt", f"requirements-{target}.txt"):
        assert f"setup/{name}" in text and (root / "setup" / name).is_file()


def test_conda_env_name_answer(render_factory) -> None:
    root = render_factory(model="tiny-random", platform="cpu", env_name="ft_env.2")
    env = yaml.safe_load((root / "setup" / "conda-environment.yml").read_text("utf-8"))
    assert env["name"] == "ft_env.2"
    assert 'ENV_NAME="ft_env.2"' in (root / "setup" / "setup.sh").read_text("utf-8")
    assert "conda activate ft_env.2" in (root / "README.md").read_text("utf-8")


# ---------------------------------------------------------------- setup command


@pytest.fixture
def setup_copy(render_factory, tmp_path: Path) -> Path:
    src = render_factory(model="tiny-random", platform="cpu")
    dst = tmp_path / "ws"
    shutil.copytree(src, dst)
    return dst


def stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body, "utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


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


def test_setup_script_is_strict(setup_copy: Path) -> None:
    text = (setup_copy / "setup" / "setup.sh").read_text("utf-8")
    assert "\nset -euo pipefail\n" in text
    assert subprocess.run(["bash", "-n", "setup/setup.sh"], cwd=setup_copy, check=False).returncode == 0
    assert os.access(setup_copy / "setup" / "setup.sh", os.X_OK)
    result = run_setup(setup_copy, "--help")
    assert result.returncode == 0 and "--conda" in result.stdout
    result = run_setup(setup_copy, "--bogus")
    assert result.returncode == 2 and "unknown option" in result.stderr


def test_setup_venv_twice_and_fails_loudly(setup_copy: Path, tmp_path: Path) -> None:
    """An existing .venv is updated in place, twice; a failing pip stops the script."""
    log = tmp_path / "calls.log"
    body = (
        f'echo "$*" >> {log}\n'
        'if [ "$1" = -m ] && [ "$2" = pip ]; then exit "${PIP_EXIT:-0}"; fi\n'
        f'exec {PYTHON} "$@"\n'
    )
    stub(setup_copy / ".venv" / "bin" / "python", body)
    for _ in range(2):
        result = run_setup(setup_copy)
        assert result.returncode == 0, result.stderr
        assert "source .venv/bin/activate" in result.stdout and "make finetune" in result.stdout
        assert "torch 2.13.0" in result.stdout
    pip_calls = [c for c in log.read_text().splitlines() if c.startswith("-m pip")]
    assert pip_calls == [f"{PIP} -r setup/requirements.txt", f"{PIP} --no-deps -e ."] * 2

    result = run_setup(setup_copy, env={"PIP_EXIT": "1"})
    assert result.returncode != 0 and "Environment ready" not in result.stdout


def test_setup_no_python_fails(setup_copy: Path) -> None:
    result = run_setup(setup_copy, env={"PYTHON": "/nonexistent/python3.11"})
    assert result.returncode != 0
    assert not (setup_copy / ".venv").exists()


def test_setup_conda_create_then_update(setup_copy: Path, tmp_path: Path) -> None:
    log, envs = tmp_path / "conda.log", tmp_path / "envs.txt"
    envs.write_text("# conda environments:\n#\nbase  /opt/conda\n")
    body = (
        f'echo "$*" >> {log}\n'
        f'if [ "$1 $2" = "env list" ]; then cat {envs}; exit 0; fi\n'
        'if [ "$1" = run ]; then while [ "$1" != python ]; do shift; done; shift; '
        f'if [ "$1 $2" = "-m pip" ]; then echo "run python $*" >> {log}; exit 0; fi; '
        f'exec {PYTHON} "$@"; fi\n'
    )
    stub(tmp_path / "bin" / "conda", body)
    path = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    result = run_setup(setup_copy, "--conda", env=path)
    assert result.returncode == 0, result.stderr
    assert "conda activate my-finetune" in result.stdout
    envs.write_text("base  /opt/conda\nmy-finetune  /opt/conda/envs/my-finetune\n")
    assert run_setup(setup_copy, "--conda", env=path).returncode == 0
    calls = [c for c in log.read_text().splitlines() if c.startswith(("env create", "env update"))]
    assert calls == [
        "env create --name my-finetune --file setup/conda-environment.yml",
        "env update --name my-finetune --file setup/conda-environment.yml --prune",
    ]
    # The packages go into the conda environment as into a venv (torch is already at the pin here).
    pip_calls = [c for c in log.read_text().splitlines() if c.startswith("run python")]
    assert pip_calls == [f"run python {PIP} -r setup/requirements.txt", f"run python {PIP} --no-deps -e ."] * 2
    assert not (setup_copy / ".venv").exists()


TORCH_SKIPPED = f"torch {VERSIONS['torch']} already installed; skipping the PyTorch index"


@pytest.mark.parametrize("has_torch", [True, False], ids=["torch-at-pin", "no-torch"])
def test_setup_uses_the_torch_index_only_without_torch(setup_copy: Path, tmp_path: Path, has_torch: bool) -> None:
    """torch already at the pin (this test environment's CPU build): setup never runs pip on the
    torch file, names no index, and says so in one line. Without torch (a bare venv): the torch
    step first, with a short timeout and one retry, then the rest. pip is recorded, not run."""
    if has_torch:
        assert metadata.version("torch").split("+")[0] == VERSIONS["torch"]  # the premise, checked
        python = PYTHON
    else:
        subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
        python = str(tmp_path / "bare" / "bin" / "python")
    log = tmp_path / "argv.log"
    stub(
        setup_copy / ".venv" / "bin" / "python",
        f'echo "$*" >> {log}\n[ "$1 $2" = "-m pip" ] && exit 0\nexec {python} "$@"\n',
    )
    result = run_setup(setup_copy)
    pip_calls = [c for c in log.read_text().splitlines() if c.startswith("-m pip")]
    rest = [f"{PIP} -r setup/requirements.txt", f"{PIP} --no-deps -e ."]  # then the workspace package
    if has_torch:
        assert result.returncode == 0, result.stderr
        assert TORCH_SKIPPED in result.stdout.splitlines()
        assert pip_calls == rest
        # Nothing that setup/requirements.txt pulls in names an index: all from the default one.
        files, seen = ["requirements.txt"], []
        while files:
            seen.append(files.pop())
            _, options, nested = read_requirements(setup_copy / "setup" / seen[-1])
            assert options == [], f"{seen[-1]}: {options}"
            files += nested
        assert seen == ["requirements.txt", "requirements-cpu.txt"]
    else:
        assert TORCH_SKIPPED not in result.stdout
        assert pip_calls == [f"{PIP} --timeout 10 --retries 1 -r setup/requirements-torch-cpu.txt", *rest]
        assert "No module named 'olive'" in result.stderr  # the bare venv then fails the final check


def test_setup_fails_fast_when_the_torch_index_is_unreachable(setup_copy: Path) -> None:
    """No torch, and a PyTorch index that accepts connections but never answers (a firewall that
    drops packets): setup gives up after one retry of a 10 s timeout, with one line saying what to
    do, where this environment's pip settings (timeout 180 s, 5 retries) would wait 18 minutes."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts, never answers
        torch_file = setup_copy / "setup" / "requirements-torch-cpu.txt"
        index = f"http://127.0.0.1:{silent.getsockname()[1]}/simple"
        torch_file.write_text(torch_file.read_text("utf-8").replace(VERSIONS["torch_index"]["cpu"], index), "utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env.update(PIP_CONFIG_FILE=os.devnull, PIP_DEFAULT_TIMEOUT="180", PIP_RETRIES="5", PYTHON=PYTHON)
        start = time.monotonic()
        result = subprocess.run(
            ["bash", "setup/setup.sh"],
            cwd=setup_copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        took = time.monotonic() - start
    assert result.returncode == 1, result.stdout + result.stderr
    assert took < 90, f"{took:.0f} s"
    assert result.stderr.count("Retrying") == 1 and "read timeout=10" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: torch 2.13.0 could not be installed from {index} (unreachable?); "
        "install torch==2.13.0 another way, then run this again: it skips this step"
    )
    assert "Installing the pinned requirements" not in result.stdout


# ---------------------------------------------------------------- Makefile


def make_n(root: Path, target: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", target], cwd=root, capture_output=True, text=True, timeout=60, check=False)


def test_makefile_targets(ws) -> None:
    root, answers = ws
    expected = {
        "setup": "bash setup/setup.sh",
        "download": "setup/download_model.py",
        "finetune": "finetuning/invoke_olive.py",
        "chat": "inference/console_chat.py",
        "serve": "inference/gradio_chat.py",
        "test": "-m pytest tests",
        "export-onnx": "inference/export_onnx.py",
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


# ---------------------------------------------------------------- a real install (slow)


@pytest.mark.slow
def test_cpu_requirements_install_fresh_venv(render_factory, tmp_path: Path) -> None:
    """setup.sh into a fresh venv (torch first, exactly), twice, then the workspace's own tests."""
    root = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform="cpu"), root)
    venv_python = root / ".venv" / "bin" / "python"
    # The PyTorch index is unreachable here: torch comes from the default index first, so that
    # setup.sh skips the PyTorch index, and the rest never names it.
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", ".venv"], cwd=root, check=True)
    torch = subprocess.run(
        [str(venv_python), "-m", "pip", "install", "-q", "torch==2.13.0"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert torch.returncode == 0, torch.stderr[-3000:]
    first = run_setup(root, env=env)
    installed = time.monotonic() - start
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert TORCH_SKIPPED in first.stdout.splitlines()
    start = time.monotonic()
    second = run_setup(root, env=env)
    again = time.monotonic() - start
    assert second.returncode == 0, second.stderr[-3000:]
    print(f"\nfresh-venv CPU install: {installed:.0f} s; setup.sh again: {again:.0f} s")
    freeze = subprocess.run(
        [str(venv_python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout
    assert "torch==2.13.0" in freeze and "olive-ai==0.13.0" in freeze
    tests = subprocess.run(
        [str(venv_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    print(tests.stdout[-1500:])
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
