"""The dataset named in settings.toml: every row is an object with the configured columns."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def workspace_path(value: str) -> Path:
    """A path from settings.toml: relative to the workspace root unless absolute."""
    path = Path(value)
    return path if path.is_absolute() else ROOT / path


ROLES = {"system", "user", "assistant"}


def read_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, row) pairs from a CSV, a JSON array, or JSON lines file."""
    text = path.read_text("utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        return [(reader.line_num, row) for row in reader]
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            return [(0, row) for row in json.loads(text)]
        except json.JSONDecodeError as err:
            pytest.fail(f"{path}: line {err.lineno}: invalid JSON ({err.msg})")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            pytest.fail(f"{path}: line {number}: invalid JSON ({err.msg})")
    return rows


@pytest.fixture(scope="module")
def rows(settings: dict[str, Any]) -> list[tuple[int, Any]]:
    ds = settings["dataset"]
    if ds["source"] == "huggingface":
        pytest.skip(f"the dataset is on the Hugging Face Hub ({ds['hf_id']}); fine-tuning checks it when it loads")
    path = workspace_path(ds["path"])
    if not path.is_file():
        pytest.fail(f"the dataset file {ds['path']} named in settings.toml does not exist")
    return read_rows(path)


def test_dataset_not_empty(rows: list[tuple[int, Any]]) -> None:
    assert rows, "the dataset has no rows"


def test_rows_have_columns(settings: dict[str, Any], rows: list[tuple[int, Any]]) -> None:
    ds = settings["dataset"]
    problems = []
    for number, row in rows:
        where = f"line {number}" if number else "an item"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object, got {type(row).__name__}")
        elif ds["format"] == "columns":
            for column in [*ds["input_columns"], ds["target_column"]]:
                value = row.get(column)
                if not isinstance(value, str | int | float) or isinstance(value, bool) or str(value) == "":
                    problems.append(f"{where}: column {column!r} is missing or empty")
        else:
            messages = row.get(ds["messages_column"])
            if not isinstance(messages, list) or not messages:
                problems.append(f"{where}: column {ds['messages_column']!r} is not a list of messages")
                continue
            for message in messages:
                if not (
                    isinstance(message, dict)
                    and message.get("role") in ROLES
                    and isinstance(message.get("content"), str)
                ):
                    problems.append(f"{where}: {message!r} is not a message with a role and a content")
                    break
            else:
                if not any(m["role"] == "assistant" for m in messages):
                    problems.append(f"{where}: no assistant message to learn from")
    assert not problems, f"{len(problems)} problem(s) in the dataset:\n" + "\n".join(problems[:20])
