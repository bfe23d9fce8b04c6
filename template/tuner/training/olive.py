"""The Olive run config, built from settings.toml's [train] at run time.

Users never edit an Olive config: invoke_olive.py builds it here for each run and writes the
one that ran beside the adapter (olive-config.json), as the record of what was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuner.settings import CHECKPOINTS, OLIVE_CACHE, in_workspace
from tuner.training.precision import Device, Precision, decide
from tuner.training.runs import training_arguments


def run_settings_file(root: Path, run: str) -> Path:
    """Where a run's settings (with its --set overrides) are written for the Olive user script.
    A file, not the settings themselves in the config: Olive rewrites string parameters it takes
    for paths (an empty system prompt would become the working directory)."""
    # Beside Olive's cache of the run: the Trainer refuses a checkpoint folder it did not fill.
    return in_workspace(root, OLIVE_CACHE) / run / "run-settings.json"


def write_run_settings(settings: dict[str, Any], root: Path, run: str) -> None:
    path = run_settings_file(root, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, ensure_ascii=False), "utf-8")


def olive_config(settings: dict[str, Any], root: Path, run: str, precision: Precision | None = None) -> dict[str, Any]:
    """Olive 0.13's config for one run. `run` (a fingerprint of everything that decides the
    result) names its checkpoint and cache folders, so a changed run never resumes a stale one.
    `precision`: the policy's for this machine unless given."""
    train = settings["train"]
    precision = precision or decide(train, Device.detect())
    has_eval = train["eval_split"] > 0
    lora: dict[str, Any] = {
        "type": "QLoRA" if train["method"] == "qlora" else "LoRA",
        "r": train["lora_r"],
        "alpha": train["lora_alpha"],
        "lora_dropout": train["lora_dropout"],
        "target_modules": train["target_modules"],  # the QLoRA pass puts LoRA on every 4-bit layer
        # float16 loads in float32 and trains in fp16 mixed precision (Olive does this itself).
        "torch_dtype": precision.compute_dtype,
        # Olive's names: the whole model on this process's GPU, or (no GPU) "auto", the CPU.
        "device_map": "current_device" if precision.device_map == "cuda" else "auto",
        "train_data_config": "train",
    }
    if has_eval:
        lora["eval_data_config"] = "eval"
    if precision.quantization is not None:
        quant = precision.quantization
        lora |= {
            "compute_dtype": quant["bnb_4bit_compute_dtype"],
            "quant_type": quant["bnb_4bit_quant_type"],
            "double_quant": quant["bnb_4bit_use_double_quant"],
        }
    args = training_arguments(settings, precision, in_workspace(root, CHECKPOINTS) / run)
    del args["fp16"]  # Olive sets it from torch_dtype and refuses it here
    lora["training_args"] = args
    on_cpu = precision.device_map == "cpu"
    accelerator = {
        "device": "cpu" if on_cpu else "gpu",
        "execution_providers": ["CPUExecutionProvider" if on_cpu else "CUDAExecutionProvider"],
    }

    def data_config(split: str) -> dict[str, Any]:
        # The components are registered by finetuning/user_script.py. They read the settings of
        # this run (with its --set overrides), written by write_run_settings().
        return {
            "name": split,
            "type": "HuggingfaceContainer",
            "user_script": str(root / "finetuning" / "user_script.py"),
            "script_dir": str(root / "finetuning"),
            "load_dataset_config": {
                "type": "workspace_dataset",
                "params": {"split": split, "settings_file": str(run_settings_file(root, run))},
            },
            "pre_process_data_config": {
                "type": "workspace_chat_pre_process",
                "params": {"settings_file": str(run_settings_file(root, run))},
            },
        }

    return {
        "input_model": {
            "type": "HfModel",
            "model_path": str(in_workspace(root, settings["model"]["path"])),
            # PyTorch's fused attention: the same results as "eager", faster and leaner.
            "load_kwargs": {"attn_implementation": "sdpa"},
        },
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [accelerator]}},
        "data_configs": [data_config("train")] + ([data_config("eval")] if has_eval else []),
        "passes": {"finetune": lora},
        "host": "local_system",
        "target": "local_system",
        "evaluate_input_model": False,
        "log_severity_level": 1,
        "cache_dir": str(in_workspace(root, OLIVE_CACHE) / run),
        "output_dir": str(in_workspace(root, "models") / f".run-{run}"),
    }
