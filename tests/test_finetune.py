"""Issue 3: invoke_olive.py really fine-tunes, refuses bad data cleanly, and resumes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PYTHON, run_py

pytestmark = pytest.mark.slow

ACCURACY = """
import json, sys, torch
sys.path.insert(0, "finetuning")
from data import SETTINGS, load_rows, split_rows, to_messages
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained(SETTINGS["model"]["path"])
model = AutoModelForCausalLM.from_pretrained(SETTINGS["model"]["path"])
if sys.argv[1] == "tuned":
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, SETTINGS["inference"]["adapter_path"])
train, _ = split_rows(load_rows(), 0.1, 42)
right = 0
for row in train:
    messages = to_messages(row)[:-1]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    right += answer == row["tone"]
print(json.dumps({"accuracy": right / len(train), "n": len(train)}))
"""


def accuracy(ws: Path, which: str) -> float:
    run = run_py(ws, "-c", ACCURACY, which)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["accuracy"]


def test_finetune_learns_the_sample(tuned_workspace: Path) -> None:
    adapter = tuned_workspace / "models" / "lora" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "loss.png").stat().st_size > 1000
    losses = [h["loss"] for h in json.loads((adapter / "log_history.json").read_text()) if "loss" in h]
    assert losses[-1] < losses[0] / 4, losses
    log = (tuned_workspace / "finetune.log").read_text()
    assert "'loss'" in log and "Adapter written to models/lora/adapter" in log
    tuned, base = accuracy(tuned_workspace, "tuned"), accuracy(tuned_workspace, "base")
    print(f"greedy accuracy on training phrases: fine-tuned {tuned:.1%}, base {base:.1%}")
    assert tuned >= 0.9
    assert base <= 0.4  # six tones: chance is about 17%


def bare_workspace(render_factory, tmp_path: Path, **answers: str) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", mode="local", **answers), ws)
    return ws


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


def test_qlora_preflight(render_factory, tuned_workspace: Path, tmp_path: Path) -> None:
    ws = bare_workspace(render_factory, tmp_path, platform="cuda")
    shutil.copytree(tuned_workspace / "model-cache", ws / "model-cache")
    run = run_py(ws, "finetuning/invoke_olive.py")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "QLoRA needs bitsandbytes: pip install bitsandbytes" in run.stderr
    assert "--cpu-lora" in run.stderr
    # With bitsandbytes importable but no CUDA GPU, the message says so.
    fake = tmp_path / "fake"
    (fake / "bitsandbytes").mkdir(parents=True)
    (fake / "bitsandbytes" / "__init__.py").write_text("")
    run = run_py(ws, "finetuning/invoke_olive.py", env={"PYTHONPATH": str(fake)})
    assert run.returncode == 1 and "QLoRA needs a CUDA GPU" in run.stderr and "--cpu-lora" in run.stderr
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
    assert not (ws / "models" / "lora" / "adapter").exists()  # nothing that looks finished
    run = run_py(ws, "finetuning/invoke_olive.py")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"Resuming from checkpoint-{step}" in run.stdout
    assert (ws / "models" / "lora" / "adapter" / "adapter_config.json").is_file()
    # A changed dataset is a new run: no stale checkpoint or cache is reused.
    sample = ws / "dataset" / "sample.jsonl"
    sample.write_text("\n".join(sample.read_text().splitlines()[:100]) + "\n")
    config = ws / "finetuning" / "olive-config.json"
    config.write_text(config.read_text().replace('"max_steps": -1', '"max_steps": 3'))
    run = run_py(ws, "finetuning/invoke_olive.py")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Resuming" not in run.stdout and "Fine-tuning tiny-random on 100 rows" in run.stdout


def test_help_is_fast_and_clean(render_factory) -> None:
    ws = render_factory(model="tiny-random", platform="cpu", mode="local")
    run = subprocess.run(
        [sys.executable, "finetuning/invoke_olive.py", "--help"], cwd=ws, capture_output=True, text=True
    )
    assert run.returncode == 0 and "--cpu-lora" in run.stdout
