"""Score the fine-tuned adapter against the base model on the held-out rows (never trained on).

    python finetuning/evaluate_adapter.py     # invoke_olive.py runs this after every fine-tune

Prints exact match / answer mentioned (column datasets) and answer loss / perplexity, base vs
fine-tuned, with three examples, and writes eval.json beside the adapter (the web page shows
it). Named evaluate_adapter.py, not evaluate.py, so that it never shadows Hugging Face's
`evaluate` package, which Olive imports.
"""

from __future__ import annotations

from pathlib import Path

from tuner.settings import WorkspaceError, adapter_dir, run_script, script_parser, settings_for_script, trained_with
from tuner.training.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = script_parser(__doc__, ROOT, "dataset.path=dataset/other.jsonl")
    parser.add_argument("--adapter", type=Path, help="default: models/adapter")
    args = parser.parse_args()
    settings = settings_for_script(args.settings, args.overrides)
    adapter = args.adapter or adapter_dir(ROOT)
    if not (adapter / "adapter_config.json").is_file():
        raise WorkspaceError(f"no adapter in {adapter}: run `python finetuning/invoke_olive.py` first")
    # Score the held-out rows of the run that made the adapter (its split, its --set overrides).
    trained = trained_with(adapter)
    if trained is not None:
        settings = settings | {"train": trained["train"]}
    try:
        evaluate(adapter, settings, ROOT)
    except (OSError, ValueError) as err:  # an unreadable or damaged adapter
        raise WorkspaceError(str(err)) from None


if __name__ == "__main__":
    run_script(main)
