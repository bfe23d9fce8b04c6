"""infra/ of remote workspaces: rendered only for remote modes, every file parses, the Bicep is
secure (checkov and our own policies), parameter files fit the Bicep, and the job's command runs
locally against a directory laid out like the mounted file share."""

from __future__ import annotations

import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, model_info, render

PY = sys.executable
REMOTE_RENDERS = [
    ("tiny-random", "cpu", "remote"),
    ("meta-llama/Llama-3.2-1B-Instruct", "cuda", "both"),
    ("Qwen/Qwen2.5-7B-Instruct", "windows-gpu", "remote"),
]
PEER_FIELDS = {"SUBSCRIPTION_ID", "RESOURCE_GROUP_NAME", "STORAGE_ACCOUNT_NAME", "FILE_SHARE_NAME"}
SECRET_NAME_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def bicep(path: Path) -> dict[str, Any]:
    from pycep import BicepParser

    return BicepParser().parse(file_path=path)


def checkov_bin() -> str:
    candidates = [os.environ.get("CHECKOV_BIN", ""), str(REPO / ".venv-checkov" / "bin" / "checkov")]
    found = next((c for c in candidates if c and Path(c).is_file()), None) or shutil.which("checkov")
    if not found:
        pytest.fail("checkov not found: set CHECKOV_BIN, or run scripts/test.sh (it makes .venv-checkov)")
    return found


def is_secure(param: dict[str, Any]) -> bool:
    return any(d["type"] == "secure" for d in param.get("decorators", []))


def decorator(param: dict[str, Any], kind: str) -> Any:
    return next((d.get("argument") for d in param.get("decorators", []) if d["type"] == kind), None)


def walk(node: Any):
    """Every dict inside a pycep tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def resolve(tree: dict[str, Any], node: Any, depth: int = 0) -> Any:
    """pycep writes identifiers as bare strings: replace variable names by their values, deeply."""
    if isinstance(node, str) and node in tree.get("variables", {}) and depth < 20:
        return resolve(tree, tree["variables"][node]["value"], depth + 1)
    if isinstance(node, dict):
        return {k: resolve(tree, v, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(tree, v, depth) for v in node]
    return node


def secrets_and_env(tree: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The secrets[] entries and the container env entries of every resource, variables resolved."""
    resources = resolve(tree, tree["resources"])
    secrets = [d for n in walk(resources) if "secrets" in n for d in walk(n["secrets"]) if "name" in d]
    envs = [d for n in walk(resources) if "env" in n for d in walk(n["env"]) if "name" in d]
    return secrets, envs


@pytest.fixture(scope="module", params=REMOTE_RENDERS, ids=lambda c: "-".join(c).replace("/", "_"))
def ws(request: pytest.FixtureRequest, render_factory) -> Path:
    model, platform, mode = request.param
    return render_factory(model=model, platform=platform, mode=mode)


def answers(ws: Path) -> dict[str, Any]:
    return yaml.safe_load((ws / ".copier-answers.yml").read_text("utf-8"))


def test_local_mode_renders_no_infra(render_factory) -> None:
    ws = render_factory(model="tiny-random", platform="cpu", mode="local")
    assert not (ws / "infra").exists()
    assert not any("{%" in p.name or "{{" in p.name for p in ws.rglob("*"))


def test_every_infra_file_parses(ws: Path, tmp_path: Path) -> None:
    files = sorted(p for p in (ws / "infra").rglob("*") if p.is_file())
    expected = {"remote.py", "job.sh", "serve.sh", "prepare.sh", "azureml.sh", "finetuning.bicep", "inference.bicep"}
    expected |= {"environment.bicep", "finetuning.parameters.json", "inference.parameters.json"}
    assert expected <= {p.name for p in files}
    for path in files:
        text = path.read_text("utf-8")
        assert "{{" not in text and "{%" not in text, f"unrendered Jinja in {path.name}"
        if path.suffix == ".bicep":
            assert bicep(path)["resources"] or bicep(path)["modules"], path.name
        elif path.suffix == ".json":
            json.loads(text)
        elif path.suffix == ".toml":
            tomllib.loads(text)
        elif path.suffix == ".sh":
            subprocess.run(["bash", "-n", str(path)], check=True)
        elif path.suffix == ".py":
            py_compile.compile(str(path), doraise=True, cfile=str(tmp_path / "out.pyc"))


def test_parameter_files_fit_the_bicep(ws: Path) -> None:
    a = answers(ws)
    for kind in ("finetuning", "inference"):
        params = bicep(ws / "infra" / "provision" / f"{kind}.bicep")["parameters"]
        given = json.loads((ws / "infra" / "provision" / f"{kind}.parameters.json").read_text("utf-8"))
        assert given["$schema"].endswith("deploymentParameters.json#")
        values = {name: entry["value"] for name, entry in given["parameters"].items()}
        assert set(values) <= set(params), f"{kind}: parameters the Bicep does not declare"
        for name, param in params.items():
            if is_secure(param):
                # Secrets reach the deployment from remote.py on az's stdin, never from a file.
                assert name not in values, f"{kind}: secure parameter {name} in a parameters file"
                continue
            if param.get("default") is None:
                assert name in values, f"{kind}: required parameter {name} missing"
            if name not in values:
                continue
            value = values[name]
            assert isinstance(value, int if param["type"] == "int" else str), (kind, name)
            if (allowed := decorator(param, "allowed")) is not None:
                assert value in allowed, (kind, name, value)
            for kind_, check in (
                ("min_length", lambda v, n: len(v) >= n),
                ("max_length", lambda v, n: len(v) <= n),
            ):
                if (limit := decorator(param, kind_)) is not None:
                    assert check(value, limit), (kind, name, value, kind_)
            if (low := decorator(param, "min_value")) is not None:
                assert value >= low, (kind, name)
            if (high := decorator(param, "max_value")) is not None:
                assert value <= high, (kind, name)
        assert values["gpuProfile"] == a["gpu_profile"]
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", values["namePrefix"])
        # Pinned image: an explicit version tag, never latest.
        tag = values["image"].rsplit(":", 1)[-1]
        assert ":" in values["image"] and tag != "latest" and re.search(r"\d+\.\d+", tag), values["image"]
    images = {
        json.loads((ws / "infra" / "provision" / f"{k}.parameters.json").read_text())["parameters"]["image"]["value"]
        for k in ("finetuning", "inference")
    }
    assert len(images) == 1, "the job and the app should run the same image"
    azure = tomllib.loads((ws / "settings.toml").read_text("utf-8"))["azure"]
    assert azure["location"] == a["azure_region"] and azure["resource_group"]
    assert azure["subscription"] == azure["ml_workspace"] == azure["ml_compute"] == "", "the user fills these"


def test_gpu_profile_follows_model_size(ws: Path) -> None:
    a = answers(ws)
    big = model_info(a["model"])["params_b"] > 4
    assert a["gpu_profile"] == ("Consumption-GPU-NC24-A100" if big else "Consumption-GPU-NC8as-T4")


def test_bicep_structure_and_api_versions(ws: Path) -> None:
    provision = ws / "infra" / "provision"
    env = bicep(provision / "environment.bicep")
    for res in env["resources"].values():
        if res["type"].startswith("Microsoft.App/"):
            assert res["api_version"] >= "2025-07-01" and "preview" not in res["api_version"], res
    managed = next(r for r in env["resources"].values() if r["type"] == "Microsoft.App/managedEnvironments")
    profiles = managed["config"]["properties"]["workloadProfiles"]
    gpu = [p for p in profiles if p["workloadProfileType"] == "gpuProfile"]
    assert len(gpu) == 1, "one serverless GPU profile, type from the gpuProfile parameter"
    assert not {"minimumCount", "maximumCount"} & set(gpu[0]), "serverless profiles take no counts"
    storage = next(r for r in env["resources"].values() if r["type"] == "Microsoft.Storage/storageAccounts")
    props = storage["config"]["properties"]
    assert props["supportsHttpsTrafficOnly"] is True
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert props["allowBlobPublicAccess"] is False

    ft = bicep(provision / "finetuning.bicep")
    (job,) = [r for r in ft["resources"].values() if r["type"] == "Microsoft.App/jobs"]
    assert job["api_version"] >= "2025-07-01"
    assert job["config"]["properties"]["configuration"]["triggerType"] == "Manual"
    (container,) = job["config"]["properties"]["template"]["containers"]
    assert container["command"] == ["bash", "${mountPath}/infra/job.sh"]
    assert resolve(ft, "mountPath") == "/mount"
    _, envs = secrets_and_env(ft)
    caches = {e["name"]: e.get("value") for e in envs}
    assert caches["PIP_CACHE_DIR"].startswith("${mountPath}/") and caches["HF_HOME"].startswith("${mountPath}/")
    assert set(ft["outputs"]) == PEER_FIELDS | {"ACA_JOB_NAME"}

    inf = bicep(provision / "inference.bicep")
    (app,) = [r for r in inf["resources"].values() if r["type"] == "Microsoft.App/containerApps"]
    assert app["api_version"] >= "2025-07-01"
    assert app["config"]["properties"]["template"]["containers"][0]["command"] == [
        "bash",
        "${mountPath}/infra/serve.sh",
    ]
    assert set(inf["outputs"]) == PEER_FIELDS | {"ACA_APP_NAME", "ACA_APP_ENDPOINT"}


def test_job_command_is_written_once(ws: Path) -> None:
    job = (ws / "infra" / "job.sh").read_text("utf-8")
    # prepare.sh (shared with serve.sh) installs the requirements; job.sh sources it first.
    job = job.replace('source "$(dirname "$0")/prepare.sh"', (ws / "infra" / "prepare.sh").read_text("utf-8"))
    # torch alone from its index, then the rest from the default index, then the work.
    steps = ["-r setup/requirements-torch-cuda.txt", "-r setup/requirements-cuda.txt", "setup/download_model.py"]
    steps.append("finetuning/invoke_olive.py")
    assert [job.index(s) for s in steps] == sorted(job.index(s) for s in steps)
    assert "set -euo pipefail" in job and "SKIP_PIP_INSTALL" in job
    for name in ("requirements-torch-cuda.txt", "requirements-cuda.txt"):
        assert (ws / "setup" / name).is_file()
    for path in (ws / "infra" / "provision").glob("*.parameters.json"):
        assert "invoke_olive" not in path.read_text("utf-8"), "the job's command lives in infra/job.sh only"


def test_external_ingress_requires_an_api_key(ws: Path) -> None:
    settings = tomllib.loads((ws / "settings.toml").read_text("utf-8"))
    apps = 0
    for path in (ws / "infra" / "provision").glob("*.bicep"):
        tree = bicep(path)
        params = tree["parameters"]
        for res in resolve(tree, tree["resources"]).values():
            if res["type"] != "Microsoft.App/containerApps":
                continue
            config = res["config"]["properties"]["configuration"]
            ingress = config.get("ingress") or {}
            assert ingress.get("allowInsecure") is False, f"{path.name}: ingress must refuse plain HTTP"
            if not ingress.get("external"):
                continue
            apps += 1
            secrets = {s["name"]: s["value"] for s in walk(config.get("secrets", [])) if "name" in s}
            envs = [e for c in res["config"]["properties"]["template"]["containers"] for e in c.get("env", [])]
            key_env = [e for e in envs if e["name"] == "apiKeyEnvName"]
            assert key_env, f"{path.name}: a public app must get its API key"
            ref = key_env[0].get("secretRef")
            assert ref in secrets, f"{path.name}: the API key must come from a secret, by secretRef"
            key = secrets[ref]
            assert key in params and is_secure(params[key]), "the API key secret must come from a @secure() param"
            assert params[key].get("default") is None, "the API key must have no default"
            assert decorator(params[key], "min_length") >= 16
            assert params["apiKeyEnvName"]["default"] == settings["serve"]["api_key_env"]
    assert apps == 1


def test_secrets_only_through_secret_refs(ws: Path) -> None:
    for path in (ws / "infra" / "provision").glob("*.bicep"):
        tree = bicep(path)
        params = tree["parameters"]
        secure = {n for n, p in params.items() if is_secure(p)}
        assert not any(params[n].get("default") for n in secure), "secure parameters have no default"
        secrets, envs = secrets_and_env(tree)
        for secret in secrets:
            assert secret["value"] in secure, f"{path.name}: secret {secret['name']} not from a @secure() param"
        names = {s["name"] for s in secrets}
        for entry in envs:
            if "secretRef" in entry:
                assert entry["secretRef"] in names and "value" not in entry, (path.name, entry)
                continue
            value = json.dumps(entry.get("value"))
            assert not any(f'"{n}"' in value for n in secure), f"{path.name}: a secret as a plain value: {entry}"
            name = str(params[entry["name"]]["default"] if entry["name"] in params else entry["name"])
            assert not any(w in name.upper() for w in SECRET_NAME_WORDS), f"{path.name}: {name} needs secretRef"
        # Beyond declarations, a secure parameter appears only as a secret's value or in empty().
        for line in path.read_text("utf-8").splitlines():
            for name in secure:
                if re.search(rf"\b{name}\b", line) and not line.lstrip().startswith(("//", "@", "param ")):
                    assert re.search(rf"value: {name}$|empty\({name}\)", line.strip()), (path.name, line)
    ft = bicep(ws / "infra" / "provision" / "finetuning.bicep")
    _, envs = secrets_and_env(ft)
    assert {"name": "HF_TOKEN", "secretRef": "hf-token"} in envs


def test_no_secret_in_rendered_files(template_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = "hf_SENTINELdoNotLeak0123456789"
    monkeypatch.setenv("HF_TOKEN", sentinel)
    monkeypatch.setenv("FINETUNE_API_KEY", sentinel)
    ws = render(template_src, tmp_path / "ws", model="meta-llama/Llama-3.2-1B-Instruct", platform="cuda", mode="both")
    answers_text = (ws / ".copier-answers.yml").read_text("utf-8")
    assert not re.search(r"(?i)(token|secret|password|api_?key)\s*:", answers_text)
    for path in ws.rglob("*"):
        if path.is_file():
            text = path.read_text("utf-8", errors="replace")
            assert sentinel not in text, path
            assert not re.search(r"\bhf_[A-Za-z0-9]{30,}\b", text), path


def test_checkov_passes(render_factory, tmp_path: Path) -> None:
    ws = render_factory(model="meta-llama/Llama-3.2-1B-Instruct", platform="cuda", mode="both")
    proc = subprocess.run(
        [checkov_bin(), "--framework", "bicep", "--skip-download", "-d", str(ws / "infra"), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    summary = report["summary"]
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert summary["parsing_errors"] == 0, proc.stdout[-2000:]
    assert summary["failed"] == 0, failed
    assert summary["passed"] > 0 and summary["resource_count"] >= 8, summary
    for skipped in report["results"]["skipped_checks"]:
        reason = skipped["check_result"].get("suppress_comment") or ""
        assert len(reason) > 30, f"{skipped['check_id']} skipped without a written reason"
    # Skips live inside the resource they excuse, never as a blanket flag on the command line.
    for path in (ws / "infra" / "provision").glob("*.bicep"):
        lines = path.read_text("utf-8").splitlines()
        depth = 0
        for line in lines:
            if "checkov:skip" in line:
                assert depth > 0, f"{path.name}: checkov skip outside a resource"
            depth += line.count("{") - line.count("}")


def test_remote_py_is_clean_and_quick(ws: Path) -> None:
    script = ws / "infra" / "remote.py"
    package = [ws / "tuner" / "settings.py", *sorted((ws / "tuner" / "cloud").glob("*.py"))]
    ruff = shutil.which("ruff") or str(Path(PY).parent / "ruff")
    for args in (["check"], ["format", "--check"]):
        proc = subprocess.run([ruff, *args, str(script), *map(str, package)], cwd=ws, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    start = time.monotonic()
    env = {"PATH": "", "PYTHONPATH": str(ws)}  # no tools, only the workspace package
    proc = subprocess.run([PY, str(script), "--help"], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 5
    commands = ["provision-finetuning", "set-secret", "upload", "run-finetuning", "status", "logs", "fetch"]
    commands += ["provision-inference", "deploy-inference", "endpoint", "finetune"]
    for command in commands:
        assert command in proc.stdout
    # Standard library only (tests/test_package.py checks the package's side over its import graph).
    imports = re.findall(r"^(?:from|import) (\w+)", script.read_text("utf-8"), re.M)
    assert set(imports) <= set(sys.stdlib_module_names) | {"__future__", "tuner"}, imports


def test_secret_names_match_between_bicep_and_tool(ws: Path) -> None:
    tool = (ws / "tuner" / "cloud" / "containerapps.py").read_text("utf-8")
    ft = bicep(ws / "infra" / "provision" / "finetuning.bicep")
    inf = bicep(ws / "infra" / "provision" / "inference.bicep")
    assert f'HF_SECRET = "{resolve(ft, "hfTokenSecretName")}"' in tool
    assert f'API_KEY_SECRET = "{resolve(inf, "apiKeySecretName")}"' in tool
    (job,) = [r for r in ft["resources"].values() if r["type"] == "Microsoft.App/jobs"]
    assert f'JOB_CONTAINER = "{job["config"]["properties"]["template"]["containers"][0]["name"]}"' in tool


def test_serve_sh_matches_the_server(render_factory) -> None:
    """infra/serve.sh starts the web server on all interfaces; the server must take those options
    and read its API key from the variable settings.toml names."""
    ws = render_factory(model="tiny-random", platform="cpu", mode="remote")
    serve = (ws / "infra" / "serve.sh").read_text("utf-8")
    server = re.search(r'exec "\$PYTHON" (\S+)', serve).group(1)
    assert (ws / server).is_file(), f"infra/serve.sh starts {server}, which the workspace does not have"
    source = (ws / server).read_text("utf-8")
    for option in ("--host", "--port"):
        assert f'"{option}"' in source, f"{server} does not take {option}, which infra/serve.sh passes"
    assert "api_key_env" in source, f"{server} must enforce the API key named in settings.toml"


@pytest.mark.slow
def test_job_command_runs_against_a_share_layout(render_factory, tmp_path: Path) -> None:
    ws = render_factory(model="tiny-random", platform="cpu", mode="remote")
    # The share as the job sees it at /mount: the uploaded workspace, nothing else.
    share = tmp_path / "mount"
    shutil.copytree(ws, share, ignore=shutil.ignore_patterns("model-cache", "models", ".git"))
    env = {
        **os.environ,
        "SKIP_PIP_INSTALL": "1",  # the test environment already has the pinned packages
        "PYTHON": PY,
        "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("HF_HOME", None)
    env.pop("PIP_CACHE_DIR", None)
    proc = subprocess.run(
        ["bash", str(share / "infra" / "job.sh")],
        cwd=tmp_path,  # job.sh finds the workspace from its own path, like `bash /mount/infra/job.sh`
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (share / "models" / "adapter" / "adapter_config.json").is_file()


FAKE_PYTHON = """#!/usr/bin/env bash
echo "${LOCAL_RANK}:$*" >> "$FAKE_LOG"
case "$1" in
  setup/download_model.py) [ -z "${FAIL_DOWNLOAD:-}" ] || exit 3 ;;
  finetuning/train_sft.py) mkdir -p "$ADAPTER_PATH" && echo '{}' > "$ADAPTER_PATH/adapter_config.json" ;;
esac
"""


def test_azureml_command_gets_the_model_once_per_node_then_trains(render_factory, tmp_path: Path) -> None:
    """infra/azureml.sh, as two processes of one node run it (Azure ML sets the ranks), with a fake
    python that logs what it is asked to run."""
    ws = render_factory(model="tiny-random", platform="cpu", mode="remote")
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text(FAKE_PYTHON, "utf-8")
    fake.chmod(0o755)

    def start(code: Path, rank: int, **extra: str) -> subprocess.Popen:
        env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "FAKE_LOG": str(code / "calls.log"), **extra}
        env |= {"LOCAL_RANK": str(rank), "RANK": str(rank), "ADAPTER_PATH": "models/adapter"}
        return subprocess.Popen(["bash", str(code / "infra" / "azureml.sh")], cwd=tmp_path, env=env)

    code = tmp_path / "code"
    shutil.copytree(ws, code)
    second = start(code, 1)  # starts first, and waits for the model
    assert start(code, 0).wait(60) == 0
    assert second.wait(60) == 0
    calls = (code / "calls.log").read_text("utf-8").splitlines()
    train = "finetuning/train_sft.py --settings settings.toml"
    assert sorted(calls) == sorted(["0:setup/download_model.py", f"0:{train}", f"1:{train}"])
    assert calls.index("0:setup/download_model.py") < calls.index(f"1:{train}")
    assert (code / "outputs" / "adapter" / "adapter_config.json").is_file()

    # A failed download fails the processes waiting for it too, instead of leaving them waiting.
    code = tmp_path / "failing"
    shutil.copytree(ws, code)
    assert start(code, 0, FAIL_DOWNLOAD="1").wait(60) == 1
    assert start(code, 1).wait(60) == 1
    assert "train_sft" not in (code / "calls.log").read_text("utf-8")
