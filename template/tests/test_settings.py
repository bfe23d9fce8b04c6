"""settings.toml parses, passes the checks a run makes, and builds a sensible Olive config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tuner.settings import SettingsError, in_workspace, load_settings, with_overrides
from tuner.training.olive import olive_config

ROOT = Path(__file__).resolve().parents[1]


def test_settings_are_valid() -> None:
    """load_settings checks every table: each setting's type, range or choices (tuner/settings.py)."""
    try:
        load_settings(ROOT / "settings.toml")
    except SettingsError as err:
        pytest.fail(str(err))


def test_text_template_uses_the_input_columns(settings: dict[str, Any]) -> None:
    if settings["dataset"]["format"] == "columns":
        template = settings["prompt"]["text_template"]
        for column in settings["dataset"]["input_columns"]:
            placeholder = "{" + column + "}"
            assert placeholder in template, (
                f"[prompt] text_template {template!r} does not use the input column {placeholder}"
            )


def test_dataset_present(settings: dict[str, Any]) -> None:
    ds = settings["dataset"]
    if ds["source"] == "huggingface":
        assert ds["hf_id"], "[dataset] source is huggingface but hf_id is empty"
        return
    path = in_workspace(ROOT, ds["path"])
    assert path.is_file(), f"the dataset file {ds['path']} named in settings.toml does not exist ({path})"


def test_olive_config_follows_the_settings(settings: dict[str, Any]) -> None:
    config = olive_config(with_overrides(settings, ["train.lora_r=8"]), ROOT, "check")
    finetune = config["passes"]["finetune"]
    assert finetune["type"].lower() == settings["train"]["method"]
    assert finetune["r"] == 8
    assert finetune["training_args"]["learning_rate"] == settings["train"]["learning_rate"]
    for data_config in config["data_configs"]:
        assert Path(data_config["user_script"]).is_file()


def test_a_bad_override_is_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(SettingsError, match="lora_r"):
        with_overrides(settings, ["train.lora_r=0"])
    with pytest.raises(SettingsError, match="train.learning_rat is not a setting"):
        with_overrides(settings, ["train.learning_rat=1e-4"])
