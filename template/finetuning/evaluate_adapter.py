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

from pathlib import Path

from tuner.settings import WorkspaceError, adapter_dir, run_script, script_parser, settings_for_script, trained_with
from tuner.training.benchmarks import benchmark, task_manager
from tuner.training.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = script_parser(__doc__, ROOT, "dataset.path=dataset/other.jsonl")
    parser.add_argument("--adapter", type=Path, help="default: models/adapter")
    parser.add_argument("--benchmarks", metavar="TASKS", help="lm-eval tasks, comma-separated (e.g. arc_easy,mmlu)")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N questions per benchmark task")
    parser.add_argument("--include-path", type=Path, metavar="DIR", help="a folder of your own lm-eval task YAMLs")
    args = parser.parse_args()
    settings = settings_for_script(args.settings, args.overrides)
    adapter = args.adapter or adapter_dir(ROOT)
    if not (adapter / "adapter_config.json").is_file():
        raise WorkspaceError(f"no adapter in {adapter}: run `python finetuning/invoke_olive.py` first")
    # Score the held-out rows of the run that made the adapter (its split, its --set overrides).
    trained = trained_with(adapter)
    if trained is not None:
        settings = settings | {"train": trained["train"]}
    tasks = [task.strip() for task in (args.benchmarks or "").split(",") if task.strip()]
    if args.limit is not None and args.limit < 1:
        raise WorkspaceError("--limit must be 1 or more")
    try:
        manager = task_manager(tasks, args.include_path) if tasks else None  # checked before the long work
        evaluate(adapter, settings, ROOT)
        if manager:
            benchmark(adapter, settings, ROOT, tasks, args.limit, manager)
    except (OSError, ValueError) as err:  # an unreadable or damaged adapter
        raise WorkspaceError(str(err)) from None


if __name__ == "__main__":
    run_script(main)
