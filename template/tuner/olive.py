"""The Olive run config, built from settings.toml's [train] at run time.

Users never edit an Olive config: invoke_olive.py builds it here for each run and writes the
one that ran beside the adapter (olive-config.json), as the record of what was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuner.settings import CHECKPOINTS, OLIVE_CACHE, in_workspace

# Keys of [train] that go to transformers' TrainingArguments as they are.
TRAINER_KEYS = (
    "seed",
    "data_seed",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "learning_rate",
    "lr_scheduler_type",
    "num_train_epochs",
    "max_steps",
    "logging_steps",
    "save_steps",
    "eval_steps",
)


def device(settings: dict[str, Any]) -> str:
    """Olive's accelerator: plain LoRA on a CPU-only workspace trains on the CPU."""
    train = settings["train"]
    return "cpu" if train["method"] == "lora" and settings["model"]["platform"] == "cpu" else "gpu"


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


def olive_config(settings: dict[str, Any], root: Path, run: str) -> dict[str, Any]:
    """Olive 0.13's config for one run. `run` (a fingerprint of everything that decides the
    result) names its checkpoint and cache folders, so a changed run never resumes a stale one."""
    train = settings["train"]
    has_eval = train["eval_split"] > 0
    lora: dict[str, Any] = {
        "type": "QLoRA" if train["method"] == "qlora" else "LoRA",
        "r": train["lora_r"],
        "alpha": train["lora_alpha"],
        "lora_dropout": train["lora_dropout"],
        "target_modules": train["target_modules"],
        "torch_dtype": train["compute_dtype"],
        "train_data_config": "train",
    }
    if has_eval:
        lora["eval_data_config"] = "eval"
    if train["method"] == "qlora":
        lora.update({key: train[key] for key in ("compute_dtype", "quant_type", "double_quant")})
    lora["training_args"] = {key: train[key] for key in TRAINER_KEYS} | {
        "save_strategy": "steps",
        "save_total_limit": 2,
        "dataloader_num_workers": 0,
        "report_to": train["report_to"],
        "output_dir": str(in_workspace(root, CHECKPOINTS) / run),
    }
    on_cpu = device(settings) == "cpu"
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
