"""The dataset and the one prompt format, shared by fine-tuning (through Olive) and inference.

Rows become chat messages: for a column dataset, the system message from settings.toml, a
user turn (the input columns put into `[prompt] text_template`) and an assistant turn (the
target column); a chat dataset brings its own messages. Both are turned into tokens by the
model's own chat template, so training and chat can never disagree on the prompt.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from pathlib import Path
from typing import Any

from tuner.settings import SettingsError, WorkspaceError, in_workspace

IGNORE_INDEX = -100  # label value the loss skips
ROLES = {"system", "user", "assistant"}


class DatasetError(WorkspaceError):
    """A problem with the dataset, explained in one line."""

    exit_code = 2  # a bad dataset: the one failure a caller may want to tell apart


def _read_local(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DatasetError(f"{path}: line {line}: not UTF-8 text (byte {raw[err.start]:#x})") from None
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # The csv module over the whole text: quoted fields keep their line breaks.
        return list(csv.DictReader(io.StringIO(text, newline="")))
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
    elif text.lstrip().startswith("["):
        raise DatasetError(
            f"{path}: holds one JSON array, not JSON lines: rename it to .json, or write one object per line"
        )
    else:  # JSON lines (.jsonl, or .json with one object per line as the peer writes it)
        rows = []
        # Split on "\n" only: JSON strings may hold other line separators (U+2028, U+0085, ...).
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}: line {number}: invalid JSON ({err.msg})") from None
            if not isinstance(rows[-1], dict):
                raise DatasetError(f"{path}: line {number}: expected a JSON object")
    if not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{path}: expected a list of JSON objects")
    return rows


def load_rows(settings: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Read the dataset named in the settings (a relative path is in the workspace `root`)."""
    ds = settings["dataset"]
    if ds["source"] == "huggingface":
        from datasets import load_dataset

        try:
            return list(load_dataset(ds["hf_id"], split=ds["split"]))
        except Exception as err:  # the datasets library raises many types; one line is enough
            raise DatasetError(f"cannot load Hugging Face dataset {ds['hf_id']!r}: {err}") from None
    return _read_local(in_workspace(root, ds["path"]))


def to_messages(row: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, str]]:
    """One row as chat messages, in the workspace's one prompt format."""
    ds, prompt = settings["dataset"], settings["prompt"]
    if ds["format"] == "chat":
        messages = list(row[ds["messages_column"]])
        if prompt["system"] and messages and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": prompt["system"]})
        return messages
    user = prompt["text_template"]
    for column in ds["input_columns"]:
        user = user.replace("{" + column + "}", str(row[column]))
    return system_messages(settings) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": str(row[ds["target_column"]])},
    ]


def system_messages(settings: dict[str, Any]) -> list[dict[str, str]]:
    system = settings["prompt"]["system"]
    return [{"role": "system", "content": system}] if system else []


def user_message(text: str, settings: dict[str, Any]) -> str:
    """What a chat user types, put into the training template (which has one input column)."""
    columns = settings["dataset"]["input_columns"]
    if settings["dataset"]["format"] == "chat" or len(columns) != 1:
        return text
    return settings["prompt"]["text_template"].replace("{" + columns[0] + "}", text)


def check_prompt(settings: dict[str, Any]) -> None:
    """SettingsError for a column dataset's text_template that names something other than an
    input column, or none of them: to_messages() would put the placeholder's own text, the same
    for every row, where the row's value belongs."""
    ds = settings["dataset"]
    if ds["format"] == "chat":
        return
    template, columns = settings["prompt"]["text_template"], ds["input_columns"]
    # Only {word} is a placeholder: other braces (JSON in the prompt) are the prompt's own text.
    unknown = [name for name in re.findall(r"\{(\w+)\}", template) if name not in columns]
    if unknown or not any("{" + c + "}" in template for c in columns):
        placeholder = "{" + unknown[0] + "}" if unknown else ""
        named = f"names {placeholder}, which is not an input column" if unknown else "names no input column"
        raise SettingsError(
            f"[prompt] text_template {named}: write the input columns as {', '.join('{' + c + '}' for c in columns)}"
        )


def check_rows(rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """Refuse, in one line, a dataset that cannot be trained on."""
    ds = settings["dataset"]
    if not rows:
        raise DatasetError("the dataset has no rows")
    needed = [ds["messages_column"]] if ds["format"] == "chat" else [*ds["input_columns"], ds["target_column"]]
    for number, row in enumerate(rows, start=1):
        missing = [c for c in needed if c not in row]
        if missing:
            raise DatasetError(f"row {number}: missing column {missing[0]!r} (columns: {', '.join(row)})")
        if ds["format"] == "chat":
            messages = row[ds["messages_column"]]
            if not isinstance(messages, list) or not messages:
                raise DatasetError(f"row {number}: {ds['messages_column']!r} must be a non-empty list of messages")
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise DatasetError(f"row {number}: each message needs a role in {sorted(ROLES)} and a text content")
            if not any(m["role"] == "assistant" for m in messages):
                raise DatasetError(f"row {number}: no assistant message to learn from")
        elif any(row[c] is None or str(row[c]).strip() == "" for c in needed):
            raise DatasetError(f"row {number}: empty value in one of the columns {needed}")


def split_rows(
    rows: list[dict[str, Any]], eval_split: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded, reproducible train/eval split."""
    n_eval = round(len(rows) * eval_split)
    if eval_split > 0 and (n_eval < 1 or len(rows) - n_eval < 1):
        raise DatasetError(
            f"{len(rows)} rows are too few for eval_split {eval_split}: need at least one row in each split"
        )
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[n_eval:], shuffled[:n_eval]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode(tokenizer: Any, messages: list[dict[str, str]], max_seq_len: int) -> dict[str, list[int]]:
    """Tokens of a conversation with labels on the assistant turns only (loss only there).

    Each assistant turn is found as the tokens between the conversation up to it (with the
    generation prompt) and the conversation including it, so this works for any chat template.
    """

    def ids(msgs: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(messages, False)
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _common_prefix(ids(messages[:i], True), full)
        end = _common_prefix(ids(messages[: i + 1], False), full)
        labels[start:end] = full[start:end]
    full, labels = full[:max_seq_len], labels[:max_seq_len]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def check_lengths(
    tokenizer: Any, rows: list[dict[str, Any]], max_seq_len: int, settings: dict[str, Any], split: str = "train"
) -> str:
    """Refuse, before any training, a split whose answers all fall past max_seq_len (tokenize()
    would have no example left); return a warning (or "") when most answers are cut short.
    Checks at most 2000 rows (a seeded sample)."""
    sample = rows if len(rows) <= 2000 else random.Random(0).sample(rows, 2000)
    kept = cut = 0
    longest = 0
    for row in sample:
        example = encode(tokenizer, to_messages(row, settings), 1_000_000)
        longest = max(longest, len(example["input_ids"]))
        answer_at = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
        kept += bool(answer_at) and answer_at[0] < max_seq_len
        cut += bool(answer_at) and answer_at[-1] >= max_seq_len
    if kept == 0:
        raise DatasetError(
            f"every answer starts past max_seq_len {max_seq_len} tokens (longest example: {longest}) "
            f"in the {split} split: "
            "raise max_seq_len or shorten the inputs"
        )
    if cut > len(sample) / 2:
        return (
            f"warning: {cut} of {len(sample)} answers are cut short by max_seq_len {max_seq_len} "
            f"(longest example: {longest} tokens)"
        )
    return ""


def tokenize(tokenizer: Any, rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, list[int]]]:
    """Rows -> training examples, one per sequence ([train] max_seq_len, pad_to_max_len).

    No packing: joining examples into one sequence lets each attend to the ones before it
    unless the attention kernel is told where they start, which only flash-attention does."""
    max_seq_len = settings["train"]["max_seq_len"]
    examples = [encode(tokenizer, to_messages(row, settings), max_seq_len) for row in rows]
    # An example whose answer was cut off entirely by max_seq_len teaches nothing.
    examples = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    if not examples:
        raise DatasetError(f"no example keeps any answer tokens within max_seq_len {max_seq_len}")
    if settings["train"]["pad_to_max_len"]:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for e in examples:
            missing = max_seq_len - len(e["input_ids"])
            e["input_ids"] = e["input_ids"] + [pad_id] * missing
            e["attention_mask"] = e["attention_mask"] + [0] * missing
            e["labels"] = e["labels"] + [IGNORE_INDEX] * missing
    return examples
