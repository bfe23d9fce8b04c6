"""setup/setup.sh: strict, idempotent, loud on failure, and quick to give up on an unreachable
PyTorch index (stub pythons and pips stand in for the real ones)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pytest
from conftest import PYTHON
from envkit import (
    PIP,
    TORCH_SKIPPED,
    VERSIONS,
    read_requirements,
    run_setup,
)

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


def test_setup_vllm_makes_its_own_environment(render_factory, tmp_path: Path) -> None:
    """--vllm: .venv-vllm made once with the chosen Python, vLLM's file installed into it (each run),
    and nothing else touched (no .venv). Stub pythons record what they are asked."""
    ws = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform="cuda"), ws)
    log = tmp_path / "calls.log"
    venv_python = tmp_path / "venv-python"  # what `-m venv` puts in .venv-vllm/bin/python
    stub(venv_python, f'echo "vllm-venv $*" >> {log}\n[ "$1 $2" = "-m pip" ] && exit 0\necho "vllm 0.33.0"\n')
    maker = tmp_path / "bin" / "python3.11"
    stub(
        maker,
        f'if [ "$1 $2" = "-m venv" ]; then echo "maker $*" >> {log}; mkdir -p "$3/bin"; '
        f'cp {venv_python} "$3/bin/python"; exit 0; fi\nexec {PYTHON} "$@"\n',
    )
    for _ in range(2):
        result = run_setup(ws, "--vllm", env={"PYTHON": str(maker)})
        assert result.returncode == 0, result.stdout + result.stderr
        assert "vllm 0.33.0" in result.stdout and 'backend = "vllm"' in result.stdout
    assert log.read_text().splitlines() == [
        "maker -m venv .venv-vllm",
        f"vllm-venv {PIP} -r setup/requirements-vllm.txt",
        'vllm-venv -c import vllm; print(f"vllm {vllm.__version__}")',
        f"vllm-venv {PIP} -r setup/requirements-vllm.txt",
        'vllm-venv -c import vllm; print(f"vllm {vllm.__version__}")',
    ]
    assert not (ws / ".venv").exists()


def test_setup_vllm_on_cpu_is_one_line(setup_copy: Path) -> None:
    result = run_setup(setup_copy, "--vllm")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: vLLM runs on NVIDIA GPUs (CUDA) only, and this workspace's platform is cpu"
    assert not (setup_copy / ".venv-vllm").exists()
