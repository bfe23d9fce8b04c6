"""tuner/cloud/azureml.py, imported directly (no rendered workspace): the Azure ML command job and the
image it builds. The submission itself, against a fake az, is in tests/test_remote.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tuner.cloud import azureml
from tuner.cloud.az import AzureError
from tuner.cloud.containerapps import SECRET_DIRS, SECRET_FILES, Context

SETTINGS = {
    "model": {"id": 'Org/Model "quoted": yes # not a comment'},
    "serve": {"api_key_env": "FINETUNE_API_KEY"},
    "azure": {"resource_group": "rg", "location": "swedencentral", "ml_workspace": "mlw", "ml_compute": "gpus"},
}


def context(**azure: str) -> Context:
    settings = {**SETTINGS, "azure": {**SETTINGS["azure"], **azure}}
    return Context(Path("/work/my-finetune"), Path("/work/my-finetune/settings.toml"), settings)


def test_job_yaml_is_the_multi_node_command_job() -> None:
    job = yaml.safe_load(azureml.job_yaml(context(), "gpu-cluster", 4, 2))
    assert job["distribution"] == {"type": "pytorch", "process_count_per_instance": 2}
    assert job["resources"] == {"instance_count": 4}
    assert job["compute"] == "azureml:gpu-cluster"
    assert job["code"] == "code" and job["command"] == "bash infra/azureml.sh"
    assert job["environment"] == {"build": {"path": "environment"}}
    assert job["environment_variables"] == {"ADAPTER_PATH": "models/adapter"}
    # Values from the settings land literally, whatever they hold.
    assert job["display_name"] == f"{SETTINGS['model']['id']} on 4x2 GPUs"
    assert job["experiment_name"] == "my-finetune"


@pytest.mark.parametrize(
    "azure, missing",
    [
        ({"ml_workspace": "", "ml_compute": ""}, "ml_workspace and ml_compute"),
        ({"ml_workspace": ""}, "ml_workspace in"),
        ({"ml_compute": "azureml:"}, "ml_compute in"),
    ],
)
def test_ml_names_are_required(azure: dict[str, str], missing: str) -> None:
    with pytest.raises(AzureError, match=missing):
        azureml.ml_names(context(**azure))


def test_ml_names_take_the_cluster_with_or_without_its_prefix() -> None:
    assert azureml.ml_names(context()) == ("mlw", "gpus")
    assert azureml.ml_names(context(ml_compute="azureml:gpus")) == ("mlw", "gpus")


def test_dockerfile_installs_torch_first_then_the_rest() -> None:
    text = azureml.dockerfile("docker.io/library/python:3.11.13-slim-bookworm")
    lines = text.splitlines()
    assert lines[0] == "FROM docker.io/library/python:3.11.13-slim-bookworm"
    assert lines[1] == "COPY requirements-torch-cuda.txt requirements-cuda.txt /tmp/"
    assert text.index("-r /tmp/requirements-torch-cuda.txt") < text.index("-r /tmp/requirements-cuda.txt")


def test_amlignore_lists_every_secret_pattern() -> None:
    lines = set(azureml.amlignore().splitlines())
    assert set(SECRET_FILES) <= lines
    assert {f"{d}/" for d in SECRET_DIRS} <= lines
