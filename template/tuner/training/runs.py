"""One fine-tuning run, shared by invoke_olive.py (Olive) and train_sft.py (TRL): the checks made
before anything heavy, the precision, one run per workspace, the run's fingerprint and folders,
the [train] -> TrainingArguments table, checkpoints that may be torn by a kill, and publishing
the adapter so that a half-written one never looks finished. Each script keeps only what is its
own: Olive's workflow, or TRL and the launcher."""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.data import check_lengths, check_prompt, check_rows, load_rows, split_rows
from tuner.files import recover_folder, replace_folder
from tuner.hub import model_folder_problem
from tuner.settings import CHECKPOINTS, MODELS, RUN_RECORD, RUNS, WorkspaceError, adapter_dir, in_workspace
from tuner.training.precision import Device, Precision, decide

# [train] keys that go to transformers' TrainingArguments as they are, in both trainers.
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


class RunError(WorkspaceError):
    """A run that cannot start, said in one line."""


Rows = list[dict[str, Any]]


def check_run(settings: dict[str, Any], root: Path) -> tuple[Rows, Rows, Rows, str]:
    """Everything cheap a run checks before loading the model (load_settings checked the values
    themselves): the prompt, the dataset and its split, the base model, the logger, and answers
    within max_seq_len (an answer cut off teaches nothing). Returns the rows, the train and eval
    splits and a warning ("" if none); raises SettingsError, RunError, or DatasetError (a bad dataset)."""
    check_prompt(settings)
    train = settings["train"]
    rows = load_rows(settings, root)
    check_rows(rows, settings)
    train_rows, eval_rows = split_rows(rows, train["eval_split"], train["data_seed"])
    model_path = in_workspace(root, settings["model"]["path"])
    if not (model_path / "config.json").is_file():
        raise RunError(f"base model not found in {model_path}: run `python setup/download_model.py` first")
    problem = model_folder_problem(model_path)
    if problem:
        raise RunError(f"the model folder {model_path} is incomplete ({problem}): run `python setup/download_model.py`")
    if train["method"] == "lora":  # QLoRA takes every linear layer (lora_targets)
        check_target_modules(model_path, train["target_modules"])
    if train["report_to"] != "none" and importlib.util.find_spec(train["report_to"]) is None:
        raise RunError(
            f"[train] report_to = {train['report_to']!r} needs the {train['report_to']} package: "
            f"pip install {train['report_to']}, or run with --set train.report_to=none"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Each split is tokenised on its own (tokenize()), so each must keep an answer.
    warning = check_lengths(tokenizer, train_rows, train["max_seq_len"], settings)
    if eval_rows:
        check_lengths(tokenizer, eval_rows, train["max_seq_len"], settings, "eval")
    return rows, train_rows, eval_rows, warning


def check_target_modules(model_path: Path, targets: list[str]) -> None:
    """RunError for a [train] target_modules name that matches no linear layer of the model (peft
    fails with a traceback when none matches, and skips a typo silently when another does). The
    model is built on the meta device: its layers without reading or allocating its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    for target in targets:  # peft's rule: the whole name, or its end after a dot
        if not any(n == target or n.endswith("." + target) for n in names):
            leaves = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
            raise RunError(f"[train] target_modules: {target!r} names no linear layer of the model; it has: {leaves}")


@dataclass
class Run:
    """One run as both trainers see it: its rows, precision, fingerprint and folders."""

    settings: dict[str, Any]
    rows: Rows
    train_rows: Rows
    eval_rows: Rows
    precision: Precision
    fp: str  # the fingerprint: names the checkpoint, cache and log folders
    checkpoints: Path
    adapter: Path
    staging: Path  # where the adapter is put together before it is published


def start_run(
    settings: dict[str, Any], root: Path, code: list[Path], rank: int = 0, processes: int = 1, fsdp: bool = False
) -> Run:
    """The checks (check_run), the precision on this machine, then, in the first process only, the
    workspace's lock and the repair of an adapter left half-published. Raises SettingsError,
    RunError or DatasetError; prints the warnings once."""
    rows, train_rows, eval_rows, warning = check_run(settings, root)
    train = settings["train"]
    device = Device.detect()
    precision = decide(train, device, processes, fsdp)
    notes = [warning, precision.note]
    if train["method"] == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RunError(
                '[train] method = "qlora" needs bitsandbytes: pip install -r setup/requirements-*.txt '
                "(it is pinned there), or train plain LoRA with --set train.method=lora"
            )
        # Olive's QLoRA pass puts LoRA weights on every 4-bit linear layer whatever target_modules
        # says; train_sft.py does the same (lora_targets), so that both train the same adapter.
        notes.append("QLoRA: LoRA weights on every linear layer of the 4-bit base ([train] target_modules is for LoRA)")
        if not device.cuda:
            notes.append("QLoRA on the CPU (bitsandbytes 4-bit): it works, slowly; --cpu-lora is the fast choice here")
    if rank == 0:
        for note in filter(None, notes):
            print(note, file=sys.stderr)
    adapter = adapter_dir(root)
    if rank == 0:
        take_lock(root / MODELS / ".finetune.lock")
        recover_adapter(adapter, root)
        # Olive's output folders of runs that failed or were killed: nothing in them resumes (the
        # checkpoints are in models/checkpoints).
        for leftover in (root / MODELS).glob(".run-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    fp = fingerprint(settings, root, code, {"processes": processes, "fsdp": fsdp})
    # TensorBoard's folder for this run (both trainers' TensorBoard callback reads it).
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(in_workspace(root, RUNS) / fp))
    checkpoints = in_workspace(root, CHECKPOINTS) / fp
    staging = adapter.with_name(adapter.name + ".tmp")
    return Run(settings, rows, train_rows, eval_rows, precision, fp, checkpoints, adapter, staging)


def training_arguments(settings: dict[str, Any], precision: Precision, output_dir: Path) -> dict[str, Any]:
    """transformers' TrainingArguments from [train] and the precision: the one table both trainers
    use (Olive's LoRA passes hand it to their Trainer; train_sft.py to SFTConfig)."""
    train = settings["train"]
    return {key: train[key] for key in TRAINER_KEYS} | {
        "output_dir": str(output_dir),
        "save_strategy": "steps",
        "save_total_limit": 2,
        "eval_strategy": "steps" if train["eval_split"] > 0 else "no",
        "dataloader_num_workers": 0,
        "report_to": train["report_to"],
        # transformers' default AdamW (one fused kernel), for LoRA and QLoRA alike: Olive's QLoRA
        # default is a paged optimizer, for memory spikes that LoRA weights never make.
        "optim": "adamw_torch_fused",
        # Mixed precision: float16 compute over float32 weights; bfloat16 where the GPU has it.
        "fp16": precision.mixed,
        "bf16": precision.compute_dtype == "bfloat16",
    }


def lora_targets(train: dict[str, Any]) -> list[str] | str:
    """The modules that get LoRA weights: [train] target_modules, or for QLoRA every linear layer
    of the 4-bit base (what Olive's QLoRA pass does; peft's "all-linear" leaves out the output
    layer, which bitsandbytes does not quantise either)."""
    return "all-linear" if train["method"] == "qlora" else train["target_modules"]


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


def already_trained(run: Run) -> bool:
    """Whether models/adapter is this run's own result: its run.json names the run's fingerprint
    and was written by publish_run, after training ended. Training again would only resume past
    the end (the Trainer takes one more step from a final checkpoint)."""
    try:
        record = json.loads((run.adapter / RUN_RECORD).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("run") == run.fp and record.get("complete") is True


def trained_to_the_end(checkpoint: Path | None) -> bool:
    """Whether a checkpoint is the run's last step (then it cannot be resumed: see already_trained)."""
    if checkpoint is None:
        return False
    state = json.loads((checkpoint / "trainer_state.json").read_text("utf-8"))
    return state.get("global_step", 0) >= state.get("max_steps", 0) > 0


def start_over_reason(run: Run, root: Path, fresh: bool) -> str:
    """Why the run's checkpoints must go ("" to resume from them): --fresh, or a run that ended
    but whose adapter has since been replaced (trained again from the start, the same seed gives
    the same adapter)."""
    if fresh:
        return "--fresh"
    if trained_to_the_end(last_complete_checkpoint(run.checkpoints, root)):
        return f"run {run.fp} ended earlier, but {run.adapter.relative_to(root)} is no longer its result"
    return ""


def publish_run(staging: Path, adapter: Path, record: dict[str, Any], log_history: list[dict[str, Any]]) -> str:
    """Add the record of what ran (run.json), the loss history and its plot to the adapter in
    `staging`, then publish it. Returns the loss summary to print ("" without a history)."""
    # "complete": what already_trained() looks for (a record from before had no such key).
    (staging / RUN_RECORD).write_text(json.dumps(record | {"complete": True}, indent=1), "utf-8")
    if log_history:
        (staging / "log_history.json").write_text(json.dumps(log_history, indent=1), "utf-8")
        plot_loss(log_history, staging / "loss.png")
    replace_folder(staging, adapter)
    losses = [h["loss"] for h in log_history if "loss" in h]
    return f"; train loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""


def recover_adapter(adapter: Path, root: Path) -> None:
    """Repair a publish stopped by a kill (see tuner.files)."""
    if recover_folder(adapter):
        print(f"Restored the previous adapter in {adapter.relative_to(root)} (a run was stopped while publishing)")


def fingerprint(settings: dict[str, Any], root: Path, code: list[Path], launch: dict[str, Any] | None = None) -> str:
    """What decides a run's result: the settings, the dataset bytes, the code that trains, the base
    model, and how it is launched (processes, FSDP: another sharding is another optimizer state).
    It names the run's checkpoint folder, so a changed run never resumes a stale one."""
    decided = [settings[k] for k in ("train", "dataset", "prompt")] + ([launch] if launch else [])
    digest = hashlib.sha256(json.dumps(decided, sort_keys=True).encode())
    if settings["dataset"]["source"] != "huggingface":
        digest.update(in_workspace(root, settings["dataset"]["path"]).read_bytes())
    for path in code:
        digest.update(path.read_bytes())
    # Every byte of the base model's files: a rebuild with other weights keeps the config, the
    # safetensors headers and the sizes, so only the weights themselves tell it apart. sha256 reads
    # SmolLM2-135M's 270 MB in about 0.25 s (warm cache, one core): ~15 s for a 7B model, once per
    # run, against hours of training.
    model = in_workspace(root, settings["model"]["path"])
    for path in sorted(p for p in model.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
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
