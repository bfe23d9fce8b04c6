"""The pinned version set (includes/versions.yml) and what every platform installs from it:
requirement files (torch alone from the PyTorch index, the rest from the default index only),
the conda file, and a real install of the CPU requirements into a fresh venv (slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest
import yaml
from conftest import REPO
from envkit import (
    COMMON,
    ORT_GENAI,
    TORCH_SKIPPED,
    VERSIONS,
    expected_files,
    pinned,
    read_requirements,
    run_setup,
)
from packaging.requirements import Requirement

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
    pins = dict(VERSIONS["common"], **VERSIONS["onnxruntime_genai"]["cpu"], **VERSIONS["llama_cpp"])
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
    # The expressions the templates share are computed once, as hidden values, never repeated.
    for name in ("pins", "cuda_files", "onnx_repo", "onnx_variant"):
        assert config[name]["when"] is False, name
    shared = ("versions is mapping", "platform != 'cpu' or mode != 'local'", "onnx.variants")
    for path in [*(template_src / "template").rglob("*"), *(template_src / "includes").rglob("*.jinja")]:
        text = path.name + (path.read_text("utf-8") if path.is_file() else "")
        assert not [e for e in shared if e in text], f"{path.relative_to(template_src)} repeats a copier.yml value"


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
            expected = (
                VERSIONS["common"].get(req.name)
                or {
                    "torch": VERSIONS["torch"],
                    "bitsandbytes": VERSIONS["bitsandbytes"],
                    "jinja2": VERSIONS["jinja2"],
                    "vllm": VERSIONS["vllm"],
                    "lm-eval": VERSIONS["lm_eval"],
                }.get(req.name)
                or VERSIONS["llama_cpp"].get(req.name)
            )
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
        if name == "requirements-vllm.txt":
            # vLLM's own environment: its wheel brings its own torch and transformers.
            assert names == {"vllm"}  # vLLM serves a QLoRA adapter on the full-precision base
            continue
        if name == "requirements-gguf.txt":
            # On top of the workspace's environment, only for GGUF: llama.cpp and its converter's needs.
            assert names == set(VERSIONS["llama_cpp"])
            continue
        if name == "requirements-benchmarks.txt":
            # On top of the workspace's environment, only for --benchmarks: lm-eval alone.
            assert names == {"lm-eval"}
            continue
        if name == "requirements-cuda.txt":
            assert names == COMMON | {"torch", "bitsandbytes", "onnxruntime-genai-cuda"}
        elif name == "requirements-cpu.txt":
            assert str(reqs["torch"]) == "torch==2.13.0"  # exactly: the installed +cpu build satisfies it
            # bitsandbytes on the CPU too: QLoRA trains there, and a QLoRA adapter is served as trained.
            assert names == COMMON | {"torch", "bitsandbytes", "onnxruntime-genai"}
        else:  # requirements-directml.txt: Windows-native inference only
            assert options == []
            assert names == {"onnxruntime-genai-directml", "jinja2", *VERSIONS["directml_from_common"]}
            assert "torch" not in names
        assert len(names & ORT_GENAI) == 1, f"{name}: exactly one ONNX Runtime GenAI build"


def test_bitsandbytes_wherever_torch_is() -> None:
    """QLoRA runs on CUDA and on the CPU: every environment with torch gets bitsandbytes."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(REPO)), undefined=jinja2.StrictUndefined)
    macro = env.get_template("includes/requirements.jinja").module.pip_lines
    assert "bitsandbytes==" in macro("cpu", VERSIONS)
    assert "bitsandbytes==" in macro("cuda", VERSIONS)
    assert "torch==" not in macro("directml", VERSIONS) and "bitsandbytes" not in macro("directml", VERSIONS)
    assert "index" not in macro("cpu", VERSIONS) + macro("cuda", VERSIONS)


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
