"""Fine-tuning on several GPUs of several machines: an Azure ML command job that runs
finetuning/train_sft.py on N nodes of G GPUs (`python infra/remote.py finetune --target azureml`).

Container Apps (tuner/cloud/containerapps.py) runs one replica on one GPU profile; Azure ML schedules N
nodes of a compute cluster together and wires them up for torch.distributed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tuner.cloud.az import AzureError
from tuner.cloud.containerapps import SECRET_DIRS, SECRET_FILES, SKIP_DIRS, SKIP_TOP, Context, info, parameters, stage
from tuner.settings import ADAPTER

REQUIREMENTS = ("requirements-torch-cuda.txt", "requirements-cuda.txt")


def ml_names(ctx: Context) -> tuple[str, str]:
    """[azure] ml_workspace and ml_compute, or one line saying which are missing."""
    workspace, compute = ctx.azure["ml_workspace"], ctx.azure["ml_compute"].removeprefix("azureml:")
    missing = [name for name, value in (("ml_workspace", workspace), ("ml_compute", compute)) if not value]
    if missing:
        raise AzureError(
            f"--target azureml needs [azure] {' and '.join(missing)} in {ctx.settings_path.name}: "
            "the Azure ML workspace and its GPU compute cluster"
        )
    return workspace, compute


def dockerfile(image: str) -> str:
    # The Container Apps job's base image and the same pinned requirements, so both targets train
    # with the same versions (a curated Azure ML image brings its own torch and transformers).
    # Azure ML builds this once and reuses it while these files are unchanged, so no process
    # installs anything at run time. For InfiniBand between nodes, add rdma-core (libibverbs):
    # without it NCCL talks over TCP.
    torch, rest = REQUIREMENTS
    return (
        f"FROM {image}\n"
        f"COPY {torch} {rest} /tmp/\n"
        "RUN python -m pip install --no-cache-dir --root-user-action=ignore --disable-pip-version-check "
        f"-r /tmp/{torch} \\\n"
        " && python -m pip install --no-cache-dir --root-user-action=ignore --disable-pip-version-check "
        f"-r /tmp/{rest}\n"
    )


def amlignore() -> str:
    # Azure ML uploads the whole code folder (and reads .gitignore when there is no .amlignore).
    # The folder is staged with tuner.cloud.containerapps.stage, which already leaves these out; this file says
    # so to Azure ML as well, in case anything is added to the folder by hand.
    patterns = [*SECRET_FILES, *(f"{d}/" for d in sorted(SECRET_DIRS | SKIP_DIRS)), *(f"/{d}/" for d in SKIP_TOP)]
    return (
        "# Never uploaded (tuner/cloud/containerapps.py: SECRET_FILES, SECRET_DIRS, SKIP_DIRS, SKIP_TOP).\n"
        + "\n".join([*patterns, "*.pyc", ""])
    )


def job_yaml(ctx: Context, compute: str, nodes: int, gpus: int) -> str:
    """The command job, as `az ml job create --file` takes it; paths are relative to this file."""
    q = json.dumps  # a JSON string is a valid YAML double-quoted scalar: any value lands literally
    return f"""\
$schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema.json
type: command
experiment_name: {q(ctx.root.name)}
display_name: {q(f"{ctx.settings['model']['id']} on {nodes}x{gpus} GPUs")}
code: code
# infra/azureml.sh downloads the base model, runs finetuning/train_sft.py and keeps the adapter.
command: bash infra/azureml.sh
environment:
  build:
    path: environment
environment_variables:
  ADAPTER_PATH: {q(ADAPTER)}
compute: {q(f"azureml:{compute}")}
resources:
  instance_count: {nodes}
# Per-process launch: Azure ML starts G processes on each node and sets RANK, LOCAL_RANK,
# WORLD_SIZE, MASTER_ADDR and MASTER_PORT for torch.distributed.
distribution:
  type: pytorch
  process_count_per_instance: {gpus}
"""


def submit(ctx: Context, nodes: int, gpus: int) -> int:
    """Stage the code, the image's build context and the job; create the job; print its name."""
    workspace, compute = ml_names(ctx)
    if ctx.settings["model"]["gated"]:
        # A job's environment variables are stored in plain text with its definition.
        raise AzureError(
            f"{ctx.settings['model']['id']} is gated, and --target azureml has no secret store for HF_TOKEN yet: "
            "use the Container Apps job (`python infra/remote.py run-finetuning`)"
        )
    ctx.az.login()
    with tempfile.TemporaryDirectory(prefix="remote-azureml-") as tmp:
        folder = Path(tmp)
        count = stage(ctx, folder / "code")
        (folder / "code" / ".amlignore").write_text(amlignore(), "utf-8")
        (folder / "environment").mkdir()
        for name in REQUIREMENTS:
            (folder / "environment" / name).write_bytes((ctx.root / "setup" / name).read_bytes())
        image = parameters(ctx, "finetuning")["image"]["value"]
        (folder / "environment" / "Dockerfile").write_text(dockerfile(image), "utf-8")
        (folder / "job.yml").write_text(job_yaml(ctx, compute, nodes, gpus), "utf-8")
        info(f"Submitting {count} files to Azure ML workspace {workspace}, {nodes} node(s) x {gpus} GPU(s)...")
        # `az ml` is an extension of az: let az install it without asking.
        env = {**os.environ, "AZURE_EXTENSION_USE_DYNAMIC_INSTALL": "yes_without_prompt"}
        where = ["-g", ctx.azure["resource_group"], "-w", workspace]
        job = ctx.az("ml job create --file", str(folder / "job.yml"), *where, env=env)
    studio = ((job.get("services") or {}).get("Studio") or {}).get("endpoint")
    follow = f"`az ml job stream -n {job['name']} -g {ctx.azure['resource_group']} -w {workspace}`"
    info(f"Submitted; follow it with {follow}" + (f" or in the studio: {studio}" if studio else ""))
    print(job["name"])
    return 0
