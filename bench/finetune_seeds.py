"""Fine-tune the default CPU model over several seeds and report held-out accuracy and time.

    python bench/finetune_seeds.py                       # 5 seeds, the catalog's defaults
    python bench/finetune_seeds.py --seeds 3 --set train.learning_rate=0.001 --set train.num_train_epochs=2

Renders a workspace (SmolLM2-135M-Instruct on CPU, the sample dataset), gets the model (offline
copy when the Hub is unreachable), then for each seed i runs the workspace's own
`finetuning/invoke_olive.py --fresh` with seed = data_seed = i: a new LoRA initialisation, a new
shuffle and a new held-out split every time. Reads the adapter's eval.json and prints per-seed
held-out exact match (base, base prompted, tuned), then mean and min. --set is passed on to invoke_olive.py
(a [train] setting; the defaults in includes/models.yml were chosen with this bench).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed+seeds-1")
    parser.add_argument(
        "--set", action="append", default=[], metavar="train.KEY=VALUE", help="passed to invoke_olive.py --set"
    )
    parser.add_argument("--workspace", type=Path, help="reuse this rendered workspace (default: a temporary one)")
    args = parser.parse_args()
    overrides = [arg for item in args.set for arg in ("--set", item)]

    ws = args.workspace or Path(tempfile.mkdtemp(prefix="finetune-seeds-")) / "ws"
    if not (ws / "settings.toml").is_file():
        from copier import run_copy

        data = {"project_name": "bench", "model": args.model, "platform": "cpu"}
        run_copy(str(REPO), str(ws), data=data, defaults=True, quiet=True, vcs_ref="HEAD")
    # PYTHONPATH: the workspace's package (tuner/), which its setup would install.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OLIVE_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ws)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "setup/download_model.py"], cwd=ws, env=env, check=True)
    print(f"model ready in {time.perf_counter() - start:.0f} s; workspace {ws}; overrides {overrides}", flush=True)

    results = []
    header = f"{'seed':>4} {'base EM':>8} {'prompted EM':>12} {'tuned EM':>9} {'mentioned':>10} {'train s':>8}"
    print(f"{header} {'total s':>8}", flush=True)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        seeds = ["--set", f"train.seed={seed}", "--set", f"train.data_seed={seed}"]
        start = time.perf_counter()
        command = [sys.executable, "finetuning/invoke_olive.py", "--fresh", *seeds, *overrides]
        run = subprocess.run(command, cwd=ws, env=env, capture_output=True, text=True)
        total = time.perf_counter() - start
        if run.returncode != 0:
            sys.exit(f"seed {seed} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        # Olive's log, with the pass's time, is in the run's folder (the newest olive.log).
        logs = sorted((ws / "models" / "runs").glob("*/olive.log"), key=lambda p: p.stat().st_mtime)
        olive_log = logs[-1].read_text("utf-8", "replace") if logs else ""
        # The last one: a run folder's log is appended to when the same run is trained again (--fresh).
        found = re.findall(r"Pass finetune:\S+ finished in ([\d.]+) seconds", run.stdout + run.stderr + olive_log)
        train = float(found[-1]) if found else float("nan")
        report = json.loads((ws / "models" / "adapter" / "eval.json").read_text("utf-8"))
        base, tuned = report["base"], report["tuned"]
        prompted = report.get("prompted", {}).get("exact_match", float("nan"))
        results.append((tuned["exact_match"], train))
        print(
            f"{seed:>4} {base['exact_match']:>8.1%} {prompted:>12.1%} {tuned['exact_match']:>9.1%}"
            f" {tuned['mentioned']:>10.1%} {train:>8.0f} {total:>8.0f}",
            flush=True,
        )
    accuracies = [a for a, _ in results]
    print(
        f"held-out exact match over {len(results)} seeds ({report['held_out_rows']} rows each): "
        f"mean {sum(accuracies) / len(accuracies):.1%}, min {min(accuracies):.1%}; "
        f"fine-tuning {min(t for _, t in results):.0f}-{max(t for _, t in results):.0f} s per run"
    )


if __name__ == "__main__":
    main()
