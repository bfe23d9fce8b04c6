"""The bookkeeping of a fine-tuning run, shared by invoke_olive.py and train_sft.py: the checks
made before anything heavy, one run per workspace, checkpoints that may be torn by a kill, and
publishing the adapter so that a half-written one never looks finished."""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from tuner.data import check_lengths, check_rows, load_rows, split_rows
from tuner.settings import RUN_RECORD, check_train, in_workspace


class RunError(Exception):
    """A run that cannot start, said in one line."""


def check_run(settings: dict[str, Any], root: Path) -> tuple[list[dict[str, Any]], str]:
    """Everything cheap a run checks before loading the model: the [train] values, the dataset
    and its split, the base model, the logger, and answers within max_seq_len (an answer cut off
    teaches nothing). Returns the rows and a warning ("" if none); raises SettingsError, RunError,
    or DatasetError (a bad dataset)."""
    check_train(settings)
    train = settings["train"]
    rows = load_rows(settings, root)
    check_rows(rows, settings)
    split_rows(rows, train["eval_split"], train["data_seed"])
    model_path = in_workspace(root, settings["model"]["path"])
    if not (model_path / "config.json").is_file():
        raise RunError(f"base model not found in {model_path}: run `python setup/download_model.py` first")
    if train["report_to"] != "none" and importlib.util.find_spec(train["report_to"]) is None:
        raise RunError(
            f"[train] report_to = {train['report_to']!r} needs the {train['report_to']} package: "
            f"pip install {train['report_to']}, or run with --set train.report_to=none"
        )
    from transformers import AutoTokenizer

    return rows, check_lengths(AutoTokenizer.from_pretrained(model_path), rows, train["max_seq_len"], settings)


def take_lock(path: Path) -> None:
    """One fine-tuning run per workspace: a lock file holding the PID, removed at exit. A lock
    left by a process that is gone (killed, machine restarted) is taken over."""
    import psutil  # installed with accelerate

    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = path.read_text("utf-8").strip()
            # The PID must be alive and older than the lock (PIDs are reused after a reboot).
            try:
                alive = holder.isdigit() and psutil.Process(int(holder)).create_time() <= path.stat().st_mtime + 1
            except (psutil.Error, OSError):  # the process (or the lock) is gone
                alive = False
            if alive:
                busy = f"another fine-tuning run is in progress in this workspace (PID {holder}, lock {path})"
                raise RunError(busy) from None
            print(f"Taking over the stale lock of PID {holder or '?'}, which has ended", file=sys.stderr)
            path.unlink(missing_ok=True)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        atexit.register(path.unlink, missing_ok=True)
        return
    raise RunError(f"cannot take the lock {path}: another run took it at the same moment")


def last_complete_checkpoint(folder: Path, root: Path) -> Path | None:
    """The newest checkpoint that was written completely (trainer_state.json, written last, is
    there and parses). Torn ones, from a run killed while saving, are moved aside to torn/."""
    good = None
    for checkpoint in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text("utf-8"))
            good = checkpoint
        except (OSError, ValueError):
            aside = folder.parent / "torn" / f"{folder.name}-{checkpoint.name}"
            shutil.rmtree(aside, ignore_errors=True)
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(checkpoint, aside)
            print(f"Skipping {checkpoint.name}, written only in part (moved to {aside.relative_to(root)})")
    return good


def publish(new: Path, adapter: Path) -> None:
    """Put `new` in place of `adapter` by two renames, keeping the previous adapter until the
    new one is in place; a kill between them is repaired by recover_adapter()."""
    previous = adapter.with_name(adapter.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if adapter.exists():
        os.replace(adapter, previous)
    os.replace(new, adapter)
    shutil.rmtree(previous, ignore_errors=True)


def publish_run(staging: Path, adapter: Path, record: dict[str, Any], log_history: list[dict[str, Any]]) -> str:
    """Add the record of what ran (run.json), the loss history and its plot to the adapter in
    `staging`, then publish it. Returns the loss summary to print ("" without a history)."""
    (staging / RUN_RECORD).write_text(json.dumps(record, indent=1), "utf-8")
    if log_history:
        (staging / "log_history.json").write_text(json.dumps(log_history, indent=1), "utf-8")
        plot_loss(log_history, staging / "loss.png")
    publish(staging, adapter)
    losses = [h["loss"] for h in log_history if "loss" in h]
    return f"; train loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""


def recover_adapter(adapter: Path, root: Path) -> None:
    previous = adapter.with_name(adapter.name + ".previous")
    if previous.is_dir() and not adapter.exists():
        os.replace(previous, adapter)
        print(f"Restored the previous adapter in {adapter.relative_to(root)} (a run was stopped while publishing)")


def fingerprint(settings: dict[str, Any], root: Path, code: list[Path]) -> str:
    """What decides a run's result: the settings, the dataset bytes, the code that trains, the base
    model. It names the run's checkpoint folder, so a changed run never resumes a stale one."""
    digest = hashlib.sha256(json.dumps([settings[k] for k in ("train", "dataset", "prompt")], sort_keys=True).encode())
    if settings["dataset"]["source"] != "huggingface":
        digest.update(in_workspace(root, settings["dataset"]["path"]).read_bytes())
    for path in code:
        digest.update(path.read_bytes())
    digest.update((in_workspace(root, settings["model"]["path"]) / "config.json").read_bytes())
    return digest.hexdigest()[:12]


def plot_loss(log_history: list[dict[str, Any]], out: Path) -> None:
    """The train and eval loss of a Trainer's log history, as a PNG beside the adapter."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(h["step"], h[key]) for h in log_history if key in h]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=label)
    ax.set(xlabel="step", ylabel="loss", title="Fine-tuning loss")
    ax.legend()
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
