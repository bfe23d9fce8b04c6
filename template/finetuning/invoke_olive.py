"""Fine-tune the base model with Olive's (Q)LoRA pass and write the adapter.

    python finetuning/invoke_olive.py                                # settings.toml [train]
    python finetuning/invoke_olive.py --set train.learning_rate=3e-4 # change a setting for one run
    python finetuning/invoke_olive.py --cpu-lora # a QLoRA workspace on a machine without CUDA
    python finetuning/invoke_olive.py --no-eval  # skip the held-out evaluation at the end

Everything comes from settings.toml (--settings picks another file). The Olive config is built
from [train] for each run (tuner.olive) and written beside the adapter with the settings that
ran. A run that is interrupted resumes from its last checkpoint when started again; a run
whose settings, data or code changed starts afresh (its checkpoints and Olive cache are keyed
by a fingerprint of all of those). With [train] report_to = "tensorboard", watch the loss with
`tensorboard --logdir models/runs`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import tuner.data
import tuner.olive
from tuner.data import DatasetError
from tuner.evaluation import evaluate
from tuner.olive import olive_config, write_run_settings
from tuner.runs import (
    RunError,
    check_run,
    fingerprint,
    last_complete_checkpoint,
    publish_run,
    recover_adapter,
    take_lock,
)
from tuner.settings import (
    MODELS,
    RUNS,
    SettingsError,
    adapter_dir,
    add_settings_arguments,
    in_workspace,
    settings_for_script,
)

ROOT = Path(__file__).resolve().parents[1]


def fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def preflight_qlora() -> None:
    """QLoRA loads the base model in 4-bit with bitsandbytes, which needs an NVIDIA GPU."""
    fix = "or fine-tune with plain LoRA instead: python finetuning/invoke_olive.py --cpu-lora"
    if importlib.util.find_spec("bitsandbytes") is None:
        fail(f"QLoRA needs bitsandbytes: pip install bitsandbytes (setup/requirements-cuda.txt has it), {fix}")
    import torch

    if not torch.cuda.is_available():
        fail(f"QLoRA needs a CUDA GPU and torch sees none (torch {torch.__version__}), {fix}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_arguments(parser, ROOT, "train.num_train_epochs=2")
    parser.add_argument("--cpu-lora", action="store_true", help="a QLoRA workspace trains as LoRA in float32")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier checkpoints and start over")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation, base vs fine-tuned")
    args = parser.parse_args()
    if args.cpu_lora:
        args.overrides += ["train.method=lora", "train.compute_dtype=float32"]
    settings = settings_for_script(args.settings, args.overrides)
    train = settings["train"]

    # 1. Check everything cheap before loading anything heavy or writing anything.
    try:
        rows, warning = check_run(settings, ROOT)
    except (SettingsError, RunError) as err:
        fail(str(err))
    except DatasetError as err:
        fail(str(err), code=2)
    if warning:
        print(warning, file=sys.stderr)
    if train["method"] == "qlora":
        preflight_qlora()
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and newer; ignored before
        if train["compute_dtype"] == "bfloat16" and not torch.cuda.is_bf16_supported():
            # T4 and V100 (the small remote profile) have no bfloat16: train in float16 instead.
            print("This GPU has no bfloat16: training in float16 ([train] compute_dtype)", file=sys.stderr)
            train["compute_dtype"] = "float16"

    # 2. One run at a time per workspace. The run's checkpoints, cache and logs are keyed by
    # its fingerprint.
    try:
        take_lock(ROOT / MODELS / ".finetune.lock")
    except RunError as err:
        fail(str(err))
    adapter = adapter_dir(ROOT)
    recover_adapter(adapter, ROOT)
    code = [Path(tuner.data.__file__), Path(tuner.olive.__file__), ROOT / "finetuning" / "user_script.py"]
    fp = fingerprint(settings, ROOT, code)
    config = olive_config(settings, ROOT, fp)
    checkpoints = Path(config["passes"]["finetune"]["training_args"]["output_dir"])
    staging = Path(config["output_dir"])
    if args.fresh:
        shutil.rmtree(checkpoints, ignore_errors=True)
        shutil.rmtree(config["cache_dir"], ignore_errors=True)
    write_run_settings(settings, ROOT, fp)

    os.environ["OLIVE_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(in_workspace(ROOT, RUNS) / fp))
    if settings["model"]["id"] == "tiny-random":
        torch.set_num_threads(1)  # tiny matrices: threads cost more than they save
    last = last_complete_checkpoint(checkpoints, ROOT)
    if last:
        print(f"Resuming from {last.name} in {checkpoints.relative_to(ROOT)}", flush=True)
        config["passes"]["finetune"]["training_args"]["resume_from_checkpoint"] = str(last)
    else:
        print(f"Fine-tuning {settings['model']['id']} on {len(rows)} rows (run {fp})", flush=True)

    # 3. Train. Olive prints progress and the loss as it goes.
    from olive.workflows import run as olive_run

    # Olive creates the LoRA weights before the Trainer seeds itself: seed first with the
    # training seed, so the same answers give the same adapter (data_seed only splits/shuffles).
    torch.manual_seed(train["seed"])
    try:
        olive_run(copy.deepcopy(config))  # Olive rewrites the dict it is given
    except KeyboardInterrupt:
        fail("interrupted: run the same command again to resume from the last checkpoint", code=130)

    # 4. Publish the adapter, with the record of what ran: a half-written adapter never looks
    # finished.
    found = sorted(staging.rglob("adapter_config.json"))
    if not found:
        fail(f"Olive finished but wrote no adapter under {staging}; see the log above")
    tmp = adapter.with_name(adapter.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(found[-1].parent, tmp)
    (tmp / "olive-config.json").write_text(json.dumps(config, indent=1), "utf-8")
    last = last_complete_checkpoint(checkpoints, ROOT)
    log_history = json.loads((last / "trainer_state.json").read_text("utf-8"))["log_history"] if last else []
    summary = publish_run(tmp, adapter, {"run": fp, "settings": settings}, log_history)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"Adapter written to {adapter.relative_to(ROOT)}{summary}", flush=True)

    # 5. Score base vs fine-tuned on the rows held out of training (writes adapter/eval.json).
    if not args.no_eval:
        evaluate(adapter, settings, ROOT)


if __name__ == "__main__":
    main()
