"""Fine-tune the base model with Olive's (Q)LoRA pass and write the adapter.

    python finetuning/invoke_olive.py                                # settings.toml [train]
    python finetuning/invoke_olive.py --set train.learning_rate=3e-4 # change a setting for one run
    python finetuning/invoke_olive.py --cpu-lora # a QLoRA workspace on a CPU: LoRA in float32, faster
    python finetuning/invoke_olive.py --no-eval  # skip the held-out evaluation at the end

Everything comes from settings.toml (--settings picks another file). The Olive config is built
from [train] for each run (tuner.training.olive) and written beside the adapter with the settings that
ran. A run that is interrupted resumes from its last checkpoint when started again; a run
whose settings, data or code changed starts afresh (its checkpoints and Olive cache are keyed
by a fingerprint of all of those). With [train] report_to = "tensorboard", watch the loss with
`tensorboard --logdir models/runs`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import tuner.data
import tuner.training.olive
from tuner.settings import RUNS, Interrupted, in_workspace, run_script, script_parser, settings_for_script
from tuner.training.evaluation import evaluate
from tuner.training.olive import olive_config, write_run_settings
from tuner.training.precision import trainable_4bit
from tuner.training.runs import (
    Run,
    RunError,
    already_trained,
    last_complete_checkpoint,
    publish_run,
    start_over_reason,
    start_run,
)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = script_parser(__doc__, ROOT, "train.num_train_epochs=2")
    parser.add_argument("--cpu-lora", action="store_true", help="train as LoRA in float32 (the fast choice on a CPU)")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier checkpoints and start over")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation, base vs fine-tuned")
    args = parser.parse_args()
    if args.cpu_lora:
        args.overrides += ["train.method=lora", "train.compute_dtype=float32"]
    settings = settings_for_script(args.settings, args.overrides)

    # 1. Check everything cheap before loading anything heavy or writing anything; then take the
    # workspace's lock (one run at a time). The run's checkpoints, cache and logs are keyed by its
    # fingerprint. A bad dataset is exit code 2, anything else 1 (run_script).
    code = [Path(tuner.data.__file__), Path(tuner.training.olive.__file__), ROOT / "finetuning" / "user_script.py"]
    run = start_run(settings, ROOT, code)
    if not args.fresh and already_trained(run):
        print(f"already trained (run {run.fp}): {run.adapter.relative_to(ROOT)} is its result; --fresh to train again")
        return
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and newer; ignored before
    config = olive_config(settings, ROOT, run.fp, run.precision)
    staging = Path(config["output_dir"])
    reason = start_over_reason(run, ROOT, args.fresh)
    if reason:
        if not args.fresh:
            print(f"{reason}: training it again from the start", flush=True)
        shutil.rmtree(run.checkpoints, ignore_errors=True)
        shutil.rmtree(config["cache_dir"], ignore_errors=True)  # else Olive may hand back its cached result
    write_run_settings(settings, ROOT, run.fp)

    os.environ["OLIVE_DISABLE_TELEMETRY"] = "1"
    if settings["model"]["threads"]:  # 1 for tiny matrices: threads cost more than they save
        torch.set_num_threads(settings["model"]["threads"])
    last = last_complete_checkpoint(run.checkpoints, ROOT)
    if last:
        print(f"Resuming from {last.name} in {run.checkpoints.relative_to(ROOT)}", flush=True)
        config["passes"]["finetune"]["training_args"]["resume_from_checkpoint"] = str(last)
    else:
        print(f"Fine-tuning {settings['model']['id']} on {len(run.rows)} rows (run {run.fp})", flush=True)

    # 2. Train, showing one progress bar; Olive's log goes to a file.
    from olive.workflows import run as olive_run

    from tuner.training.progress import logs_to, trainer_progress  # imports transformers: after the checks

    olive_log = in_workspace(ROOT, RUNS) / run.fp / "olive.log"
    print(f"Olive's log: {olive_log.relative_to(ROOT)}", flush=True)

    # Olive creates the LoRA weights before the Trainer seeds itself: seed first with the
    # training seed, so the same answers give the same adapter (data_seed only splits/shuffles).
    torch.manual_seed(settings["train"]["seed"])
    try:
        with logs_to(olive_log), trainer_progress(), trainable_4bit(run.precision):
            olive_run(copy.deepcopy(config))  # Olive rewrites the dict it is given
        summary = publish_olive_output(run, config, staging)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: run the same command again to resume from the last checkpoint") from None
    finally:
        # Olive's output folder and the unpublished copy, whatever happened: a failed run leaves
        # only its checkpoints (models/checkpoints), which the next run resumes from.
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(run.staging, ignore_errors=True)
    print(f"Adapter written to {run.adapter.relative_to(ROOT)}{summary}", flush=True)

    # 4. Score base vs fine-tuned on the rows held out of training (writes adapter/eval.json).
    if not args.no_eval:
        evaluate(run.adapter, settings, ROOT)


def publish_olive_output(run: Run, config: dict[str, Any], staging: Path) -> str:
    """3. Publish the adapter Olive wrote, with the record of what ran: a half-written adapter never
    looks finished. Returns the loss summary."""
    found = sorted(staging.rglob("adapter_config.json"))
    if not found:
        raise RunError(f"Olive finished but wrote no adapter under {staging}; see the log above")
    shutil.rmtree(run.staging, ignore_errors=True)  # left by a run killed while copying
    shutil.copytree(found[-1].parent, run.staging)
    (run.staging / "olive-config.json").write_text(json.dumps(config, indent=1), "utf-8")
    last = last_complete_checkpoint(run.checkpoints, ROOT)
    log_history = json.loads((last / "trainer_state.json").read_text("utf-8"))["log_history"] if last else []
    return publish_run(run.staging, run.adapter, {"run": run.fp, "settings": run.settings}, log_history)


if __name__ == "__main__":
    run_script(main)
