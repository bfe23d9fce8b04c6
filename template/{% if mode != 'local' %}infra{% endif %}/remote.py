"""Fine-tune and serve this workspace on Azure Container Apps serverless GPUs.

    python infra/remote.py provision-finetuning  # storage, logs, GPU environment, the job
    python infra/remote.py set-secret            # HF_TOKEN for gated models (environment or prompt)
    python infra/remote.py run-finetuning        # upload the workspace, start a run, print its name
    python infra/remote.py logs                  # follow the latest run until it ends
    python infra/remote.py fetch                 # copy the adapter into models/<method>/adapter
    python infra/remote.py provision-inference   # a Container App behind HTTPS and an API key
    python infra/remote.py deploy-inference      # sync the code, restart the app
    python infra/remote.py endpoint              # print the endpoint (--show-key: and the key)

Needs the Azure CLI, logged in (`az login`). Reads settings.toml, infra/azure.toml and
infra/provision/*.parameters.json; saves what a deployment created to infra/*.config.json.
Secrets (HF_TOKEN, the API key) reach az on its standard input, never a command line or a file.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

from tuner.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"

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


class Failure(Exception):
    """A problem the user can fix: main() prints it as one line and exits 1."""


# Filled by main(): settings.toml (model, paths) and infra/azure.toml (subscription, group, region).
SETTINGS: dict[str, Any] = {}
AZURE: dict[str, str] = {}


def az_path() -> str:
    # The full path also finds az.cmd on Windows, which subprocess would not look for.
    path = shutil.which("az")
    if path is None:
        raise Failure("the Azure CLI (az) is not installed or not on PATH: see https://aka.ms/installazurecli")
    return path


def az_command(command: str, args: tuple[str, ...]) -> list[str]:
    sub = AZURE.get("subscription") or ""
    return [az_path(), *command.split(), *args, *(["--subscription", sub] if sub else [])]


def first_error(stderr: str, returncode: int) -> str:
    """The line of az's stderr that says what went wrong, without its prefix."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    line = (errors or lines or [f"exit status {returncode}"])[0].removeprefix("ERROR:").strip()
    try:  # ARM errors arrive as JSON: {"error": {"code": ..., "message": ...}} or {"code": ..., ...}
        body = json.loads(line)
        body = body.get("error", body)
        line = f"{body.get('code', 'error')}: {body.get('message', line)}"
    except (json.JSONDecodeError, AttributeError):
        pass
    return " ".join(line.split())[:500]


def az(command: str, *args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Any:
    """Run `az COMMAND ARGS -o json` (COMMAND: words without user values); return the parsed
    output. Any failure becomes one Failure line that names the command, not its values."""
    words = " ".join(w for w in command.split() if not w.startswith("-"))
    proc = subprocess.run(
        [*az_command(command, args), "-o", "json"],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise Failure(f"`az {words}` failed: {first_error(proc.stderr, proc.returncode)}")
    try:
        return json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        return proc.stdout.strip()  # a few commands answer in plain words even with -o json


def info(message: str) -> None:
    # Progress goes to stderr, so stdout carries only results (an execution name, an endpoint).
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- preflight


def preflight_login() -> dict[str, Any]:
    az_path()
    try:
        return az("account show")
    except Failure:
        raise Failure("not logged in to Azure: run `az login`, then `az account set --subscription ...`") from None


def preflight_region(profile: str) -> None:
    location = AZURE["location"]
    supported = az("containerapp env workload-profile list-supported -l", location) or []
    names = {p.get("name") for p in supported}
    names |= {p.get("properties", {}).get("displayName") for p in supported}
    if profile not in names:
        gpus = sorted(n for n in names if n and "GPU" in n)
        offer = f" (it offers {', '.join(gpus)})" if gpus else ""
        raise Failure(
            f"region {location} has no serverless GPU profile {profile}{offer}: "
            "change location in infra/azure.toml or gpuProfile in infra/provision/*.parameters.json"
        )


def is_gated() -> bool:
    return bool(SETTINGS["model"].get("gated"))


# ---------------------------------------------------------------- config files


def parameters(kind: str) -> dict[str, Any]:
    path = INFRA / "provision" / f"{kind}.parameters.json"
    return json.loads(path.read_text("utf-8"))["parameters"]


def load_config(kind: str) -> dict[str, str]:
    path = INFRA / f"{kind}.config.json"
    if not path.is_file():
        raise Failure(f"infra/{kind}.config.json not found: run `python infra/remote.py provision-{kind}` first")
    return json.loads(path.read_text("utf-8"))


def job_ref(cfg: dict[str, str]) -> list[str]:
    return ["-n", cfg["ACA_JOB_NAME"], "-g", cfg["RESOURCE_GROUP_NAME"]]


def app_ref(cfg: dict[str, str]) -> list[str]:
    return ["-n", cfg["ACA_APP_NAME"], "-g", cfg["RESOURCE_GROUP_NAME"]]


def api_key(cfg: dict[str, str]) -> str:
    return az("containerapp secret show", *app_ref(cfg), "--secret-name", API_KEY_SECRET).get("value") or ""


def deploy(kind: str, extra: list[str], stdin: str | None) -> dict[str, str]:
    """Create the resource group, deploy provision/<kind>.bicep, save its outputs."""
    group = AZURE["resource_group"]
    az("group create -n", group, "-l", AZURE["location"])
    info(f"Deploying infra/provision/{kind}.bicep to {group} (a few minutes)...")
    source = ["-f", str(INFRA / "provision" / f"{kind}.bicep")]
    source += ["-p", f"@{INFRA / 'provision' / f'{kind}.parameters.json'}"]
    result = az("deployment group create -g", group, "-n", kind, *source, *extra, stdin=stdin)
    outputs = {k: v["value"] for k, v in result["properties"]["outputs"].items()}
    (INFRA / f"{kind}.config.json").write_text(json.dumps(outputs, indent=2) + "\n", "utf-8")
    info(f"Saved infra/{kind}.config.json")
    return outputs


# ---------------------------------------------------------------- the share


def storage_env(cfg: dict[str, str]) -> dict[str, str]:
    # The account key travels in az's environment (AZURE_STORAGE_KEY), not on its command line.
    keys = az("storage account keys list -g", cfg["RESOURCE_GROUP_NAME"], "-n", cfg["STORAGE_ACCOUNT_NAME"])
    return {**os.environ, "AZURE_STORAGE_KEY": keys[0]["value"]}


def is_secret(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name.lower(), pattern) for pattern in SECRET_FILES)


def workspace_files(extra: list[Path]) -> tuple[list[Path], list[str]]:
    """The files to upload, and the secret ones left out (relative paths, folders ending in /)."""
    files: list[Path] = []
    secret: list[str] = []
    for start in [ROOT, *extra]:
        for top, dirs, names in os.walk(start):
            here = Path(top)
            secret += [f"{(here / d).relative_to(ROOT).as_posix()}/" for d in dirs if d.lower() in SECRET_DIRS]
            dirs[:] = [
                d
                for d in dirs
                if d not in SKIP_DIRS
                and d.lower() not in SECRET_DIRS
                and not (here == ROOT and d in SKIP_TOP)
                and not (here / d / "pyvenv.cfg").exists()
                and not (here / d / "conda-meta").exists()
            ]
            secret += [(here / n).relative_to(ROOT).as_posix() for n in names if is_secret(n)]
            files += [here / n for n in names if not (is_secret(n) or n.endswith(".pyc"))]
    return files, sorted(secret)


def upload(cfg: dict[str, str], extra: list[Path] | None = None) -> None:
    """Copy the workspace to the share: stage the files to send, then one upload-batch."""
    env = storage_env(cfg)
    files, secret = workspace_files(extra or [])
    if secret:
        info(f"Left out, as they may hold secrets: {', '.join(secret)}")
    with tempfile.TemporaryDirectory(prefix="remote-upload-") as stage:
        for path in files:
            target = Path(stage) / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)  # no copy when the temp folder is on the same disk
            except OSError:
                shutil.copy2(path, target)
        info(f"Uploading {len(files)} files to share {cfg['FILE_SHARE_NAME']}...")
        share = ["--destination", cfg["FILE_SHARE_NAME"], "--account-name", cfg["STORAGE_ACCOUNT_NAME"]]
        az("storage file upload-batch --no-progress --max-connections 4", *share, "--source", stage, env=env)


# ---------------------------------------------------------------- commands


def cmd_provision_finetuning(args: argparse.Namespace) -> int:
    preflight_login()
    preflight_region(parameters("finetuning")["gpuProfile"]["value"])
    token = os.environ.get("HF_TOKEN") or None
    out = deploy("finetuning", ["-p", "hfToken=@-"] if token else [], token)
    info(f"Job {out['ACA_JOB_NAME']} is ready" + (" with HF_TOKEN as a secret" if token else ""))
    if is_gated() and not token:
        info(f"{SETTINGS['model']['id']} is gated: run `python infra/remote.py set-secret` before a run")
    return 0


def read_token() -> str:
    token = os.environ.get("HF_TOKEN", "")
    if not token and sys.stdin.isatty():
        token = getpass.getpass("Hugging Face token (input hidden): ")
    if not token.strip():
        raise Failure("no Hugging Face token: set HF_TOKEN in the environment, or run in a terminal to be asked")
    return token.strip()


def cmd_set_secret(args: argparse.Namespace) -> int:
    cfg = load_config("finetuning")
    preflight_login()
    token = read_token()
    # `name=@-`: az reads the value from its standard input, so no process list ever shows it.
    az("containerapp job secret set", *job_ref(cfg), "--secrets", f"{HF_SECRET}=@-", stdin=token)
    wire = ["--container-name", JOB_CONTAINER, "--set-env-vars", f"HF_TOKEN=secretref:{HF_SECRET}"]
    az("containerapp job update", *job_ref(cfg), *wire)
    info(f"Secret {HF_SECRET} set on job {cfg['ACA_JOB_NAME']}; runs see it as HF_TOKEN")
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    cfg = load_config("finetuning")
    preflight_login()
    upload(cfg)
    return 0


def cmd_run_finetuning(args: argparse.Namespace) -> int:
    cfg = load_config("finetuning")
    preflight_login()
    if is_gated():
        names = {s.get("name") for s in az("containerapp job secret list", *job_ref(cfg)) or []}
        if HF_SECRET not in names:
            raise Failure(
                f"{SETTINGS['model']['id']} is gated and job {cfg['ACA_JOB_NAME']} has no HF_TOKEN secret: "
                "run `python infra/remote.py set-secret` first"
            )
    if not args.no_upload:
        upload(cfg)
    execution = az("containerapp job start", *job_ref(cfg))
    info("Started; follow it with `python infra/remote.py logs`")
    print(execution["name"])
    return 0


def executions(cfg: dict[str, str]) -> list[dict[str, Any]]:
    runs = az("containerapp job execution list", *job_ref(cfg))
    return sorted(runs or [], key=lambda r: r.get("properties", {}).get("startTime") or "", reverse=True)


def execution_status(cfg: dict[str, str], name: str) -> str:
    run = az("containerapp job execution show", *job_ref(cfg), "--job-execution-name", name)
    return run.get("properties", {}).get("status") or "Unknown"


def latest_execution(cfg: dict[str, str]) -> str:
    runs = executions(cfg)
    if not runs:
        raise Failure("the job has no runs yet: start one with `python infra/remote.py run-finetuning`")
    return runs[0]["name"]


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config("finetuning")
    preflight_login()
    runs = executions(cfg)
    if args.execution:
        runs = [r for r in runs if r["name"] == args.execution]
    if not runs:
        print("no runs" + (f" named {args.execution}" if args.execution else " yet"))
        return 0
    for run in runs[:5]:
        props = run.get("properties", {})
        times = [props.get("startTime") or "", props.get("endTime") or ""]
        print("\t".join([run["name"], props.get("status", "?"), *times]))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    cfg = load_config("finetuning")
    preflight_login()
    name = args.execution or latest_execution(cfg)
    recent: deque[str] = deque(maxlen=300)  # to skip lines a reconnection prints again
    tail = "300"
    # `job logs` lives in az's containerapp extension: let az install it without asking.
    env = {**os.environ, "AZURE_EXTENSION_USE_DYNAMIC_INSTALL": "yes_without_prompt"}
    while True:
        stream = ("--container", JOB_CONTAINER, "--execution", name, "--tail", tail, *job_ref(cfg))
        command = az_command("containerapp job logs show --follow true --format text", stream)
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
        status = execution_status(cfg, name)
        if status in ENDED:
            info(f"{name}: {status}")
            return 0 if status == "Succeeded" else 1
        # The stream drops when a replica is still starting or on network hiccups: reconnect.
        info(f"{name} is {status}; log stream ended{f' ({problem})' if problem else ''}, reconnecting...")
        tail = "100"
        time.sleep(args.interval)


def cmd_fetch(args: argparse.Namespace) -> int:
    cfg = load_config("finetuning")
    preflight_login()
    adapter = SETTINGS["inference"]["adapter_path"]
    dest = ROOT / adapter
    dest.parent.mkdir(parents=True, exist_ok=True)
    env = storage_env(cfg)
    # Download beside the destination, then swap: a half-copied adapter never replaces a good one.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        share = ["--source", cfg["FILE_SHARE_NAME"], "--account-name", cfg["STORAGE_ACCOUNT_NAME"]]
        wanted = ["--pattern", f"{adapter}/*", "--destination", tmp]
        az("storage file download-batch --no-progress", *share, *wanted, env=env)
        got = Path(tmp) / adapter
        if not (got / "adapter_config.json").is_file():
            raise Failure(f"no adapter on the share at {adapter}: has a run succeeded? (python infra/remote.py status)")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(got, dest)
    print(f"Adapter copied to {adapter}")
    return 0


def existing_api_key() -> str | None:
    try:
        return api_key(load_config("inference")) or None
    except Failure:
        return None


def cmd_provision_inference(args: argparse.Namespace) -> int:
    preflight_login()
    preflight_region(parameters("inference")["gpuProfile"]["value"])
    key_env = SETTINGS["inference"].get("api_key_env") or "FINETUNE_API_KEY"
    # Keep the key a redeployment finds, so clients keep working; else the user's, else a new one.
    key = os.environ.get(key_env) or existing_api_key() or secrets.token_urlsafe(32)
    out = deploy("inference", ["-p", f"apiKeyEnvName={key_env}", "-p", "apiKey=@-"], key)
    info(f"App {out['ACA_APP_NAME']} provisioned; next: `python infra/remote.py deploy-inference`")
    print(out["ACA_APP_ENDPOINT"])
    return 0


def cmd_deploy_inference(args: argparse.Namespace) -> int:
    cfg = load_config("inference")
    preflight_login()
    adapter = ROOT / SETTINGS["inference"]["adapter_path"]
    if args.with_adapter and not (adapter / "adapter_config.json").is_file():
        raise Failure(f"--with-adapter: no adapter in {adapter.relative_to(ROOT)}")
    upload(cfg, [adapter] if args.with_adapter else [])
    revision = az("containerapp show", *app_ref(cfg))["properties"]["latestRevisionName"]
    az("containerapp revision restart", *app_ref(cfg), "--revision", revision)
    info(f"Restarted {revision}; it reinstalls packages and loads the model before answering")
    print(cfg["ACA_APP_ENDPOINT"])
    return 0


def cmd_endpoint(args: argparse.Namespace) -> int:
    cfg = load_config("inference")
    print(cfg["ACA_APP_ENDPOINT"])
    if args.show_key:
        preflight_login()
        print(api_key(cfg))
    else:
        info(
            f"API key: `python infra/remote.py endpoint --show-key` (the server reads it from "
            f"{SETTINGS['inference'].get('api_key_env') or 'FINETUNE_API_KEY'})"
        )
    return 0


COMMANDS = {
    "provision-finetuning": (
        cmd_provision_finetuning,
        "create the storage, GPU environment and fine-tuning job",
    ),
    "set-secret": (cmd_set_secret, "store HF_TOKEN (environment or hidden prompt) as the job's secret"),
    "upload": (cmd_upload, "copy the workspace to the file share (no models, caches, venvs, .git, secrets)"),
    "run-finetuning": (cmd_run_finetuning, "upload the workspace and start a run; prints the run's name"),
    "status": (cmd_status, "show the latest runs and their state"),
    "logs": (cmd_logs, "follow a run's log until it ends, reconnecting when the stream drops"),
    "fetch": (cmd_fetch, "copy the adapter from the share into the local adapter path"),
    "provision-inference": (cmd_provision_inference, "create the inference app (HTTPS, API key)"),
    "deploy-inference": (cmd_deploy_inference, "sync the code to the share and restart the app"),
    "endpoint": (cmd_endpoint, "print the inference endpoint"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python infra/remote.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}
    parsers["run-finetuning"].add_argument("--no-upload", action="store_true", help="start without uploading")
    for name in ("status", "logs"):
        parsers[name].add_argument("--execution", help="a run's name (default: the latest)")
    parsers["logs"].add_argument("--interval", type=float, default=10.0, help="seconds between reconnections")
    parsers["deploy-inference"].add_argument(
        "--with-adapter", action="store_true", help="also upload the local adapter (trained on this machine)"
    )
    parsers["endpoint"].add_argument("--show-key", action="store_true", help="also print the API key")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        SETTINGS.update(load_settings(ROOT / "settings.toml"))
        AZURE.update(load_settings(INFRA / "azure.toml").get("azure", {}))
        if not (AZURE.get("resource_group") and AZURE.get("location")):
            raise Failure("infra/azure.toml needs [azure] resource_group and location")
        return COMMANDS[args.command][0](args)
    except (Failure, SettingsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (a job run goes on: `python infra/remote.py status`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
