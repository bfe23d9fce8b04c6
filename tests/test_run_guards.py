"""What a run refuses or repairs before it trains (tuner/training/runs.py, tuner/data.py, tuner/hub.py): a
finished run is not trained past its end, a rebuilt base model is a new run, a bad prompt template,
target module, seed or max_seq_len is one line, an incomplete model folder is rebuilt or named, and
a failed run leaves no Olive output folder behind (its checkpoints stay for the resume)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import render, run_py
from tuner.settings import load_settings
from tuner.training import runs

pytestmark = pytest.mark.slow

SHORT = ["--no-eval", "--set", "train.max_steps=4", "--set", "train.save_steps=2"]


@pytest.fixture
def ws(tiny_built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ws"
    shutil.copytree(tiny_built, copy)
    return copy


def one_line(run, code: int, *parts: str) -> None:
    assert run.returncode == code and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    for part in parts:
        assert part in run.stderr, run.stderr


def adapter_bytes(ws: Path) -> bytes:
    return (ws / "models" / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("script", ["finetuning/invoke_olive.py", "finetuning/train_sft.py"])
def test_a_finished_run_is_not_trained_again(ws: Path, script: str) -> None:
    """Rerunning a finished max_steps run used to resume from its final checkpoint and train one
    more step each time (with a constant learning rate, a new adapter each time)."""
    args = [*SHORT, "--set", "train.lr_scheduler_type=constant"]
    first = run_py(ws, script, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    adapter, fp = adapter_bytes(ws), json.loads((ws / "models" / "adapter" / "run.json").read_text())["run"]
    again = run_py(ws, script, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"already trained (run {fp}): models/adapter is its result; --fresh to train again" in again.stdout
    assert "Resuming" not in again.stdout and adapter_bytes(ws) == adapter
    # The adapter replaced by another (here: its record gone): the run is trained again from the
    # start, never past its end, into the same adapter.
    (ws / "models" / "adapter" / "run.json").unlink()
    third = run_py(ws, script, *args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"run {fp} ended earlier" in third.stdout and "Resuming" not in third.stdout
    assert adapter_bytes(ws) == adapter
    steps = [int(p.name.split("-")[1]) for p in (ws / "models" / "checkpoints" / fp).glob("checkpoint-*")]
    assert max(steps) == 4, steps


def test_a_rebuilt_base_model_is_a_new_run(ws: Path) -> None:
    """The same config, tokenizer and file sizes, other weights: not the run that came before."""
    settings = load_settings(ws / "settings.toml")
    before = runs.fingerprint(settings, ws, [])
    rebuild = run_py(ws, "setup/build_tiny_model.py", "--seed", "1")
    assert rebuild.returncode == 0, rebuild.stderr[-3000:]
    assert runs.fingerprint(settings, ws, []) != before


def test_a_template_that_names_no_input_column_is_one_line(ws: Path) -> None:
    run = run_py(ws, "finetuning/invoke_olive.py", "--set", "prompt.text_template=Tone of: {phrse}")
    one_line(run, 1, "[prompt] text_template names {phrse}, which is not an input column", "{phrase}")
    assert not (ws / "models").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('train.target_modules=["q_porj"]', "'q_porj' names no linear layer of the model; it has: o_proj, qkv_proj"),
        ("train.seed=4294967296", "train.seed = 4294967296 is not valid"),
        ("train.data_seed=4294967296", "train.data_seed = 4294967296 is not valid"),
    ],
    ids=["target_modules", "seed", "data_seed"],
)
def test_bad_train_values_are_one_line(ws: Path, override: str, message: str) -> None:
    run = run_py(ws, "finetuning/invoke_olive.py", "--set", override, "--set", "train.max_steps=2")
    one_line(run, 1, message)
    assert not list((ws / "models").glob(".run-*"))


def test_answers_past_max_seq_len_in_one_split_are_one_line(ws: Path) -> None:
    """With max_seq_len 16 a few answers of the whole dataset fit, but none of the held-out split's:
    Olive used to fail with a traceback while pre-processing that split."""
    run = run_py(ws, "finetuning/invoke_olive.py", "--set", "train.max_seq_len=16", "--set", "train.max_steps=2")
    one_line(run, 2, "every answer starts past max_seq_len 16 tokens", "in the eval split")
    assert not list((ws / "models").glob(".run-*"))


def test_fsdp_in_one_process_is_one_line(ws: Path) -> None:
    run = run_py(ws, "finetuning/train_sft.py", "--fsdp", "--set", "train.max_steps=1")
    one_line(run, 1, "FSDP shards the model over several processes: launch with torchrun")


def test_a_model_folder_without_weights_is_named(ws: Path) -> None:
    (ws / "model-cache" / "tiny-random" / "model.safetensors").unlink()
    run = run_py(ws, "finetuning/invoke_olive.py")
    one_line(run, 1, "model-cache/tiny-random is incomplete (no model.safetensors)", "python setup/download_model.py")


def test_a_half_built_model_is_built_again(ws: Path) -> None:
    """A build killed midway leaves config.json alone: it used to be called built, and training
    then failed on the missing tokenizer."""
    model = ws / "model-cache" / "tiny-random"
    for path in model.iterdir():
        if path.name != "config.json":
            path.unlink()
    run = run_py(ws, "setup/download_model.py")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "model-cache/tiny-random is incomplete (no tokenizer" in run.stdout
    assert {"tokenizer.json", "model.safetensors"} <= {p.name for p in model.iterdir()}
    # Weights cut short (a kill while writing them) are caught too.
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    run = run_py(ws, "setup/download_model.py")
    assert run.returncode == 0 and "model.safetensors is cut short or damaged): building it again" in run.stdout
    assert "is already built" in run_py(ws, "setup/download_model.py").stdout


def test_a_model_path_outside_the_workspace(ws: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "tiny-random"
    shutil.copytree(ws / "model-cache" / "tiny-random", shared)
    settings = ws / "settings.toml"
    settings.write_text(settings.read_text().replace('"model-cache/tiny-random"', json.dumps(str(shared)), 1))
    run = run_py(ws, "setup/download_model.py")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert f"tiny-random is already built in {shared}" in run.stdout


def test_a_failed_olive_run_leaves_only_its_checkpoints(ws: Path) -> None:
    """Killed after checkpoint-2, with that checkpoint's optimizer state damaged: the resume fails
    in Olive, which leaves its output folder; the run removes it and keeps the checkpoint."""
    first = run_py(ws, "finetuning/invoke_olive.py", *SHORT)
    assert first.returncode == 0, first.stderr[-3000:]
    [run_dir] = (ws / "models" / "checkpoints").iterdir()
    shutil.rmtree(run_dir / "checkpoint-4")
    shutil.rmtree(ws / "models" / "adapter")
    (run_dir / "checkpoint-2" / "optimizer.pt").write_bytes(b"damaged")
    failed = run_py(ws, "finetuning/invoke_olive.py", *SHORT)
    assert failed.returncode == 1 and "Resuming from checkpoint-2" in failed.stdout, failed.stderr[-3000:]
    assert not list((ws / "models").glob(".run-*")) and not (ws / "models" / "adapter.tmp").exists()
    assert (run_dir / "checkpoint-2" / "trainer_state.json").is_file()


def test_a_killed_run_s_olive_folder_is_removed_by_the_next(ws: Path) -> None:
    (ws / "models" / ".run-0123456789ab" / "output").mkdir(parents=True)
    run = run_py(ws, "finetuning/invoke_olive.py", "--no-eval", "--set", "train.max_steps=1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert not list((ws / "models").glob(".run-*"))


@pytest.mark.parametrize("name", ["seed", "data_seed"])
def test_copier_refuses_a_seed_past_32_bits(template_src: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be from 0 to 4294967295"):
        render(template_src, tmp_path / "ws", model="tiny-random", customize_training=True, **{name: 2**32})
    render(template_src, tmp_path / "ok", model="tiny-random", customize_training=True, **{name: 2**32 - 1})
