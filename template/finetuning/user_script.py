"""Olive user script: the workspace's dataset and prompt format, registered with Olive.

Olive's built-in text pre-processing joins text columns without a chat template and puts the
loss on every token. These two components keep Olive in charge of training while the data goes
through the model's own chat template with the loss on the assistant turns only (tuner.data).
invoke_olive.py puts the settings file's path into the Olive config it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from olive.data.registry import Registry

from tuner.data import check_rows, load_rows, split_rows, tokenize
from tuner.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


@Registry.register_dataset()
def workspace_dataset(
    split: str, eval_split: float, data_seed: int, settings_path: str, trust_remote_code: bool | None = None
) -> list[dict[str, Any]]:
    """The rows of one split ("train" or "eval") of the dataset named in the settings."""
    settings = load_settings(Path(settings_path))
    rows = load_rows(settings, ROOT)
    check_rows(rows, settings)
    train, evaluation = split_rows(rows, eval_split, data_seed)
    return train if split == "train" else evaluation


@Registry.register_pre_process()
def workspace_chat_pre_process(
    dataset: list[dict[str, Any]],
    model_name: str,
    max_seq_len: int,
    settings_path: str,
    pad_to_max_len: bool = False,
    packing: str = "none",
    task: str | None = None,
    trust_remote_code: bool | None = None,
) -> Any:
    """Rows -> input_ids, attention_mask and labels (-100 outside the assistant turns)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=bool(trust_remote_code))
    settings = load_settings(Path(settings_path))
    return Dataset.from_list(tokenize(tokenizer, dataset, max_seq_len, pad_to_max_len, packing, settings=settings))
