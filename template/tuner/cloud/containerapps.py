"""Fine-tune and serve on Azure Container Apps: what `python infra/remote.py COMMAND` does.

Every command is given a Context (the workspace root and its settings) and returns the exit
status. Progress goes to stderr, results (a run's name, an endpoint) to stdout. Reads
settings.toml's [azure] and infra/provision/*.parameters.json; saves what a deployment
created to infra/*.config.json. Secrets (HF_TOKEN, the API key) reach az on its standard
input, never a command line or a file.
"""

from __future__ import annotations

import fnmatch
import getpass
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.cloud.az import Az, AzureError, first_error
from tuner.files import replace_folder
from tuner.settings import ADAPTER, dump_settings, load_settings, with_overrides

# The same names as in provision/*.bicep (hfTokenSecretName, apiKeySecretName, container names).
HF_SECRET = "hf-token"
API_KEY_SECRET = "api-key"
JOB_CONTAINER = "finetune"
ENDED = {"Succeeded", "Failed", "Stopped", "Degraded"}
# Never uploaded: big or rebuilt on the other side (models/ on the share is the job's output),
# or machine-specific.
SKIP_TOP = {"model-cache", "models", ".cache"}
SKIP_DIRS = {".git", "__pycache__", ".venv", "venv", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
SKIP_DIRS |= {"node_modules", ".ipynb_checkpoints"}
# Never uploaded either, at any depth, because they may hold credentials: anyone with the storage
# account's key reads the share, and the job needs none of them (HF_TOKEN reaches it as a secret).
# Files: dotenv files `.env*` (.env, .env.local, .envrc), keys `*.pem` and `*.key`, `.netrc`,
# git's credential store `.git-credentials`; folders: `.huggingface/`, `.azure/`, `.ssh/`.
# Names match case-insensitively. README.md lists them too; upload prints the ones it left out.
SECRET_FILES = (".env*", "*.pem", "*.key", ".netrc", ".git-credentials")
SECRET_DIRS = {".huggingface", ".azure", ".ssh"}


@dataclass(frozen=True)
class Context:
    """What every command works on: the workspace, the settings file it was given, and its
    settings with the command line's --set overrides."""

    root: Path
    settings_path: Path
    settings: dict[str, Any]
    overrides: tuple[str, ...] = ()

    @property
    def infra(self) -> Path:
        return self.root / "infra"

    @property
    def azure(self) -> dict[str, str]:
        return self.settings["azure"]

    @property
    def az(self) -> Az:
        return Az(self.azure["subscription"])


def load_context(root: Path, settings_path: Path, overrides: tuple[str, ...] = ()) -> Context:
    """The settings at settings_path with the overrides, checked for what every command needs ([azure])."""
    settings = with_overrides(load_settings(settings_path), list(overrides))
    if "azure" not in settings:
        hint = ""
        if (root / "infra" / "azure.toml").is_file():  # where workspaces rendered before kept [azure]
            hint = " (infra/azure.toml is no longer read: move its [azure] there)"
        raise AzureError(f"{settings_path} needs [azure] resource_group and location{hint}")
    return Context(root, settings_path, settings, tuple(overrides))


def info(message: str) -> None:
    # Progress goes to stderr, so stdout carries only results (an execution name, an endpoint).
    print(message, file=sys.stderr, flush=True)


def api_key_env(settings: dict[str, Any]) -> str:
    return settings["serve"]["api_key_env"]


# ---------------------------------------------------------------- config files


def parameters(ctx: Context, kind: str) -> dict[str, Any]:
    path = ctx.infra / "provision" / f"{kind}.parameters.json"
    return json.loads(path.read_text("utf-8"))["parameters"]


def load_config(ctx: Context, kind: str) -> dict[str, str]:
    path = ctx.infra / f"{kind}.config.json"
    if not path.is_file():
        raise AzureError(f"infra/{kind}.config.json not found: run `python infra/remote.py provision-{kind}` first")
    return json.loads(path.read_text("utf-8"))


def job_ref(cfg: dict[str, str]) -> list[str]:
    return ["-n", cfg["ACA_JOB_NAME"], "-g", cfg["RESOURCE_GROUP_NAME"]]


def app_ref(cfg: dict[str, str]) -> list[str]:
    return ["-n", cfg["ACA_APP_NAME"], "-g", cfg["RESOURCE_GROUP_NAME"]]


def deploy(ctx: Context, kind: str, extra: list[str], stdin: str | None) -> dict[str, str]:
    """Create the resource group, deploy provision/<kind>.bicep, save its outputs."""
    group = ctx.azure["resource_group"]
    ctx.az("group create -n", group, "-l", ctx.azure["location"])
    info(f"Deploying infra/provision/{kind}.bicep to {group} (a few minutes)...")
    source = ["-f", str(ctx.infra / "provision" / f"{kind}.bicep")]
    source += ["-p", f"@{ctx.infra / 'provision' / f'{kind}.parameters.json'}"]
    result = ctx.az("deployment group create -g", group, "-n", kind, *source, *extra, stdin=stdin)
    outputs = {k: v["value"] for k, v in result["properties"]["outputs"].items()}
    (ctx.infra / f"{kind}.config.json").write_text(json.dumps(outputs, indent=2) + "\n", "utf-8")
    info(f"Saved infra/{kind}.config.json")
    return outputs


# ---------------------------------------------------------------- what leaves this machine


def is_secret(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name.lower(), pattern) for pattern in SECRET_FILES)


def workspace_files(root: Path, extra: list[Path]) -> tuple[list[Path], list[str]]:
    """The files to send, and the secret ones left out (relative paths, folders ending in /)."""
    files: list[Path] = []
    secret: list[str] = []
    for start in [root, *extra]:
        for top, dirs, names in os.walk(start):
            here = Path(top)
            secret += [f"{(here / d).relative_to(root).as_posix()}/" for d in dirs if d.lower() in SECRET_DIRS]
            dirs[:] = [
                d
                for d in dirs
                if d not in SKIP_DIRS
                and d.lower() not in SECRET_DIRS
                and not (here == root and d in SKIP_TOP)
                and not (here / d / "pyvenv.cfg").exists()
                and not (here / d / "conda-meta").exists()
            ]
            secret += [(here / n).relative_to(root).as_posix() for n in names if is_secret(n)]
            files += [here / n for n in names if not (is_secret(n) or n.endswith(".pyc"))]
    return files, sorted(secret)


def stage(ctx: Context, dest: Path, extra: list[Path] | None = None) -> int:
    """Lay out in dest what a remote run gets, and return how many files: the workspace without
    what workspace_files leaves out, and the settings file given as its settings.toml."""
    files, secret = workspace_files(ctx.root, extra or [])
    if secret:
        info(f"Left out, as they may hold secrets: {', '.join(secret)}")
    for path in files:
        target = dest / path.relative_to(ctx.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)  # no copy when the temp folder is on the same disk
        except OSError:
            shutil.copy2(path, target)
    # The remote scripts read settings.toml: with --settings OTHER.toml, that file is the one to
    # send; with --set, the settings as changed (without the file's comments).
    if ctx.overrides or ctx.settings_path.resolve() != (ctx.root / "settings.toml").resolve():
        (dest / "settings.toml").unlink(missing_ok=True)  # a hard link: never write through it
        if ctx.overrides:
            (dest / "settings.toml").write_text(dump_settings(ctx.settings), "utf-8")
        else:
            shutil.copyfile(ctx.settings_path, dest / "settings.toml")
    return len(files)


def storage_env(ctx: Context, cfg: dict[str, str]) -> dict[str, str]:
    # The account key travels in az's environment (AZURE_STORAGE_KEY), not on its command line.
    keys = ctx.az("storage account keys list -g", cfg["RESOURCE_GROUP_NAME"], "-n", cfg["STORAGE_ACCOUNT_NAME"])
    return {**os.environ, "AZURE_STORAGE_KEY": keys[0]["value"]}


def upload(ctx: Context, cfg: dict[str, str], extra: list[Path] | None = None) -> None:
    """Copy the workspace to the file share: stage the files to send, then one upload-batch."""
    env = storage_env(ctx, cfg)
    with tempfile.TemporaryDirectory(prefix="remote-upload-") as tmp:
        count = stage(ctx, Path(tmp), extra)
        info(f"Uploading {count} files to share {cfg['FILE_SHARE_NAME']}...")
        share = ["--destination", cfg["FILE_SHARE_NAME"], "--account-name", cfg["STORAGE_ACCOUNT_NAME"]]
        ctx.az("storage file upload-batch --no-progress --max-connections 4", *share, "--source", tmp, env=env)


# ---------------------------------------------------------------- fine-tuning


def provision_finetuning(ctx: Context) -> int:
    ctx.az.login()
    ctx.az.check_gpu_profile(ctx.azure["location"], parameters(ctx, "finetuning")["gpuProfile"]["value"])
    token = os.environ.get("HF_TOKEN") or None
    out = deploy(ctx, "finetuning", ["-p", "hfToken=@-"] if token else [], token)
    info(f"Job {out['ACA_JOB_NAME']} is ready" + (" with HF_TOKEN as a secret" if token else ""))
    if ctx.settings["model"]["gated"] and not token:
        info(f"{ctx.settings['model']['id']} is gated: run `python infra/remote.py set-secret` before a run")
    return 0


def read_token() -> str:
    token = os.environ.get("HF_TOKEN", "")
    if not token and sys.stdin.isatty():
        token = getpass.getpass("Hugging Face token (input hidden): ")
    if not token.strip():
        raise AzureError("no Hugging Face token: set HF_TOKEN in the environment, or run in a terminal to be asked")
    return token.strip()


def set_secret(ctx: Context) -> int:
    cfg = load_config(ctx, "finetuning")
    ctx.az.login()
    token = read_token()
    # `name=@-`: az reads the value from its standard input, so no process list ever shows it.
    ctx.az("containerapp job secret set", *job_ref(cfg), "--secrets", f"{HF_SECRET}=@-", stdin=token)
    wire = ["--container-name", JOB_CONTAINER, "--set-env-vars", f"HF_TOKEN=secretref:{HF_SECRET}"]
    ctx.az("containerapp job update", *job_ref(cfg), *wire)
    info(f"Secret {HF_SECRET} set on job {cfg['ACA_JOB_NAME']}; runs see it as HF_TOKEN")
    return 0


def upload_workspace(ctx: Context) -> int:
    cfg = load_config(ctx, "finetuning")
    ctx.az.login()
    upload(ctx, cfg)
    return 0


def run_finetuning(ctx: Context, upload_first: bool = True) -> int:
    """Upload the workspace (unless upload_first is False), start a run of the job, print its name."""
    cfg = load_config(ctx, "finetuning")
    ctx.az.login()
    if ctx.settings["model"]["gated"]:
        names = {s.get("name") for s in ctx.az("containerapp job secret list", *job_ref(cfg)) or []}
        if HF_SECRET not in names:
            raise AzureError(
                f"{ctx.settings['model']['id']} is gated and job {cfg['ACA_JOB_NAME']} has no HF_TOKEN secret: "
                "run `python infra/remote.py set-secret` first"
            )
    if upload_first:
        upload(ctx, cfg)
    execution = ctx.az("containerapp job start", *job_ref(cfg))
    info("Started; follow it with `python infra/remote.py logs`")
    print(execution["name"])
    return 0


def executions(ctx: Context, cfg: dict[str, str]) -> list[dict[str, Any]]:
    runs = ctx.az("containerapp job execution list", *job_ref(cfg))
    return sorted(runs or [], key=lambda r: r.get("properties", {}).get("startTime") or "", reverse=True)


def status(ctx: Context, execution: str | None) -> int:
    cfg = load_config(ctx, "finetuning")
    ctx.az.login()
    runs = executions(ctx, cfg)
    if execution:
        runs = [r for r in runs if r["name"] == execution]
    if not runs:
        print("no runs" + (f" named {execution}" if execution else " yet"))
        return 0
    for run in runs[:5]:
        props = run.get("properties", {})
        times = [props.get("startTime") or "", props.get("endTime") or ""]
        print("\t".join([run["name"], props.get("status", "?"), *times]))
    return 0


def logs(ctx: Context, execution: str | None, interval: float) -> int:
    """Follow a run's log until it ends (exit 0 only if it succeeded), reconnecting on drops."""
    cfg = load_config(ctx, "finetuning")
    ctx.az.login()
    if not execution:
        runs = executions(ctx, cfg)
        if not runs:
            raise AzureError("the job has no runs yet: start one with `python infra/remote.py run-finetuning`")
        execution = runs[0]["name"]
    recent: deque[str] = deque(maxlen=300)  # to skip lines a reconnection prints again
    tail = "300"
    # `job logs` lives in az's containerapp extension: let az install it without asking.
    env = {**os.environ, "AZURE_EXTENSION_USE_DYNAMIC_INSTALL": "yes_without_prompt"}
    while True:
        stream = ("--container", JOB_CONTAINER, "--execution", execution, "--tail", tail, *job_ref(cfg))
        command = ctx.az.argv("containerapp job logs show --follow true --format text", *stream)
        seen = set(recent)
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            assert proc.stdout is not None
            for line in proc.stdout:
                if line in seen:
                    continue
                recent.append(line)
                sys.stdout.write(line)
                sys.stdout.flush()
            proc.wait()
            err.seek(0)
            problem = first_error(err.read(), proc.returncode) if proc.returncode else ""
        run = ctx.az("containerapp job execution show", *job_ref(cfg), "--job-execution-name", execution)
        state = run.get("properties", {}).get("status") or "Unknown"
        if state in ENDED:
            info(f"{execution}: {state}")
            return 0 if state == "Succeeded" else 1
        # The stream drops when a replica is still starting or on network hiccups: reconnect.
        info(f"{execution} is {state}; log stream ended{f' ({problem})' if problem else ''}, reconnecting...")
        tail = "100"
        time.sleep(interval)


def fetch(ctx: Context) -> int:
    cfg = load_config(ctx, "finetuning")
    ctx.az.login()
    adapter = ADAPTER
    dest = ctx.root / adapter
    dest.parent.mkdir(parents=True, exist_ok=True)
    env = storage_env(ctx, cfg)
    for leftover in dest.parent.glob(".fetch-*"):  # from a fetch that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    # Download beside the destination, then swap: a half-copied adapter never replaces a good one,
    # and a kill at the swap keeps the previous one (tuner.files).
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        share = ["--source", cfg["FILE_SHARE_NAME"], "--account-name", cfg["STORAGE_ACCOUNT_NAME"]]
        wanted = ["--pattern", f"{adapter}/*", "--destination", tmp]
        ctx.az("storage file download-batch --no-progress", *share, *wanted, env=env)
        got = Path(tmp) / adapter
        if not (got / "adapter_config.json").is_file():
            raise AzureError(
                f"no adapter on the share at {adapter}: has a run succeeded? (python infra/remote.py status)"
            )
        replace_folder(got, dest)
    print(f"Adapter copied to {adapter}")
    return 0


# ---------------------------------------------------------------- inference


def api_key(ctx: Context, cfg: dict[str, str]) -> str:
    return ctx.az("containerapp secret show", *app_ref(cfg), "--secret-name", API_KEY_SECRET).get("value") or ""


def provision_inference(ctx: Context) -> int:
    ctx.az.login()
    ctx.az.check_gpu_profile(ctx.azure["location"], parameters(ctx, "inference")["gpuProfile"]["value"])
    key_env = api_key_env(ctx.settings)
    # Keep the key a redeployment finds, so clients keep working; else the user's, else a new one.
    try:
        existing = api_key(ctx, load_config(ctx, "inference"))
    except AzureError:
        existing = ""
    key = os.environ.get(key_env) or existing or secrets.token_urlsafe(32)
    out = deploy(ctx, "inference", ["-p", f"apiKeyEnvName={key_env}", "-p", "apiKey=@-"], key)
    info(f"App {out['ACA_APP_NAME']} provisioned; next: `python infra/remote.py deploy-inference`")
    print(out["ACA_APP_ENDPOINT"])
    return 0


def deploy_inference(ctx: Context, with_adapter: bool) -> int:
    cfg = load_config(ctx, "inference")
    ctx.az.login()
    adapter = ctx.root / ADAPTER
    if with_adapter and not (adapter / "adapter_config.json").is_file():
        raise AzureError(f"--with-adapter: no adapter in {adapter.relative_to(ctx.root)}")
    upload(ctx, cfg, [adapter] if with_adapter else [])
    revision = ctx.az("containerapp show", *app_ref(cfg))["properties"]["latestRevisionName"]
    ctx.az("containerapp revision restart", *app_ref(cfg), "--revision", revision)
    info(f"Restarted {revision}; it reinstalls packages and loads the model before answering")
    print(cfg["ACA_APP_ENDPOINT"])
    return 0


def endpoint(ctx: Context, show_key: bool) -> int:
    cfg = load_config(ctx, "inference")
    print(cfg["ACA_APP_ENDPOINT"])
    if show_key:
        ctx.az.login()
        print(api_key(ctx, cfg))
    else:
        info(
            "API key: `python infra/remote.py endpoint --show-key` (the server reads it from "
            f"{api_key_env(ctx.settings)})"
        )
    return 0
