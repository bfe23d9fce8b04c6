"""Fine-tune SmolLM2-135M (LoRA, then QLoRA), export it to every format, and print per format the
held-out exact match (answered through the runtime that serves it), the size and the export time.

    python bench/export_formats.py                                  # both methods, catalog defaults
    python bench/export_formats.py --methods lora --set train.num_train_epochs=1
    python bench/export_formats.py --workspace demo --keep-adapter    # the adapter already there

Renders a workspace (SmolLM2-135M-Instruct on CPU, the sample dataset) unless --workspace names
one, gets the model (the offline copy when the Hub is unreachable), then for each method runs the
workspace's own `finetuning/invoke_olive.py --fresh` (fine-tune, then the held-out evaluation) and
`inference/export.py --format F` for every format. The figures are the ones each export's check
wrote into the adapter's eval.json. An export refused by its check (it lost more than its
threshold) is printed with its figure from the error line and "refused". GGUF needs llama-cpp-python
(setup/requirements-gguf.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (export.py arguments, the name its check records in eval.json, the folder it writes)
EXPORTS = [
    (["--format", "adapter"], "adapter", "models/exports/adapter"),
    (["--format", "merged"], "merged", "models/exports/merged"),
    (["--format", "gguf", "--quantize", "f16"], "gguf-f16", "models/exports/gguf-f16"),
    (["--format", "gguf", "--quantize", "q8_0"], "gguf-q8_0", "models/exports/gguf-q8_0"),
    (["--format", "gguf", "--quantize", "q4_k_m"], "gguf-q4_k_m", "models/exports/gguf-q4_k_m"),
    (["--format", "onnx", "--precision", "fp32", "--skip-merged"], "onnx-fp32", "models/onnx/fp32"),
    (["--format", "onnx", "--precision", "int4", "--skip-merged"], "onnx-int4", "models/onnx/int4"),
]


def size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lora,qlora", help="comma-separated: lora, qlora")
    parser.add_argument(
        "--set", action="append", default=[], metavar="train.KEY=VALUE", help="passed to invoke_olive.py --set"
    )
    parser.add_argument("--workspace", type=Path, help="reuse this rendered workspace (default: a temporary one)")
    parser.add_argument(
        "--keep-adapter", action="store_true", help="export the workspace's evaluated adapter instead of fine-tuning"
    )
    args = parser.parse_args()
    overrides = [arg for item in args.set for arg in ("--set", item)]

    ws = args.workspace or Path(tempfile.mkdtemp(prefix="export-formats-")) / "ws"
    if not (ws / "settings.toml").is_file():
        from copier import run_copy

        data = {"project_name": "bench", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "platform": "cpu"}
        run_copy(str(REPO), str(ws), data=data, defaults=True, quiet=True, vcs_ref="HEAD")
    # PYTHONPATH: the workspace's package (tuner/), which its setup would install.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OLIVE_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ws)}
    subprocess.run([sys.executable, "setup/download_model.py"], cwd=ws, env=env, check=True, capture_output=True)
    print(f"workspace {ws}; overrides {overrides}", flush=True)

    for method in ["as trained"] if args.keep_adapter else args.methods.split(","):
        start = time.perf_counter()
        if not args.keep_adapter:
            command = [sys.executable, "finetuning/invoke_olive.py", "--fresh", "--set", f"train.method={method}"]
            run = subprocess.run([*command, *overrides], cwd=ws, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"{method}: fine-tuning failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
            print(f"\n{method}: fine-tuned and evaluated in {time.perf_counter() - start:.0f} s", flush=True)
        else:
            trained = json.loads((ws / "models/adapter/run.json").read_text("utf-8"))["settings"]["train"]
            print(f"\nthe adapter in place: {trained['method']}, {trained['num_train_epochs']} epochs", flush=True)
        print(f"{'export':<12} {'exact match':>11} {'adapter':>8} {'size MiB':>9} {'time s':>7}", flush=True)
        for export_args, name, folder in EXPORTS:
            start = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "inference/export.py", *export_args], cwd=ws, env=env, capture_output=True, text=True
            )
            took = time.perf_counter() - start
            report = json.loads((ws / "models/adapter/eval.json").read_text("utf-8"))
            tuned = report["tuned"]["exact_match"]
            if run.returncode != 0:
                error = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"{name:<12} {'refused' if 'not kept' in error else 'failed':>11} {tuned:>8.1%}   {error}")
                continue
            figures = report["exports"][name]
            print(
                f"{name:<12} {figures['exact_match']:>11.1%} {tuned:>8.1%} {size_mib(ws / folder):>9.1f} {took:>7.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
