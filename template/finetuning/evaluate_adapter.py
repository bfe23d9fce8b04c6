"""Score the fine-tuned adapter against the base model on the held-out rows (never trained on).

    python finetuning/evaluate_adapter.py     # invoke_olive.py runs this after every fine-tune
    python finetuning/evaluate_adapter.py --benchmarks arc_easy,hellaswag,mmlu --limit 200

Prints exact match / answer mentioned (column datasets) and answer loss / perplexity of the base
model, the base model prompted with the labels and a few training rows, and the fine-tuned model,
with three examples, and writes eval.json beside the adapter (the web page shows it).
--benchmarks adds lm-evaluation-harness tasks, base vs fine-tuned (general ability: did
fine-tuning make the model worse at everything else?); it needs
`pip install -r setup/requirements-benchmarks.txt`, and the Hub for the published tasks' data.
Named evaluate_adapter.py, not evaluate.py, so that it never shadows Hugging Face's `evaluate`
package, which Olive imports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuner.data import DatasetError
from tuner.serving.engine import EngineError
from tuner.settings import SettingsError, adapter_dir, settings_for_script, trained_with
from tuner.training.benchmarks import BenchmarkError, benchmark, task_manager
from tuner.training.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, default=ROOT / "settings.toml")
    parser.add_argument("--adapter", type=Path, help="default: models/adapter")
    parser.add_argument("--benchmarks", metavar="TASKS", help="lm-eval tasks, comma-separated (e.g. arc_easy,mmlu)")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N questions per benchmark task")
    parser.add_argument("--include-path", type=Path, metavar="DIR", help="a folder of your own lm-eval task YAMLs")
    args = parser.parse_args()
    settings = settings_for_script(args.settings)
    adapter = args.adapter or adapter_dir(ROOT)
    if not (adapter / "adapter_config.json").is_file():
        sys.exit(f"error: no adapter in {adapter}: run `python finetuning/invoke_olive.py` first")
    # Score the held-out rows of the run that made the adapter (its split, its --set overrides).
    trained = trained_with(adapter)
    if trained is not None:
        settings = settings | {"train": trained["train"]}
    tasks = [task.strip() for task in (args.benchmarks or "").split(",") if task.strip()]
    if args.limit is not None and args.limit < 1:
        sys.exit("error: --limit must be 1 or more")
    try:
        manager = task_manager(tasks, args.include_path) if tasks else None  # checked before the long work
        evaluate(adapter, settings, ROOT)
        if manager:
            benchmark(adapter, settings, ROOT, tasks, args.limit, manager)
    except (OSError, ValueError, DatasetError, EngineError, SettingsError, BenchmarkError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
