"""settings.toml and finetuning/olive-config.json parse, agree, and name files that exist."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def workspace_path(value: str) -> Path:
    """A path from settings.toml: relative to the workspace root unless absolute."""
    path = Path(value)
    return path if path.is_absolute() else ROOT / path


REQUIRED = {
    "model": {"id": str, "path": str, "platform": str},
    "dataset": {"source": str, "path": str, "format": str, "input_columns": list, "target_column": str},
    "prompt": {"system": str, "text_template": str},
    "finetuning": {"method": str, "olive_config": str, "output_dir": str},
    "inference": {"adapter_path": str, "port": int},
}


def test_settings_parse() -> None:
    try:
        tomllib.loads((ROOT / "settings.toml").read_text("utf-8"))
    except tomllib.TOMLDecodeError as err:
        pytest.fail(f"settings.toml is not valid TOML: {err}")


@pytest.mark.parametrize("section", sorted(REQUIRED))
def test_settings_keys(settings: dict[str, Any], section: str) -> None:
    assert section in settings, f"settings.toml has no [{section}] section"
    for key, kind in REQUIRED[section].items():
        assert key in settings[section], f"settings.toml [{section}] has no {key}"
        value = settings[section][key]
        assert isinstance(value, kind), f"settings.toml [{section}] {key} = {value!r} is not a {kind.__name__}"


def test_settings_values(settings: dict[str, Any]) -> None:
    assert settings["model"]["platform"] in {"cuda", "windows-gpu", "cpu"}
    assert settings["finetuning"]["method"] in {"lora", "qlora"}
    assert settings["dataset"]["source"] in {"sample", "local", "huggingface"}
    assert settings["dataset"]["format"] in {"columns", "chat"}
    assert 1 <= settings["inference"]["port"] <= 65535
    if settings["dataset"]["format"] == "columns":
        template = settings["prompt"]["text_template"]
        for column in settings["dataset"]["input_columns"]:
            placeholder = "{" + column + "}"
            assert placeholder in template, (
                f"[prompt] text_template {template!r} does not use the input column {placeholder}"
            )
    if settings["finetuning"]["method"] == "qlora":
        assert settings["model"]["platform"] != "cpu", 'QLoRA needs a CUDA GPU; use method = "lora" on CPU'


def test_outputs_stay_together(settings: dict[str, Any]) -> None:
    """The chat front-ends read the adapter where fine-tuning writes it."""
    output_dir = Path(settings["finetuning"]["output_dir"])
    adapter = Path(settings["inference"]["adapter_path"])
    assert adapter.parent == output_dir, (
        f"[inference] adapter_path {adapter} is not inside [finetuning] output_dir {output_dir}: "
        "the chat would not find the adapter that fine-tuning writes"
    )


def test_dataset_present(settings: dict[str, Any]) -> None:
    ds = settings["dataset"]
    if ds["source"] == "huggingface":
        assert ds["hf_id"], "[dataset] source is huggingface but hf_id is empty"
        return
    path = workspace_path(ds["path"])
    assert path.is_file(), f"the dataset file {ds['path']} named in settings.toml does not exist ({path})"


def load_olive_config(settings: dict[str, Any]) -> dict[str, Any]:
    path = workspace_path(settings["finetuning"]["olive_config"])
    assert path.is_file(), f"[finetuning] olive_config {path} does not exist"
    try:
        config = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as err:
        pytest.fail(f"{path.relative_to(ROOT)} line {err.lineno}: invalid JSON ({err.msg})")
    assert isinstance(config, dict), f"{path} must hold a JSON object"
    return config


def test_olive_config(settings: dict[str, Any]) -> None:
    config = load_olive_config(settings)
    for key in ("input_model", "passes"):
        assert key in config, f"the Olive config has no {key!r}"
    method = settings["finetuning"]["method"]
    lora_passes = [p for p in config["passes"].values() if p.get("type") in {"LoRA", "QLoRA"}]
    assert lora_passes, "the Olive config has no LoRA or QLoRA pass"
    for p in lora_passes:
        assert p["type"].lower() == method, (
            f"the Olive config's {p['type']} pass disagrees with [finetuning] method = {method!r}"
        )
    for data_config in config.get("data_configs", []):
        script = data_config.get("user_script")
        if script:
            assert (ROOT / script).is_file(), f"data config {data_config.get('name')!r}: {script} is missing"
