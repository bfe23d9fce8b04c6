"""finetuning/train_sft.py: two processes (DDP, or FSDP, over gloo on the CPU) train the same adapter
as one process with twice the batch; one process writes the adapter as invoke_olive.py does; the checks
before training are one line each."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import run_py, sample_rows

pytestmark = pytest.mark.slow

STEPS = 6


@pytest.fixture
def workspace(render_factory, tuned_workspace: Path, tmp_path: Path) -> Path:
    """A fresh tiny-random CPU workspace with the base model, and a sample whose answers have 1 to 4
    words: the processes of a step see different numbers of answer tokens, so the loss is right only
    when it is averaged over the tokens of all processes (not per process, then over processes)."""
    ws = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform="cpu", mode="local"), ws)
    shutil.copytree(tuned_workspace / "model-cache", ws / "model-cache")
    lines = [json.dumps(row | {"tone": " ".join([row["tone"]] * (i % 4 + 1))}) for i, row in enumerate(sample_rows())]
    (ws / "dataset" / "sample.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    return ws


def train(ws: Path, *args: str, processes: int = 1) -> tuple[dict, float]:
    """Run train_sft.py (under torchrun for several processes); the adapter's tensors and the seconds."""
    from safetensors.torch import load_file

    # Every example padded to max_seq_len: a batch of 4 and two of 2 then have the same shapes, so
    # the sums inside the matrix products are the same sums (unpadded, they differ by ~5e-6).
    common = ["--set", f"train.max_steps={STEPS}", "--set", "train.pad_to_max_len=true", *args]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    start = time.monotonic()
    run = run_py(ws, *launch, "finetuning/train_sft.py", *common)
    seconds = time.monotonic() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return load_file(ws / "models" / "adapter" / "adapter_model.safetensors"), seconds


def test_two_processes_train_what_one_does_with_twice_the_batch(workspace: Path) -> None:
    import torch

    one, one_s = train(workspace, "--set", "train.per_device_train_batch_size=4")
    adapter = workspace / "models" / "adapter"
    # The adapter is laid out as invoke_olive.py lays it out, with the held-out evaluation.
    assert {"adapter_config.json", "adapter_model.safetensors", "run.json", "log_history.json", "eval.json"} <= {
        p.name for p in adapter.iterdir()
    }
    record = json.loads((adapter / "run.json").read_text())
    assert record["processes"] == 1 and record["settings"]["train"]["max_steps"] == STEPS
    assert [h["step"] for h in json.loads((adapter / "log_history.json").read_text()) if "loss" in h] == [5]
    assert json.loads((adapter / "eval.json").read_text())["held_out_rows"] == 42

    two, two_s = train(workspace, "--set", "train.per_device_train_batch_size=2", "--no-eval", processes=2)
    assert json.loads((adapter / "run.json").read_text())["processes"] == 2
    # FSDP (FSDP2 for LoRA) shards the model over the processes: the same steps, the same adapter.
    sharded, sharded_s = train(
        workspace, "--set", "train.per_device_train_batch_size=2", "--no-eval", "--fsdp", processes=2
    )
    assert json.loads((adapter / "run.json").read_text())["fsdp"] is True
    other_seed, _ = train(
        workspace, "--set", "train.per_device_train_batch_size=4", "--set", "train.seed=1", "--no-eval"
    )

    assert one.keys() == two.keys() == sharded.keys() == other_seed.keys()
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    sharded_diff = max((one[k] - sharded[k]).abs().max().item() for k in one)
    seed_diff = max((one[k] - other_seed[k]).abs().max().item() for k in one)
    print(
        f"2x2 vs 1x4, {STEPS} steps, max abs diff: DDP {diff:.3g}, FSDP {sharded_diff:.3g}; other seed {seed_diff:.3g}"
    )
    print(f"seconds: DDP {two_s:.0f}, FSDP {sharded_s:.0f}, 1 process with the evaluation {one_s:.0f}")
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-6) for k in one)
    assert all(torch.allclose(one[k], sharded[k], rtol=0, atol=1e-6) for k in one)
    assert seed_diff > 1e-3  # the comparison can fail: another initialisation lands elsewhere
    assert all(one[k].abs().max() > 1e-3 for k in one if "lora_B" in k)  # B starts at zero: it trained


def test_bad_override_is_one_line(workspace: Path) -> None:
    run = run_py(workspace, "finetuning/train_sft.py", "--set", "train.lora_r=0")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr == "error: [train] lora_r = 0 is not valid: it must be a whole number from 1 to 1024\n"


def test_bad_dataset_is_one_line(workspace: Path) -> None:
    (workspace / "dataset" / "sample.jsonl").write_text('{"phrase": "a", "tone": "joy"}\n{"text": "b"}\n')
    run = run_py(workspace, "finetuning/train_sft.py")
    assert run.returncode == 2 and run.stderr == "error: row 2: missing column 'phrase' (columns: text)\n"
    assert not (workspace / "models").exists()


def test_qlora_without_cuda_is_one_line(render_factory, tuned_workspace: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform="cuda", mode="local"), ws)
    shutil.copytree(tuned_workspace / "model-cache", ws / "model-cache")
    run = run_py(ws, "finetuning/train_sft.py")
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: QLoRA needs bitsandbytes and a CUDA GPU (bitsandbytes installed: False")
    assert "--set train.method=lora" in run.stderr
    assert not (ws / "models").exists()
