"""infra/remote.py against a fake `az` on PATH: each command makes the right az calls in the
right order, secrets never reach a command line or the output, and every failure is one line."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import killed_at_swap
from tuner.cloud import containerapps as package
from tuner.cloud.az import AzureError
from tuner.settings import SettingsError, check_settings, load_settings, with_overrides
from tuner.training.runs import recover_adapter

PY = sys.executable
TOKEN = "hf_FAKEtokenFORtests0123456789abcdef"
STORAGE_KEY = "FAKEstorageKEY0123456789=="
JOB, APP, RG = "job-my-finetune", "app-my-finetune", "rg-my-finetune"
ENDPOINT = "https://app-my-finetune.example.azurecontainerapps.io"
OUTPUTS = {
    "SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000",
    "RESOURCE_GROUP_NAME": RG,
    "STORAGE_ACCOUNT_NAME": "stmyfinetuneabc123",
    "FILE_SHARE_NAME": "workspace",
}

# The fake az: logs argv (and what it was given on stdin for `name=@-` arguments, the files an
# upload-batch would send, the storage key it got through the environment), then answers from
# the rules file: the first rule whose words start argv; its responses are used in turn.
FAKE_AZ = """\
import json, os, sys
argv = sys.argv[1:]
entry = {"argv": argv, "storage_key": os.environ.get("AZURE_STORAGE_KEY")}
if any(a.endswith("=@-") for a in argv):
    entry["stdin"] = sys.stdin.read()
if argv[:3] == ["storage", "file", "upload-batch"]:
    src = argv[argv.index("--source") + 1]
    entry["files"] = sorted(
        os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/") for d, _, fs in os.walk(src) for f in fs
    )
    if os.path.exists(os.path.join(src, "settings.toml")):
        entry["settings"] = open(os.path.join(src, "settings.toml"), encoding="utf-8").read()
if argv[:3] == ["ml", "job", "create"]:  # the job file and the folders staged beside it
    top = os.path.dirname(argv[argv.index("--file") + 1])
    entry["staged"] = sorted(
        os.path.relpath(os.path.join(d, f), top).replace(os.sep, "/") for d, _, fs in os.walk(top) for f in fs
    )
    wanted = [f for f in entry["staged"] if not f.startswith("code/") or f in ("code/.amlignore", "code/settings.toml")]
    entry["texts"] = {f: open(os.path.join(top, f), encoding="utf-8").read() for f in wanted}
log = os.environ["FAKE_AZ_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(entry) + "\\n")
rules = json.load(open(os.environ["FAKE_AZ_RULES"]))
state = json.load(open(log + ".state")) if os.path.exists(log + ".state") else {}
for i, rule in enumerate(rules):
    words = rule["match"].split()
    if argv[: len(words)] != words:
        continue
    n = state.get(str(i), 0)
    state[str(i)] = n + 1
    json.dump(state, open(log + ".state", "w"))
    r = rule["responses"][min(n, len(rule["responses"]) - 1)]
    for rel, content in r.get("create", {}).items():
        path = os.path.join(argv[argv.index("--destination") + 1], rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").write(content)
    out = r.get("stdout", {})
    sys.stdout.write(out if isinstance(out, str) else json.dumps(out))
    sys.stderr.write(r.get("stderr", ""))
    sys.exit(r.get("rc", 0))
sys.stderr.write("ERROR: the fake az has no rule for: " + " ".join(argv) + "\\n")
sys.exit(2)
"""

SUPPORTED = [
    {"name": "D4", "properties": {"category": "GeneralPurpose"}},
    {"name": "Consumption", "properties": {"category": "Consumption"}},
    {"name": "Consumption-GPU-NC8as-T4", "properties": {"category": "GPU"}},
    {"name": "Consumption-GPU-NC24-A100", "properties": {"category": "GPU"}},
]
RUNS = [
    {"name": "job-my-finetune-old", "properties": {"status": "Failed", "startTime": "2025-09-01T10:00:00Z"}},
    {"name": "job-my-finetune-new", "properties": {"status": "Running", "startTime": "2025-09-02T10:00:00Z"}},
]


def default_rules() -> dict[str, list[dict[str, Any]]]:
    """Canned answers, by command words; a test replaces entries to change the story."""
    outputs = {k: {"type": "String", "value": v} for k, v in OUTPUTS.items()}
    return {
        "account show": [{"stdout": {"id": OUTPUTS["SUBSCRIPTION_ID"], "name": "test"}}],
        "containerapp env workload-profile list-supported": [{"stdout": SUPPORTED}],
        "group create": [{"stdout": {"name": RG}}],
        "deployment group create": [
            {
                "stdout": {
                    "properties": {
                        "outputs": {
                            **outputs,
                            "ACA_JOB_NAME": {"type": "String", "value": JOB},
                            "ACA_APP_NAME": {"type": "String", "value": APP},
                            "ACA_APP_ENDPOINT": {"type": "String", "value": ENDPOINT},
                        }
                    }
                }
            }
        ],
        "storage account keys list": [{"stdout": [{"keyName": "key1", "value": STORAGE_KEY}]}],
        "storage file upload-batch": [{"stdout": []}],
        "storage file download-batch": [
            {
                "stdout": [],
                "create": {"models/adapter/adapter_config.json": "{}", "models/adapter/w": "x"},
            }
        ],
        "containerapp job secret set": [{"stdout": [{"name": "hf-token"}]}],
        "containerapp job secret list": [{"stdout": [{"name": "hf-token"}]}],
        "containerapp job update": [{"stdout": {"name": JOB}}],
        "containerapp job start": [
            {"stdout": {"id": "/x/executions/job-my-finetune-abc12", "name": "job-my-finetune-abc12"}}
        ],
        "containerapp job execution list": [{"stdout": RUNS}],
        "containerapp job execution show": [
            {"stdout": {"name": "job-my-finetune-new", "properties": {"status": "Running"}}},
            {"stdout": {"name": "job-my-finetune-new", "properties": {"status": "Succeeded"}}},
        ],
        "containerapp job logs show": [
            {"stdout": "2025-09-02T10:00:01Z step 1 loss 2.0\n2025-09-02T10:00:02Z step 2 loss 1.5\n"},
            {"stdout": "2025-09-02T10:00:02Z step 2 loss 1.5\n2025-09-02T10:00:03Z step 3 loss 1.0\n"},
        ],
        "containerapp show": [{"stdout": {"name": APP, "properties": {"latestRevisionName": f"{APP}--rev1"}}}],
        "containerapp revision restart": [{"stdout": '"Restart succeeded"'}],
        "containerapp secret show": [{"stdout": {"name": "api-key", "value": "existingKEY0123456789abcdef"}}],
    }


class Remote:
    """A rendered workspace, copied so each test may write into it, and a fake az on PATH."""

    def __init__(self, ws: Path, tmp: Path) -> None:
        self.ws = tmp / "ws"
        shutil.copytree(ws, self.ws)
        self.bin = tmp / "bin"
        self.bin.mkdir()
        az = self.bin / "az"
        az.write_text(f"#!{PY}\n{FAKE_AZ}", "utf-8")
        az.chmod(0o755)
        self.log = tmp / "az.log"
        self.rules_file = tmp / "rules.json"
        self.rules = default_rules()

    def configure(self, kind: str, **extra: str) -> None:
        """Write infra/<kind>.config.json as a deployment would have."""
        name = {"ACA_JOB_NAME": JOB} if kind == "finetuning" else {"ACA_APP_NAME": APP, "ACA_APP_ENDPOINT": ENDPOINT}
        (self.ws / "infra" / f"{kind}.config.json").write_text(json.dumps({**OUTPUTS, **name, **extra}), "utf-8")

    def environment(self, env: dict[str, str] | None = None, path: str | None = None) -> dict[str, str]:
        """The environment remote.py runs in: the fake az first on PATH, answering from the rules."""
        rules = [{"match": words, "responses": responses} for words, responses in self.rules.items()]
        # Longer command words first, so "containerapp job secret set" wins over "containerapp show".
        rules.sort(key=lambda r: -len(r["match"].split()))
        self.rules_file.write_text(json.dumps(rules), "utf-8")
        return {
            "PATH": path if path is not None else f"{self.bin}{os.pathsep}/usr/bin{os.pathsep}/bin",
            "FAKE_AZ_LOG": str(self.log),
            "FAKE_AZ_RULES": str(self.rules_file),
            "HOME": str(self.ws.parent),
            "PYTHONPATH": str(self.ws),  # the workspace package, as setup/setup.sh installs it
            **(env or {}),
        }

    def run(
        self, *args: str, env: dict[str, str] | None = None, path: str | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PY, str(self.ws / "infra" / "remote.py"), *args],
            env=self.environment(env, path),
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text("utf-8").splitlines()]

    def commands(self) -> list[str]:
        """Each az call as its command words (up to the first option)."""
        out = []
        for call in self.calls():
            words = []
            for a in call["argv"]:
                if a.startswith("-"):
                    break
                words.append(a)
            out.append(" ".join(words))
        return out


@pytest.fixture
def remote(render_factory, tmp_path: Path) -> Remote:
    return Remote(render_factory(model="tiny-random", platform="cpu", mode="remote"), tmp_path)


@pytest.fixture
def gated(render_factory, tmp_path: Path) -> Remote:
    return Remote(render_factory(model="meta-llama/Llama-3.2-1B-Instruct", platform="cuda", mode="remote"), tmp_path)


def value_of(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def assert_secret_hidden(remote: Remote, proc: subprocess.CompletedProcess, secret: str) -> None:
    assert secret not in proc.stdout and secret not in proc.stderr
    for call in remote.calls():
        assert not any(secret in a for a in call["argv"]), call["argv"]
    for path in remote.ws.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text("utf-8", errors="replace"), path


# ---------------------------------------------------------------- provisioning


def test_provision_finetuning(remote: Remote) -> None:
    proc = remote.run("provision-finetuning")
    assert proc.returncode == 0, proc.stderr
    assert remote.commands() == [
        "account show",
        "containerapp env workload-profile list-supported",
        "group create",
        "deployment group create",
    ]
    calls = remote.calls()
    assert value_of(calls[1]["argv"], "-l") == "swedencentral"
    assert value_of(calls[2]["argv"], "-n") == RG and value_of(calls[2]["argv"], "-l") == "swedencentral"
    deploy = calls[3]["argv"]
    assert value_of(deploy, "-g") == RG
    assert value_of(deploy, "-f") == str(remote.ws / "infra" / "provision" / "finetuning.bicep")
    assert value_of(deploy, "-p") == f"@{remote.ws / 'infra' / 'provision' / 'finetuning.parameters.json'}"
    assert not any("hfToken" in a for a in deploy), "no HF_TOKEN in the environment: no token parameter"
    assert deploy[-2:] == ["-o", "json"]
    saved = json.loads((remote.ws / "infra" / "finetuning.config.json").read_text("utf-8"))
    assert {**OUTPUTS, "ACA_JOB_NAME": JOB}.items() <= saved.items()


def test_provision_finetuning_passes_the_token_on_stdin(remote: Remote) -> None:
    proc = remote.run("provision-finetuning", env={"HF_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    deploy = remote.calls()[-1]
    assert "hfToken=@-" in deploy["argv"] and deploy["stdin"] == TOKEN
    assert_secret_hidden(remote, proc, TOKEN)


def test_provision_inference_generates_and_hides_an_api_key(remote: Remote) -> None:
    proc = remote.run("provision-inference")
    assert proc.returncode == 0, proc.stderr
    assert remote.commands() == [
        "account show",
        "containerapp env workload-profile list-supported",
        "group create",
        "deployment group create",
    ]
    deploy = remote.calls()[-1]
    assert value_of(deploy["argv"], "-f").endswith("inference.bicep")
    assert "apiKeyEnvName=FINETUNE_API_KEY" in deploy["argv"] and "apiKey=@-" in deploy["argv"]
    key = deploy["stdin"]
    assert len(key) >= 32
    assert proc.stdout.strip() == ENDPOINT
    assert_secret_hidden(remote, proc, key)
    saved = json.loads((remote.ws / "infra" / "inference.config.json").read_text("utf-8"))
    assert saved["ACA_APP_ENDPOINT"] == ENDPOINT and saved["ACA_APP_NAME"] == APP


def test_provision_inference_keeps_the_existing_key(remote: Remote) -> None:
    remote.configure("inference")
    proc = remote.run("provision-inference")
    assert proc.returncode == 0, proc.stderr
    assert remote.commands()[:3] == [
        "account show",
        "containerapp env workload-profile list-supported",
        "containerapp secret show",
    ]
    assert remote.calls()[-1]["stdin"] == "existingKEY0123456789abcdef"
    # A key the user chose, in the variable settings.toml names, wins.
    remote.log.unlink()
    proc = remote.run("provision-inference", env={"FINETUNE_API_KEY": "userCHOSENkey0123456789"})
    assert proc.returncode == 0, proc.stderr
    assert remote.calls()[-1]["stdin"] == "userCHOSENkey0123456789"
    assert_secret_hidden(remote, proc, "userCHOSENkey0123456789")


# ---------------------------------------------------------------- secrets


def test_set_secret_sends_the_token_on_stdin_only(remote: Remote) -> None:
    remote.configure("finetuning")
    proc = remote.run("set-secret", env={"HF_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    assert remote.commands() == ["account show", "containerapp job secret set", "containerapp job update"]
    secret_set, update = remote.calls()[1:]
    assert value_of(secret_set["argv"], "-n") == JOB and value_of(secret_set["argv"], "-g") == RG
    assert value_of(secret_set["argv"], "--secrets") == "hf-token=@-" and secret_set["stdin"] == TOKEN
    assert value_of(update["argv"], "--set-env-vars") == "HF_TOKEN=secretref:hf-token"
    assert value_of(update["argv"], "--container-name") == "finetune"
    assert_secret_hidden(remote, proc, TOKEN)


def test_set_secret_never_takes_the_token_from_argv(remote: Remote) -> None:
    remote.configure("finetuning")
    proc = remote.run("set-secret", TOKEN)
    assert proc.returncode == 2 and remote.calls() == []
    # No HF_TOKEN and no terminal to ask on: one clear line.
    proc = remote.run("set-secret")
    one_error_line(proc, "HF_TOKEN")
    assert "containerapp job secret set" not in remote.commands()


# ---------------------------------------------------------------- fine-tuning


def test_upload_leaves_out_models_caches_venvs_and_secrets(remote: Remote) -> None:
    remote.configure("finetuning")
    ws = remote.ws
    for rel in (
        "model-cache/tiny-random/config.json",
        "models/adapter/adapter_config.json",
        ".git/HEAD",
        ".venv/pyvenv.cfg",
        ".venv/lib/site.py",
        "myenv/pyvenv.cfg",
        "myenv/bin/python",
        "finetuning/__pycache__/data.cpython-311.pyc",
        ".cache/pip/wheel",
        ".env",
        "dataset/extra.jsonl",
    ):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text("x", "utf-8")
    proc = remote.run("upload")
    assert proc.returncode == 0, proc.stderr
    assert remote.commands() == ["account show", "storage account keys list", "storage file upload-batch"]
    upload = remote.calls()[-1]
    files = set(upload["files"])
    for wanted in (
        "settings.toml",
        "finetuning/invoke_olive.py",
        "infra/job.sh",
        "infra/remote.py",
        "dataset/extra.jsonl",
    ):
        assert wanted in files, wanted
    for prefix in (
        "model-cache/",
        "models/",
        ".git/",
        ".venv/",
        "myenv/",
        ".cache/",
        "finetuning/__pycache__/",
    ):
        assert not any(f.startswith(prefix) for f in files), prefix
    assert ".env" not in files
    assert value_of(upload["argv"], "--destination") == "workspace"
    assert value_of(upload["argv"], "--account-name") == OUTPUTS["STORAGE_ACCOUNT_NAME"]
    # The storage key reaches az through its environment, never its command line.
    assert upload["storage_key"] == STORAGE_KEY
    assert_secret_hidden(remote, proc, STORAGE_KEY)


def test_upload_leaves_out_secret_files_at_any_depth_and_says_which(remote: Remote) -> None:
    """Every kind on the documented list (tuner/cloud/containerapps.py SECRET_FILES, SECRET_DIRS), at the top
    and in subfolders, stays home; look-alikes and ordinary files still go; one line names them."""
    remote.configure("finetuning")
    secret_files = [
        ".env",
        ".env.production",
        "sub/.env.local",
        ".envrc",
        "keys/server.pem",
        "infra/tls.KEY",
        ".netrc",
        "dataset/.git-credentials",
    ]
    secret_dirs = [".huggingface/", ".azure/", ".ssh/", "sub/deeper/.ssh/"]
    inside = {".huggingface/": "token", ".azure/": "config", ".ssh/": "id_rsa", "sub/deeper/.ssh/": "id_ed25519"}
    ordinary = ["sub/notes.md", "keys/README.md", "environment.yml", "sub/keys.py", "dataset/pem.jsonl"]
    for rel in [*secret_files, *(d + inside[d] for d in secret_dirs), *ordinary]:
        (remote.ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote.ws / rel).write_text("ordinary" if rel in ordinary else TOKEN, "utf-8")
    proc = remote.run("upload")
    assert proc.returncode == 0, proc.stderr
    files = set(remote.calls()[-1]["files"])
    assert set(ordinary) <= files and "settings.toml" in files and "infra/remote.py" in files
    leaked = [f for f in files if f in secret_files or any(f.startswith(d) for d in secret_dirs)]
    assert not leaked, leaked
    # Nothing uploaded carries the planted token (every secret file holds it).
    assert not [f for f in files if TOKEN in (remote.ws / f).read_text("utf-8", errors="replace")]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("Left out, as they may hold secrets: ")]
    assert line.split(": ", 1)[1].split(", ") == sorted(secret_files + secret_dirs)


def test_run_finetuning_uploads_starts_and_prints_the_execution(remote: Remote) -> None:
    remote.configure("finetuning")
    proc = remote.run("run-finetuning")
    assert proc.returncode == 0, proc.stderr
    assert remote.commands() == [
        "account show",
        "storage account keys list",
        "storage file upload-batch",
        "containerapp job start",
    ]
    start = remote.calls()[-1]["argv"]
    assert value_of(start, "-n") == JOB and value_of(start, "-g") == RG
    assert proc.stdout.strip().splitlines()[-1] == "job-my-finetune-abc12"
    remote.log.unlink()
    proc = remote.run("run-finetuning", "--no-upload")
    assert proc.returncode == 0 and remote.commands() == ["account show", "containerapp job start"]


def test_run_finetuning_of_a_gated_model_needs_the_secret(gated: Remote) -> None:
    gated.configure("finetuning")
    gated.rules["containerapp job secret list"] = [{"stdout": []}]
    proc = gated.run("run-finetuning")
    one_error_line(proc, "gated", "set-secret")
    assert gated.commands() == ["account show", "containerapp job secret list"]
    gated.rules["containerapp job secret list"] = [{"stdout": [{"name": "hf-token"}]}]
    gated.log.unlink()
    proc = gated.run("run-finetuning", "--no-upload")
    assert proc.returncode == 0, proc.stderr
    assert gated.commands() == ["account show", "containerapp job secret list", "containerapp job start"]


def test_status_lists_the_latest_runs_first(remote: Remote) -> None:
    remote.configure("finetuning")
    proc = remote.run("status")
    assert proc.returncode == 0, proc.stderr
    assert remote.commands() == ["account show", "containerapp job execution list"]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("job-my-finetune-new\tRunning") and lines[1].startswith("job-my-finetune-old\tFailed")


def test_logs_follow_reconnect_and_stop_when_the_run_ends(remote: Remote) -> None:
    remote.configure("finetuning")
    proc = remote.run("logs", "--interval", "0")
    assert proc.returncode == 0, proc.stderr
    assert remote.commands() == [
        "account show",
        "containerapp job execution list",
        "containerapp job logs show",
        "containerapp job execution show",
        "containerapp job logs show",
        "containerapp job execution show",
    ]
    stream = remote.calls()[2]["argv"]
    assert value_of(stream, "--execution") == "job-my-finetune-new"  # the latest run
    assert value_of(stream, "--follow") == "true" and value_of(stream, "--container") == "finetune"
    assert value_of(remote.calls()[3]["argv"], "--job-execution-name") == "job-my-finetune-new"
    # Lines a reconnection repeats are printed once.
    assert [line.split()[-1] for line in proc.stdout.splitlines()] == ["2.0", "1.5", "1.0"]
    assert "Succeeded" in proc.stderr


def test_logs_exit_non_zero_when_the_run_fails(remote: Remote) -> None:
    remote.configure("finetuning")
    remote.rules["containerapp job execution show"] = [{"stdout": {"properties": {"status": "Failed"}}}]
    remote.rules["containerapp job logs show"] = [{"rc": 1, "stderr": "ERROR: stream closed\n"}]
    proc = remote.run("logs", "--execution", "job-my-finetune-old", "--interval", "0")
    assert proc.returncode == 1 and "Failed" in proc.stderr
    assert "containerapp job execution list" not in remote.commands()


def test_fetch_replaces_the_local_adapter(remote: Remote) -> None:
    remote.configure("finetuning")
    adapter = remote.ws / "models" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "stale.bin").write_text("old", "utf-8")
    proc = remote.run("fetch")
    assert proc.returncode == 0, proc.stderr
    assert remote.commands() == ["account show", "storage account keys list", "storage file download-batch"]
    download = remote.calls()[-1]["argv"]
    assert value_of(download, "--pattern") == "models/adapter/*"
    assert value_of(download, "--source") == "workspace"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "stale.bin").exists()
    assert [p.name for p in adapter.parent.iterdir()] == ["adapter"], "no temporary folder left behind"


def test_fetch_killed_at_the_swap_keeps_the_previous_adapter(remote: Remote) -> None:
    """fetch killed between moving the local adapter aside and putting the share's in place: the
    local adapter is kept whole, and the next fetch (or fine-tuning run) finds it first."""
    remote.configure("finetuning")
    adapter = remote.ws / "models" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("local", "utf-8")

    def fetch() -> None:
        os.environ.update(remote.environment())
        sys.argv = ["remote.py", "fetch"]
        runpy.run_path(str(remote.ws / "infra" / "remote.py"), run_name="__main__")

    killed_at_swap(adapter, fetch)
    previous = adapter.with_name("adapter.previous")
    assert not adapter.exists() and (previous / "adapter_config.json").read_text("utf-8") == "local"
    recover_adapter(adapter, remote.ws)  # what the next fine-tuning run does first
    assert (adapter / "adapter_config.json").read_text("utf-8") == "local" and not previous.exists()
    shutil.move(adapter, previous)  # killed there again; this time the next fetch repairs it
    proc = remote.run("fetch")
    assert proc.returncode == 0, proc.stderr
    assert (adapter / "adapter_config.json").read_text("utf-8") == "{}" and (adapter / "w").is_file()
    assert [p.name for p in adapter.parent.iterdir()] == ["adapter"]


def test_fetch_without_an_adapter_on_the_share(remote: Remote) -> None:
    remote.configure("finetuning")
    remote.rules["storage file download-batch"] = [{"stdout": []}]
    one_error_line(remote.run("fetch"), "no adapter")


# ---------------------------------------------------------------- inference


def test_deploy_inference_syncs_and_restarts(remote: Remote) -> None:
    remote.configure("inference")
    proc = remote.run("deploy-inference")
    assert proc.returncode == 0, proc.stderr
    assert remote.commands() == [
        "account show",
        "storage account keys list",
        "storage file upload-batch",
        "containerapp show",
        "containerapp revision restart",
    ]
    restart = remote.calls()[-1]["argv"]
    assert value_of(restart, "--revision") == f"{APP}--rev1" and value_of(restart, "-n") == APP
    assert proc.stdout.strip() == ENDPOINT
    assert "models/adapter/adapter_config.json" not in remote.calls()[2]["files"]


def test_deploy_inference_with_a_local_adapter(remote: Remote) -> None:
    remote.configure("inference")
    adapter = remote.ws / "models" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}", "utf-8")
    proc = remote.run("deploy-inference", "--with-adapter")
    assert proc.returncode == 0, proc.stderr
    assert "models/adapter/adapter_config.json" in remote.calls()[2]["files"]


def test_endpoint(remote: Remote) -> None:
    one_error_line(remote.run("endpoint"), "provision-inference")
    remote.configure("inference")
    proc = remote.run("endpoint")
    assert proc.returncode == 0 and proc.stdout.strip() == ENDPOINT
    assert remote.calls() == [], "the endpoint is read from infra/inference.config.json"
    proc = remote.run("endpoint", "--show-key")
    assert proc.stdout.split() == [ENDPOINT, "existingKEY0123456789abcdef"]
    assert remote.commands() == ["account show", "containerapp secret show"]


# ---------------------------------------------------------------- preflight and failures


def test_preflight_az_missing(remote: Remote, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(remote.run("provision-finetuning", path=str(empty)), "Azure CLI", "not installed")


def test_preflight_not_logged_in(remote: Remote) -> None:
    remote.rules["account show"] = [{"rc": 1, "stderr": "ERROR: Please run 'az login' to setup account.\n"}]
    one_error_line(remote.run("provision-finetuning"), "not logged in", "az login")
    assert remote.commands() == ["account show"]


def test_preflight_region_without_the_gpu_profile(remote: Remote) -> None:
    remote.rules["containerapp env workload-profile list-supported"] = [{"stdout": SUPPORTED[:2] + SUPPORTED[3:]}]
    line = one_error_line(remote.run("provision-finetuning"), "swedencentral", "Consumption-GPU-NC8as-T4")
    assert "Consumption-GPU-NC24-A100" in line, "say what the region does offer"
    assert "deployment group create" not in remote.commands()


def test_az_failure_is_one_clear_line(remote: Remote) -> None:
    arm = {"code": "InvalidTemplateDeployment", "message": "The template deployment failed: quota."}
    remote.rules["deployment group create"] = [
        {"rc": 1, "stderr": "WARNING: bicep warning\nERROR: " + json.dumps(arm) + "\n"}
    ]
    proc = remote.run("provision-finetuning")
    assert proc.returncode == 1
    line = one_error_line(proc, "az deployment group create", "InvalidTemplateDeployment", "quota")
    assert line == "error: `az deployment group create` failed: InvalidTemplateDeployment: " + arm["message"]
    assert not (remote.ws / "infra" / "finetuning.config.json").exists()
    remote.configure("finetuning")
    remote.rules["containerapp job start"] = [{"rc": 3, "stderr": "ERROR: (JobNotFound) no such job\nmore detail\n"}]
    one_error_line(remote.run("run-finetuning", "--no-upload"), "az containerapp job start", "JobNotFound")


def test_missing_config_says_which_command_to_run(remote: Remote) -> None:
    for command in ("set-secret", "upload", "run-finetuning", "status", "logs", "fetch"):
        one_error_line(remote.run(command), "provision-finetuning")
    one_error_line(remote.run("deploy-inference"), "provision-inference")
    assert remote.calls() == []


# ---------------------------------------------------------------- finetune: the targets


def set_azure(remote: Remote, **values: str) -> None:
    """Fill [azure] keys of the workspace's settings.toml, as a user would."""
    path = remote.ws / "settings.toml"
    text = path.read_text("utf-8")
    for key, value in values.items():
        assert f'\n{key} = ""\n' in text, key
        text = text.replace(f'\n{key} = ""\n', f"\n{key} = {json.dumps(value)}\n")
    path.write_text(text, "utf-8")


def test_finetune_defaults_to_the_container_apps_job(remote: Remote) -> None:
    remote.configure("finetuning")
    proc = remote.run("finetune", "--no-upload")
    assert proc.returncode == 0, proc.stderr
    assert remote.commands() == ["account show", "containerapp job start"]
    assert proc.stdout.strip() == "job-my-finetune-abc12"
    remote.log.unlink()
    proc = remote.run("finetune", "--target", "containerapps")
    assert proc.returncode == 0, proc.stderr
    assert remote.commands() == [
        "account show",
        "storage account keys list",
        "storage file upload-batch",
        "containerapp job start",
    ]


def test_finetune_on_azureml_submits_a_multi_node_command_job(remote: Remote) -> None:
    import yaml

    set_azure(remote, ml_workspace="mlw-finetune", ml_compute="gpu-a100x8")
    remote.rules["ml job create"] = [
        {"stdout": {"name": "sharp_lamp_x1", "services": {"Studio": {"endpoint": "https://ml.azure.com/runs/x1"}}}}
    ]
    for rel in (".env", "keys/server.pem", ".ssh/id_rsa", "models/adapter/adapter_config.json"):
        (remote.ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote.ws / rel).write_text(TOKEN, "utf-8")
    proc = remote.run("finetune", "--target", "azureml", "--nodes", "2", "--gpus-per-node", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "sharp_lamp_x1"
    assert "az ml job stream -n sharp_lamp_x1" in proc.stderr and "https://ml.azure.com/runs/x1" in proc.stderr
    assert remote.commands() == ["account show", "ml job create"]
    call = remote.calls()[-1]
    argv = call["argv"]
    assert value_of(argv, "-g") == RG and value_of(argv, "-w") == "mlw-finetune"
    assert Path(value_of(argv, "--file")).name == "job.yml" and argv[-2:] == ["-o", "json"]

    job = yaml.safe_load(call["texts"]["job.yml"])
    assert job["type"] == "command" and job["code"] == "code"
    assert job["compute"] == "azureml:gpu-a100x8"
    assert job["resources"] == {"instance_count": 2}
    assert job["distribution"] == {"type": "pytorch", "process_count_per_instance": 8}
    assert job["command"] == "bash infra/azureml.sh"
    assert job["environment"] == {"build": {"path": "environment"}}
    assert job["environment_variables"] == {"ADAPTER_PATH": "models/adapter"}

    # The code folder is the workspace as an upload sends it: no secrets, models or caches.
    code = {f.removeprefix("code/") for f in call["staged"] if f.startswith("code/")}
    assert {"settings.toml", "infra/azureml.sh", "setup/download_model.py", "tuner/data.py"} <= code
    assert not {".env", "keys/server.pem", ".ssh/id_rsa"} & code
    assert not any(f.startswith(("models/", "model-cache/")) for f in code)
    # Azure ML is told the same list, in .amlignore (which it reads instead of .gitignore).
    ignored = set(call["texts"]["code/.amlignore"].splitlines())
    assert {".env*", "*.pem", "*.key", ".netrc", ".git-credentials", ".ssh/", ".azure/", "/models/"} <= ignored
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("Left out, as they may hold secrets: ")]
    assert line.endswith(".env, .ssh/, keys/server.pem")

    # The image: the Container Apps job's base image, then torch, then the rest, as setup.sh does.
    docker = call["texts"]["environment/Dockerfile"]
    image = json.loads((remote.ws / "infra" / "provision" / "finetuning.parameters.json").read_text("utf-8"))
    assert docker.splitlines()[0] == f"FROM {image['parameters']['image']['value']}"
    assert docker.index("requirements-torch-cuda.txt") < docker.index("-r /tmp/requirements-cuda.txt")
    for name in ("requirements-torch-cuda.txt", "requirements-cuda.txt"):
        assert call["texts"][f"environment/{name}"] == (remote.ws / "setup" / name).read_text("utf-8")
    assert TOKEN not in proc.stdout + proc.stderr + json.dumps(call)


def test_finetune_on_azureml_needs_the_ml_names(remote: Remote) -> None:
    proc = remote.run("finetune", "--target", "azureml")
    assert proc.returncode == 1
    one_error_line(proc, "--target azureml", "ml_workspace and ml_compute")
    set_azure(remote, ml_workspace="mlw-finetune")
    line = one_error_line(remote.run("finetune", "--target", "azureml"), "ml_compute", "settings.toml")
    assert "ml_workspace" not in line
    assert remote.calls() == [], "nothing is asked of Azure before the settings are complete"


def test_finetune_on_azureml_refuses_a_gated_model(gated: Remote) -> None:
    set_azure(gated, ml_workspace="mlw", ml_compute="gpus")
    one_error_line(gated.run("finetune", "--target", "azureml"), "gated", "HF_TOKEN")
    assert gated.calls() == []


@pytest.mark.parametrize(
    "args, words",
    [
        (["--target", "azureml", "--nodes", "0"], ["--nodes", "1 or more"]),
        (["--target", "azureml", "--gpus-per-node", "-2"], ["--gpus-per-node", "1 or more"]),
        (["--nodes", "2"], ["--target azureml"]),
        (["--target", "azureml", "--no-upload"], ["--no-upload"]),
    ],
)
def test_finetune_refuses_bad_arguments(remote: Remote, args: list[str], words: list[str]) -> None:
    proc = remote.run("finetune", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert all(w in line for w in words), line
    assert remote.calls() == []


# ---------------------------------------------------------------- --settings PATH


def test_settings_path_is_what_the_remote_run_reads(remote: Remote, tmp_path: Path) -> None:
    remote.configure("finetuning")
    other = tmp_path / "experiment.toml"
    text = (remote.ws / "settings.toml").read_text("utf-8")
    other.write_text(text + "\n# the experiment's settings\n", "utf-8")
    for args in (["--settings", str(other), "upload"], ["upload", "--settings", str(other)]):
        proc = remote.run(*args)
        assert proc.returncode == 0, proc.stderr
    # The share gets the file given as its settings.toml; the workspace's own file is untouched.
    staged = [c for c in remote.calls() if c["argv"][:3] == ["storage", "file", "upload-batch"]]
    assert [c["settings"] for c in staged] == [other.read_text("utf-8")] * 2
    assert (remote.ws / "settings.toml").read_text("utf-8") == text
    # A file without [azure] (a local workspace's) is one line naming it.
    other.write_text(text.split("\n[azure]")[0], "utf-8")
    one_error_line(remote.run("--settings", str(other), "status"), str(other), "[azure]")


# ---------------------------------------------------------------- tuner/cloud/containerapps.py, imported directly


def test_stage_sends_the_given_settings_and_leaves_the_workspace_alone(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    files = ["settings.toml", "tuner/data.py", ".env.local", "Server.PEM", "sub/.ssh/id", "models/a/w", "v/pyvenv.cfg"]
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel, "utf-8")
    other = tmp_path / "experiment.toml"
    other.write_text("[azure]\n", "utf-8")
    ctx = package.Context(root, other, {})
    dest = tmp_path / "staged"
    assert package.stage(ctx, dest) == 2  # settings.toml and tuner/data.py
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "settings.toml",
        "tuner/data.py",
    ]
    assert (dest / "settings.toml").read_text("utf-8") == "[azure]\n"
    # The staged copy was a hard link to the workspace's file: replacing it must not write through.
    assert (root / "settings.toml").read_text("utf-8") == "settings.toml"


def test_load_context_checks_the_azure_section(remote: Remote, tmp_path: Path) -> None:
    text = (remote.ws / "settings.toml").read_text("utf-8")
    path = tmp_path / "s.toml"
    path.write_text(text.replace('subscription = ""', 'subscription = "sub-1"'), "utf-8")
    ctx = package.load_context(tmp_path, path)
    assert ctx.az.subscription == "sub-1" and ctx.infra == tmp_path / "infra"
    assert package.load_context(tmp_path, path, ("azure.subscription=sub-2",)).az.subscription == "sub-2"
    path.write_text(text.split("\n[azure]")[0], "utf-8")  # a local workspace's settings
    with pytest.raises(AzureError, match=r"s\.toml needs \[azure\] resource_group and location$"):
        package.load_context(tmp_path, path)
    # A workspace from before [azure] moved here is told where it went.
    (tmp_path / "infra").mkdir()
    (tmp_path / "infra" / "azure.toml").write_text('[azure]\nresource_group = "rg"\n', "utf-8")
    with pytest.raises(AzureError, match=r"infra/azure\.toml is no longer read: move its \[azure\] there"):
        package.load_context(tmp_path, path)
    path.write_text(text.replace('location = "', 'place = "'), "utf-8")
    with pytest.raises(
        SettingsError, match=r"s\.toml:\d+: azure\.place is not a setting; \[azure\] has: subscription,"
    ):
        package.load_context(tmp_path, path)
    path.write_text("[azure\n", "utf-8")
    with pytest.raises(SettingsError, match="invalid TOML"):
        package.load_context(tmp_path, path)


def test_set_reaches_the_remote_run(remote: Remote) -> None:
    """`remote.py --set ...` changes what the run reads: the settings.toml sent has the overrides,
    before or after the command; the workspace's own file is untouched."""
    remote.configure("finetuning")
    text = (remote.ws / "settings.toml").read_text("utf-8")
    proc = remote.run("--set", "train.lora_r=8", "upload", "--set", "train.seed=7")
    assert proc.returncode == 0, proc.stderr
    (staged,) = [c["settings"] for c in remote.calls() if c["argv"][:3] == ["storage", "file", "upload-batch"]]
    sent = check_settings(tomllib.loads(staged))
    assert sent["train"]["lora_r"] == 8 and sent["train"]["seed"] == 7
    assert sent == with_overrides(load_settings(remote.ws / "settings.toml"), ["train.lora_r=8", "train.seed=7"])
    assert (remote.ws / "settings.toml").read_text("utf-8") == text
    one_error_line(remote.run("upload", "--set", "train.lora_r=0"), "train.lora_r = 0 is not valid")
