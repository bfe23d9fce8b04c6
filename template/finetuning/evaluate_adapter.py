"""Score the fine-tuned adapter against the base model on the held-out rows (never trained on).

    python finetuning/evaluate_adapter.py     # invoke_olive.py runs this after every fine-tune

Prints exact match / answer mentioned (column datasets) and answer loss / perplexity, base vs
fine-tuned, with three examples, and writes eval.json beside the adapter (the web page shows
it). Named evaluate_adapter.py, not evaluate.py, so that it never shadows Hugging Face's
`evaluate` package, which Olive imports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuner.data import DatasetError
from tuner.serving.engine import EngineError
from tuner.settings import adapter_dir, settings_for_script, trained_with
from tuner.training.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, default=ROOT / "settings.toml")
    parser.add_argument("--adapter", type=Path, help="default: models/adapter")
    args = parser.parse_args()
    settings = settings_for_script(args.settings)
    adapter = args.adapter or adapter_dir(ROOT)
    if not (adapter / "adapter_config.json").is_file():
        sys.exit(f"error: no adapter in {adapter}: run `python finetuning/invoke_olive.py` first")
    # Score the held-out rows of the run that made the adapter (its split, its --set overrides).
    trained = trained_with(adapter)
    if trained is not None:
        settings = settings | {"train": trained["train"]}
    try:
        evaluate(adapter, settings, ROOT)
    except (OSError, ValueError, DatasetError, EngineError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
