"""finetuning/invoke_olive.py really fine-tunes (a real model generalises), is reproducible,
refuses bad data cleanly, and resumes after a kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PYTHON, bare_workspace, run_py
from tuner.data import load_rows, split_rows
from tuner.settings import load_settings

pytestmark = pytest.mark.slow


def split_of(ws: Path) -> tuple[list[str], list[str]]:
    """The phrases of the training split and of the held-out split, as the run made them."""
    settings = load_settings(ws / "settings.toml")
    train_settings = settings["train"]
    train, held_out = split_rows(load_rows(settings, ws), train_settings["eval_split"], train_settings["data_seed"])
    return [r["phrase"] for r in train], [r["phrase"] for r in held_out]


def test_finetune_writes_adapter_and_record(tuned_workspace: Path) -> None:
    """tiny-random (model quality does not matter): the adapter, the loss record and eval.json."""
    adapter = tuned_workspace / "models" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "loss.png").stat().st_size > 1000
    losses = [h["loss"] for h in json.loads((adapter / "log_history.json").read_text()) if "loss" in h]
    assert len(losses) > 3 and losses[-1] < losses[0], losses
    log = (tuned_workspace / "finetune.log").read_text()
    assert "Adapter written to models/adapter" in log
    # One progress bar with the loss, not Olive's log lines nor the Trainer's dicts: those are in
    # the file named, in the run's folder.
    assert "Fine-tuning: 100%" in log and "loss=" in log and "{'loss'" not in log
    olive_log = log.split("Olive's log: ", 1)[1].split("\n", 1)[0]
    assert olive_log.startswith("models/runs/") and "[INFO]" not in log
    assert "Running fine-tuning" in (tuned_workspace / olive_log).read_text("utf-8")
    report = json.loads((adapter / "eval.json").read_text())
    assert report["held_out_rows"] == 42  # 10% of the 420 sample rows
    for which in ("base", "prompted", "tuned"):
        assert set(report[which]) == {"exact_match", "mentioned", "answer_loss", "perplexity"}
    assert report["tuned"]["answer_loss"] < report["base"]["answer_loss"]
    assert "Held-out evaluation: 42 rows the model never trained on" in log and "expected:" in log


def test_finetune_generalises_to_held_out_phrases(smol_workspace: Path) -> None:
    """A real pretrained model (SmolLM2-135M-Instruct, offline copy), fine-tuned on CPU with the
    catalog's defaults, answers phrases it never trained on far better than the base model."""
    report = json.loads((smol_workspace / "models" / "adapter" / "eval.json").read_text())
    base, tuned = report["base"]["exact_match"], report["tuned"]["exact_match"]
    print(f"held-out exact match over {report['held_out_rows']} rows: base {base:.1%}, fine-tuned {tuned:.1%}")
    assert tuned >= 0.70 and tuned >= base + 0.40, report
    assert report["tuned"]["perplexity"] < report["base"]["perplexity"]
    # The held-out phrases really are unseen: none of them is in the training split.
    train, held_out = split_of(smol_workspace)
    assert len(held_out) == report["held_out_rows"] and not set(held_out) & set(train)
    assert [e["input"] for e in report["examples"]] == held_out
    log = (smol_workspace / "finetune.log").read_text()
    assert "Held-out evaluation:" in log and log.count("expected:") == 3


def adapter_tensors(ws: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(ws / "models" / "adapter" / "adapter_model.safetensors")


def test_same_answers_same_adapter_other_seed_other_adapter(render_factory, tuned_workspace, tmp_path: Path) -> None:
    """`seed` drives the LoRA initialisation and the Trainer: the same answers give bit-identical
    adapter weights, and another seed (same data split) gives different ones."""
    import torch

    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        ws = tmp_path / name
        shutil.copytree(render_factory(model="tiny-random", platform="cpu", mode="local", seed=seed), ws)
        shutil.copytree(tuned_workspace / "model-cache", ws / "model-cache")
        run = run_py(ws, "finetuning/invoke_olive.py", "--no-eval", "--set", "train.max_steps=8")
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = adapter_tensors(ws)
    assert runs["a"].keys() == runs["b"].keys() == runs["c"].keys()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


BAD_DATASETS = [
    ("missing.jsonl", None, "dataset file not found"),
    ("empty.jsonl", b"\n  \n", "the file is empty"),
    (
        "bad.jsonl",
        b'{"phrase": "a", "tone": "joy"}\n{"phrase": "b", "tone": "joy"}\n{"phrase": oops}\n',
        "line 3: invalid JSON",
    ),
    ("cols.jsonl", b'{"phrase": "a", "tone": "joy"}\n{"text": "b", "tone": "joy"}\n', "row 2: missing column 'phrase'"),
    ("latin1.jsonl", '{"phrase": "caf\u00e9", "tone": "joy"}\n'.encode("latin-1"), "line 1: not UTF-8"),
    ("few.jsonl", b'{"phrase": "a", "tone": "joy"}\n{"phrase": "b", "tone": "fear"}\n', "too few for eval_split"),
    ("rows.csv", b"phrase,tone\na,joy\n,fear\n", "row 2: empty value"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_DATASETS, ids=[b[0] for b in BAD_DATASETS])
def test_bad_dataset_gets_one_clear_line(render_factory, tmp_path: Path, name: str, content, message: str) -> None:
    ws = bare_workspace(render_factory, tmp_path, platform="cpu")
    if content is not None:
        (ws / "dataset" / name).write_bytes(content)
    settings = ws / "settings.toml"
    settings.write_text(settings.read_text().replace('"dataset/sample.jsonl"', f'"dataset/{name}"'))
    run = run_py(ws, "finetuning/invoke_olive.py")
    assert run.returncode == 2
    assert message in run.stderr and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert not (ws / "models").exists()


def test_missing_model_names_the_command(render_factory, tmp_path: Path) -> None:
    ws = bare_workspace(render_factory, tmp_path, platform="cpu")
    run = run_py(ws, "finetuning/invoke_olive.py")
    assert run.returncode == 1 and "python setup/download_model.py" in run.stderr and "Traceback" not in run.stderr


def without_bitsandbytes(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import bitsandbytes (as where it is not installed)."""
    site = tmp_path / "no-bnb"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n", "utf-8")
    return {"PYTHONPATH": f".{os.pathsep}{site}"}


@pytest.mark.parametrize("script", ["finetuning/invoke_olive.py", "finetuning/train_sft.py"])
def test_qlora_without_bitsandbytes_is_one_line(render_factory, tuned_workspace: Path, tmp_path: Path, script) -> None:
    """QLoRA runs wherever bitsandbytes does (the CPU too: tests/test_qlora.py); without it, one line."""
    ws = bare_workspace(render_factory, tmp_path, platform="cuda")
    shutil.copytree(tuned_workspace / "model-cache", ws / "model-cache")
    run = run_py(ws, script, env=without_bitsandbytes(tmp_path))
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert 'method = "qlora" needs bitsandbytes' in run.stderr and "--set train.method=lora" in run.stderr
    assert not (ws / "models").exists()


def test_kill_and_resume(render_factory, tuned_workspace: Path, tmp_path: Path) -> None:
    ws = bare_workspace(render_factory, tmp_path, platform="cpu")
    shutil.copytree(tuned_workspace / "model-cache", ws / "model-cache")
    proc = subprocess.Popen(
        [PYTHON, "finetuning/invoke_olive.py"], cwd=ws, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    state = None
    while time.monotonic() < deadline and proc.poll() is None:
        # trainer_state.json is the last file a checkpoint writes.
        found = sorted((ws / "models" / "checkpoints").glob("*/checkpoint-*/trainer_state.json"))
        if found:
            state = found[0]
            break
        time.sleep(0.2)
    assert state is not None and proc.poll() is None, "no checkpoint before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = int(state.parent.name.split("-")[1])
    assert not (ws / "models" / "adapter").exists()  # nothing that looks finished
    run = run_py(ws, "finetuning/invoke_olive.py")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"Resuming from checkpoint-{step}" in run.stdout
    assert (ws / "models" / "adapter" / "adapter_config.json").is_file()
    # A changed dataset is a new run: no stale checkpoint or cache is reused.
    sample = ws / "dataset" / "sample.jsonl"
    sample.write_text("\n".join(sample.read_text().splitlines()[:100]) + "\n")
    run = run_py(ws, "finetuning/invoke_olive.py", "--set", "train.max_steps=3")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Resuming" not in run.stdout and "Fine-tuning tiny-random on 100 rows" in run.stdout


def test_help_is_fast_and_clean(render_factory) -> None:
    ws = render_factory(model="tiny-random", platform="cpu", mode="local")
    run = subprocess.run(
        [sys.executable, "finetuning/invoke_olive.py", "--help"], cwd=ws, capture_output=True, text=True
    )
    assert run.returncode == 0 and "--cpu-lora" in run.stdout
