"""Issue 3: finetuning/olive-config.json is olive-ai 0.13's schema, with no key Olive would ignore.

Olive 0.13 logs "... Ignoring them." for unknown keys and trains with its own defaults (the
peer's 0.7-era `lora_r`, `dataset_type`, `source_max_len`... are silently dropped). This check
validates the config exactly as invoke_olive.py fills it in, and fails on any such warning or
on a data-component parameter the registered function does not take.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_py

CHECK = r"""
import inspect, json, logging, sys
sys.path.insert(0, "finetuning")
import invoke_olive
from olive.data.registry import Registry
from olive.hardware.accelerator import AcceleratorSpec
from olive.package_config import OlivePackageConfig
from olive.passes.pytorch.lora import HFTrainingArguments, QLoRATrainingArguments
from olive.workflows.run.config import RunConfig

problems = []
class Catch(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if "Ignoring" in message or "not part of" in message:
            problems.append(message)
logging.getLogger("olive").addHandler(Catch(level=logging.WARNING))

config = json.load(open(sys.argv[1]))
unknown = set(config) - set(RunConfig.model_fields) - set(RunConfig.model_fields["engine"].annotation.model_fields)
problems += [f"unknown top-level key {k!r}" for k in sorted(unknown)]
if problems:  # Olive itself refuses these; report them the same way
    print(json.dumps(problems))
    sys.exit(0)
from pathlib import Path
from tuner.settings import load_settings
invoke_olive.fill_paths(config, "check", load_settings(Path("settings.toml")), Path("settings.toml"))
run_config = RunConfig.model_validate(config)
for data_config in run_config.data_configs:
    for kind, component in data_config.components.items():
        func = Registry.get_component(kind, component.type)
        params = inspect.signature(func).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue  # takes anything, as Olive's own defaults do
        accepted = set(params)
        problems += [f"{data_config.name}.{kind}: unknown {p!r}" for p in component.params if p not in accepted]
packages = OlivePackageConfig.load_default_config()
for name, pass_configs in run_config.passes.items():
    for pass_config in pass_configs:
        pass_cls = packages.import_pass_module(pass_config.type)
        known = set(pass_cls.default_config(AcceleratorSpec("cpu")))
        problems += [f"pass {name}: unknown key {k!r}" for k in pass_config.config if k not in known]
        pass_cls.generate_config(AcceleratorSpec("cpu"), dict(pass_config.config), disable_search=True)
        args_cls = QLoRATrainingArguments if pass_config.type == "QLoRA" else HFTrainingArguments
        args = args_cls(**pass_config.config["training_args"])
        args.create_training_args()  # what transformers.Trainer will get
print(json.dumps(problems))
"""


def olive_problems(ws: Path, config: Path) -> list[str]:
    run = run_py(ws, "-c", CHECK, str(config))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


CASES = [
    ("tiny-random", "cpu"),
    ("tiny-random", "cuda"),
    ("microsoft/Phi-3-mini-4k-instruct", "cuda"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "cpu"),
    ("meta-llama/Llama-3.1-8B-Instruct", "windows-gpu"),
]


@pytest.mark.parametrize(("model", "platform"), CASES)
def test_rendered_config_has_no_ignored_key(render_factory, model: str, platform: str) -> None:
    ws = render_factory(model=model, platform=platform, mode="local")
    assert olive_problems(ws, ws / "finetuning" / "olive-config.json") == []


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("pass", "lora_r", 64),  # the peer's 0.7-era names
        ("pass", "lora_alpha", 16),
        ("training_args", "not_a_trainer_arg", 1),
        ("top", "dataset_type", "corpus"),
        ("pre_process", "source_max_len", 1024),
    ],
)
def test_checker_catches_ignored_keys(render_factory, tmp_path: Path, where: str, key: str, value) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform="cpu", mode="local"), ws)
    path = ws / "finetuning" / "olive-config.json"
    config = json.loads(path.read_text())
    target = {
        "pass": config["passes"]["finetune"],
        "training_args": config["passes"]["finetune"]["training_args"],
        "top": config,
        "pre_process": config["data_configs"][0]["pre_process_data_config"]["params"],
    }[where]
    target[key] = value
    path.write_text(json.dumps(config))
    problems = olive_problems(ws, path)
    assert any(key in p for p in problems), problems
