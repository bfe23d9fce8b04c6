"""tuner/training/olive.py builds olive-ai 0.13's schema from [train], with no key Olive would ignore.

Olive 0.13 logs "... Ignoring them." for unknown keys and trains with its own defaults (the
anchor's 0.7-era `lora_r`, `dataset_type`, `source_max_len`... are silently dropped). This
validates the config as invoke_olive.py builds it, and fails on any such warning or on a
data-component parameter the registered function does not take.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import logging
from pathlib import Path
from typing import Any

import pytest
import transformers
from tuner.settings import load_settings, with_overrides
from tuner.training.olive import olive_config
from tuner.training.precision import Device, decide

TRAINING_ARGS = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}


def register_components(ws: Path) -> None:
    """Import the workspace's Olive user script, which registers its data components."""
    path = ws / "finetuning" / "user_script.py"
    spec = importlib.util.spec_from_file_location(f"user_script_{abs(hash(ws))}", path)
    assert spec and spec.loader
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def olive_problems(ws: Path, config: dict[str, Any], simulated_gpu: bool = False) -> list[str]:
    from olive.data.registry import Registry
    from olive.hardware.accelerator import AcceleratorSpec
    from olive.package_config import OlivePackageConfig
    from olive.passes.pytorch.lora import HFTrainingArguments, QLoRATrainingArguments
    from olive.workflows.run.config import RunConfig

    problems: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "Ignoring" in message or "not part of" in message:
                problems.append(message)

    catch = Catch(level=logging.WARNING)
    logging.getLogger("olive").addHandler(catch)
    try:
        engine_fields = set(RunConfig.model_fields["engine"].annotation.model_fields)
        unknown = set(config) - set(RunConfig.model_fields) - engine_fields
        problems += [f"unknown top-level key {k!r}" for k in sorted(unknown)]
        if problems:  # Olive itself refuses these
            return problems
        register_components(ws)
        run_config = RunConfig.model_validate(copy.deepcopy(config))  # Olive rewrites what it is given
        for data_config, given in zip(run_config.data_configs, config["data_configs"], strict=True):
            for key in ("load_dataset_config", "pre_process_data_config"):
                # Olive rewrites string parameters it takes for paths ("" became the working
                # directory): what we pass must reach the user script as it is.
                got = {name: getattr(data_config, key).params.get(name) for name in given[key]["params"]}
                if got != given[key]["params"]:
                    problems.append(f"{data_config.name}.{key}: Olive changed the params to {got}")
            for kind, component in data_config.components.items():
                params = inspect.signature(Registry.get_component(kind, component.type)).parameters
                if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                    continue  # takes anything, as Olive's own defaults do
                problems += [f"{data_config.name}.{kind}: unknown {p!r}" for p in component.params if p not in params]
        packages = OlivePackageConfig.load_default_config()
        for name, pass_configs in run_config.passes.items():
            for pass_config in pass_configs:
                pass_cls = packages.import_pass_module(pass_config.type)
                known = set(pass_cls.default_config(AcceleratorSpec("cpu")))
                problems += [f"pass {name}: unknown key {k!r}" for k in pass_config.config if k not in known]
                pass_cls.generate_config(AcceleratorSpec("cpu"), dict(pass_config.config), disable_search=True)
                args_cls = QLoRATrainingArguments if pass_config.type == "QLoRA" else HFTrainingArguments
                training_args = dict(config["passes"][name]["training_args"])
                if simulated_gpu:  # TrainingArguments refuses bf16 on a machine without the GPU
                    assert set(training_args) <= set(args_cls.model_fields) | TRAINING_ARGS
                    training_args.pop("bf16")
                args_cls(**training_args).create_training_args()  # what the Trainer gets
    finally:
        logging.getLogger("olive").removeHandler(catch)
    return problems


CASES = [
    ("tiny-random", "cpu"),
    ("tiny-random", "cuda"),
    ("microsoft/Phi-3-mini-4k-instruct", "cuda"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "cpu"),
    ("meta-llama/Llama-3.1-8B-Instruct", "windows-gpu"),
]


# The machines the precision policy tells apart, simulated: no GPU, a T4 (no native bfloat16), an H100.
DEVICES = {"cpu": Device(cuda=False), "sm75": Device(cuda=True, capability=(7, 5)), "sm90": Device(True, (9, 0))}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize(("model", "platform"), CASES)
def test_built_config_has_no_ignored_key(render_factory, model: str, platform: str, method: str, device: str) -> None:
    """LoRA and QLoRA, on each kind of machine: Olive's own config model takes the config whole."""
    ws = render_factory(model=model, platform=platform, mode="local")
    settings = with_overrides(load_settings(ws / "settings.toml"), [f"train.method={method}"])
    precision = decide(settings["train"], DEVICES[device])
    config = olive_config(settings, ws, "check", precision)
    assert olive_problems(ws, config, simulated_gpu=DEVICES[device].cuda) == []
    finetune = config["passes"]["finetune"]
    assert finetune["type"] == ("QLoRA" if method == "qlora" else "LoRA")
    assert finetune["torch_dtype"] == precision.compute_dtype
    assert finetune["training_args"]["bf16"] == (precision.compute_dtype == "bfloat16")
    assert "fp16" not in finetune["training_args"]  # Olive sets it from torch_dtype (and refuses it)
    if method == "qlora":
        assert (finetune["quant_type"], finetune["double_quant"]) == (
            settings["train"]["quant_type"],
            settings["train"]["double_quant"],
        )
        assert finetune["compute_dtype"] == precision.compute_dtype
    assert config["input_model"]["load_kwargs"] == {"attn_implementation": "sdpa"}
    assert finetune["training_args"]["report_to"] == "tensorboard"


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("pass", "lora_r", 64),  # the anchor's 0.7-era names
        ("pass", "lora_alpha", 16),
        ("training_args", "not_a_trainer_arg", 1),
        ("top", "dataset_type", "corpus"),
        ("pre_process", "source_max_len", 1024),
    ],
)
def test_checker_catches_ignored_keys(render_factory, where: str, key: str, value) -> None:
    ws = render_factory(model="tiny-random", platform="cpu", mode="local")
    config = olive_config(load_settings(ws / "settings.toml"), ws, "check")
    target = {
        "pass": config["passes"]["finetune"],
        "training_args": config["passes"]["finetune"]["training_args"],
        "top": config,
        "pre_process": config["data_configs"][0]["pre_process_data_config"]["params"],
    }[where]
    target[key] = value
    problems = olive_problems(ws, config)
    assert any(key in p for p in problems), problems


def test_overrides_reach_the_config(render_factory) -> None:
    ws = render_factory(model="tiny-random", platform="cpu", mode="local")
    settings = load_settings(ws / "settings.toml")
    changed = with_overrides(settings, ["train.learning_rate=3e-4", "train.method=lora", "train.lora_r=8"])
    finetune = olive_config(changed, ws, "check")["passes"]["finetune"]
    assert finetune["training_args"]["learning_rate"] == 3e-4 and finetune["r"] == 8
    assert settings["train"]["lora_r"] != 8  # the loaded settings are left as they were
