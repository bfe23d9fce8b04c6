"""The Azure CLI (az) from Python: found on PATH, run with JSON output, every failure one line.

Standard library only, and nothing runs on import: an Az is made for one subscription and
passed to whatever calls Azure (tuner/cloud/containerapps.py, tuner/cloud/azureml.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from tuner.settings import WorkspaceError


class AzureError(WorkspaceError):
    """A problem the user can fix, said in one line: infra/remote.py prints it and exits 1."""


def az_path() -> str:
    # The full path also finds az.cmd on Windows, which subprocess would not look for.
    path = shutil.which("az")
    if path is None:
        raise AzureError("the Azure CLI (az) is not installed or not on PATH: see https://aka.ms/installazurecli")
    return path


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


@dataclass(frozen=True)
class Az:
    """az for one subscription ("" = the CLI's current one, `az account set`)."""

    subscription: str = ""

    def argv(self, command: str, *args: str) -> list[str]:
        """The full command line: COMMAND is az's words (and fixed options), ARGS the values."""
        sub = ["--subscription", self.subscription] if self.subscription else []
        return [az_path(), *command.split(), *args, *sub]

    def __call__(self, command: str, *args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Any:
        """Run `az COMMAND ARGS -o json`; return the parsed output. A failure is an AzureError
        that names the command, never its values (they may be paths, names or secrets' names)."""
        words = " ".join(w for w in command.split() if not w.startswith("-"))
        proc = subprocess.run(
            [*self.argv(command, *args), "-o", "json"],
            input=stdin if stdin is not None else "",  # never the terminal: az must not prompt
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise AzureError(f"`az {words}` failed: {first_error(proc.stderr, proc.returncode)}")
        try:
            return json.loads(proc.stdout) if proc.stdout.strip() else None
        except json.JSONDecodeError:
            return proc.stdout.strip()  # a few commands answer in plain words even with -o json

    def login(self) -> dict[str, Any]:
        """The signed-in account, or one line saying how to sign in."""
        az_path()  # "not installed" says more than "not logged in"
        try:
            return self("account show")
        except AzureError:
            raise AzureError(
                "not logged in to Azure: run `az login`, then `az account set --subscription ...`"
            ) from None

    def check_gpu_profile(self, location: str, profile: str) -> None:
        """Fail early, before a deployment does, when the region lacks the serverless GPU profile."""
        supported = self("containerapp env workload-profile list-supported -l", location) or []
        names = {p.get("name") for p in supported}
        names |= {p.get("properties", {}).get("displayName") for p in supported}
        if profile not in names:
            gpus = sorted(n for n in names if n and "GPU" in n)
            offer = f" (it offers {', '.join(gpus)})" if gpus else ""
            raise AzureError(
                f"region {location} has no serverless GPU profile {profile}{offer}: "
                "change [azure] location in settings.toml or gpuProfile in infra/provision/*.parameters.json"
            )
