"""Olive user script: the workspace's dataset and prompt format, registered with Olive.

Olive's built-in text pre-processing joins text columns without a chat template and puts the
loss on every token. These two components keep Olive in charge of training while the data goes
through the model's own chat template with the loss on the assistant turns only (tuner.data).
invoke_olive.py writes the run's settings to a file (tuner.training.olive) for them to read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from olive.data.registry import Registry

from tuner.data import check_rows, load_rows, split_rows, tokenize

ROOT = Path(__file__).resolve().parents[1]


@Registry.register_dataset()
def workspace_dataset(split: str, settings_file: str, trust_remote_code: bool | None = None) -> list[dict[str, Any]]:
    """The rows of one split ("train" or "eval") of the dataset named in the settings."""
    settings = json.loads(Path(settings_file).read_text("utf-8"))
    rows = load_rows(settings, ROOT)
    check_rows(rows, settings)
    train, evaluation = split_rows(rows, settings["train"]["eval_split"], settings["train"]["data_seed"])
    return train if split == "train" else evaluation


@Registry.register_pre_process()
def workspace_chat_pre_process(
    dataset: list[dict[str, Any]],
    model_name: str,
    settings_file: str,
    task: str | None = None,
    trust_remote_code: bool | None = None,
) -> Any:
    """Rows -> input_ids, attention_mask and labels (-100 outside the assistant turns)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=bool(trust_remote_code))
    settings = json.loads(Path(settings_file).read_text("utf-8"))
    return Dataset.from_list(tokenize(tokenizer, dataset, settings))
