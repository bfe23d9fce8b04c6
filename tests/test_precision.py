"""tuner/training/precision.py: the one precision policy, decided for simulated machines (no GPU, a T4, an
A100, an H100), never by asking this one; and the places that used to decide it on their own now
ask it (the trainers' arguments, the evaluation's and the engine's loading, vLLM's --dtype)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO
from tuner.training.precision import Device, compute_dtype, decide, vllm_dtype
from tuner.training.runs import lora_targets, training_arguments

CPU = Device(cuda=False)
T4 = Device(cuda=True, capability=(7, 5))
V100 = Device(cuda=True, capability=(7, 0))
A100 = Device(cuda=True, capability=(8, 0))
H100 = Device(cuda=True, capability=(9, 0))


def train(method: str = "lora", dtype: str = "bfloat16", quant: str = "nf4", double: bool = True) -> dict:
    return {"method": method, "compute_dtype": dtype, "quant_type": quant, "double_quant": double}


@pytest.mark.parametrize(
    ("device", "requested", "want"),
    [
        (CPU, "bfloat16", "float32"),
        (CPU, "float16", "float32"),
        (CPU, "float32", "float32"),
        (V100, "bfloat16", "float16"),
        (T4, "bfloat16", "float16"),  # torch's is_bf16_supported() says yes here: emulated, slow
        (T4, "float32", "float32"),
        (A100, "bfloat16", "bfloat16"),
        (H100, "bfloat16", "bfloat16"),
        (H100, "float16", "float16"),
    ],
)
def test_compute_dtype(device: Device, requested: str, want: str) -> None:
    assert compute_dtype(requested, device) == want
    assert vllm_dtype(train(dtype=requested), device) == want


def test_cpu_lora() -> None:
    p = decide(train(), CPU)
    assert (p.compute_dtype, p.weights_dtype, p.quantization, p.device_map) == ("float32", "float32", None, "cpu")
    assert "runs in float32 here" in p.note and "cpu" in p.note
    assert p.load_kwargs() == {"dtype": "float32", "device_map": "cpu"}
    assert decide(train(dtype="float32"), CPU).note == ""


def test_t4_float16_mixed_precision() -> None:
    p = decide(train(), T4)
    assert (p.compute_dtype, p.weights_dtype, p.mixed) == ("float16", "float32", True)
    assert "no native bfloat16" in p.note and "sm75" in p.note


@pytest.mark.parametrize("device", [A100, H100])
def test_ampere_and_newer_bfloat16(device: Device) -> None:
    p = decide(train(), device)
    assert (p.compute_dtype, p.weights_dtype, p.mixed, p.device_map, p.note) == (
        "bfloat16",
        "bfloat16",
        False,
        "cuda",
        "",
    )


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [True, False])
@pytest.mark.parametrize(("device", "dtype"), [(CPU, "float32"), (T4, "float16"), (H100, "bfloat16")])
def test_qlora_config(device: Device, dtype: str, quant: str, double: bool) -> None:
    import torch

    p = decide(train("qlora", quant=quant, double=double), device)
    config = p.bnb_config()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == quant
    assert config.bnb_4bit_use_double_quant is double
    assert config.bnb_4bit_compute_dtype == getattr(torch, dtype)
    assert p.load_kwargs()["quantization_config"] is not None


def test_several_processes_place_their_own_copy() -> None:
    assert decide(train(), H100, processes=4).device_map is None
    fsdp = decide(train("qlora"), H100, processes=4, fsdp=True)
    # FSDP shards floating-point tensors of one dtype per wrapped layer: the 4-bit storage too.
    assert fsdp.quantization is not None and fsdp.quantization["bnb_4bit_quant_storage"] == "bfloat16"
    assert "bnb_4bit_quant_storage" not in (decide(train("qlora"), H100).quantization or {})


def test_one_table_for_both_trainers(tmp_path: Path) -> None:
    settings = {
        "train": {
            **train(),
            "seed": 1,
            "data_seed": 2,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "gradient_checkpointing": False,
            "learning_rate": 1e-4,
            "lr_scheduler_type": "linear",
            "num_train_epochs": 1.0,
            "max_steps": -1,
            "logging_steps": 1,
            "save_steps": 10,
            "eval_steps": 10,
            "eval_split": 0.1,
            "report_to": "none",
            "target_modules": ["q_proj"],
        }
    }
    on_t4 = training_arguments(settings, decide(settings["train"], T4), tmp_path)
    assert (on_t4["fp16"], on_t4["bf16"]) == (True, False)
    on_h100 = training_arguments(settings, decide(settings["train"], H100), tmp_path)
    assert (on_h100["fp16"], on_h100["bf16"]) == (False, True)
    assert on_h100["optim"] == "adamw_torch_fused" and on_h100["eval_strategy"] == "steps"
    assert lora_targets(settings["train"]) == ["q_proj"]
    assert lora_targets({**settings["train"], "method": "qlora"}) == "all-linear"


def names_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    return {
        n.attr if isinstance(n, ast.Attribute) else n.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Name | ast.Attribute)
    }


def test_nobody_else_decides_the_precision() -> None:
    """The dtype and 4-bit decisions live in tuner/training/precision.py alone: no other module of the
    workspace asks torch about bfloat16 or builds a BitsAndBytesConfig."""
    for path in [*(REPO / "template").rglob("*.py")]:
        if path.name == "precision.py" or "tests" in path.parts:
            continue
        names = names_in(path)
        assert "is_bf16_supported" not in names, path
        assert "BitsAndBytesConfig" not in names, path
        assert "get_device_capability" not in names, path
