"""tuner/data.py: every dataset kind (CSV, JSON, JSONL, chat messages, a Hugging Face dataset)
trains through the same chat-template pre-processing, and a bad one is refused in one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_py, sample_rows
from tuner.data import encode, load_rows, to_messages, tokenize
from tuner.settings import load_settings

pytestmark = pytest.mark.slow


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")


def short_run(ws: Path, tuned: Path) -> str:
    shutil.copytree(tuned / "model-cache", ws / "model-cache")
    run = run_py(ws, "finetuning/invoke_olive.py", "--set", "train.max_steps=3")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert (ws / "models" / "adapter" / "adapter_config.json").is_file()
    return run.stdout


def copy_render(render_factory, tmp_path: Path, **answers) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform="cpu", mode="local", **answers), ws)
    return ws


def test_csv_columns(render_factory, tuned_workspace: Path, tmp_path: Path) -> None:
    ws = copy_render(render_factory, tmp_path, dataset_source="local", dataset_path="dataset/tones.csv")
    with (ws / "dataset" / "tones.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["phrase", "tone"])
        writer.writeheader()
        writer.writerows(sample_rows())
    assert "on 420 rows" in short_run(ws, tuned_workspace)


def test_json_array_with_two_input_columns(render_factory, tuned_workspace: Path, tmp_path: Path) -> None:
    ws = copy_render(
        render_factory,
        tmp_path,
        dataset_source="local",
        dataset_path="dataset/tones.json",
        input_columns=["phrase", "place"],
        text_template="At {place}: {phrase}",
    )
    places = ["home", "work", "the station"]
    rows = [{**r, "place": places[i % 3]} for i, r in enumerate(sample_rows())]
    dataset = ws / "dataset" / "tones.json"
    # Without the second column, the run is refused before anything loads.
    dataset.write_text(json.dumps([{k: v for k, v in r.items() if k != "place"} for r in rows]), "utf-8")
    run = run_py(ws, "finetuning/invoke_olive.py")
    assert run.returncode == 2 and "row 1: missing column 'place' (columns: phrase, tone)" in run.stderr, run.stderr
    dataset.write_text(json.dumps(rows), "utf-8")
    # Both columns reach what the model trains on: the tokens of each user turn.
    from transformers import AutoTokenizer

    settings = load_settings(ws / "settings.toml")
    assert settings["dataset"]["input_columns"] == ["phrase", "place"]
    tokenizer = AutoTokenizer.from_pretrained(tuned_workspace / "model-cache" / "tiny-random")
    for row, example in zip(rows[:3], tokenize(tokenizer, load_rows(settings, ws)[:3], settings), strict=True):
        assert f"At {row['place']}: {row['phrase']}" in tokenizer.decode(example["input_ids"])
    short_run(ws, tuned_workspace)


def test_chat_messages(render_factory, tuned_workspace: Path, tmp_path: Path) -> None:
    ws = copy_render(
        render_factory, tmp_path, dataset_source="local", dataset_path="dataset/chat.jsonl", dataset_format="chat"
    )
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Tone?"},
                {"role": "assistant", "content": "Say a phrase."},
                {"role": "user", "content": r["phrase"]},
                {"role": "assistant", "content": r["tone"]},
            ]
        }
        for r in sample_rows()
    ]
    write_jsonl(ws / "dataset" / "chat.jsonl", rows)
    short_run(ws, tuned_workspace)
    # Both assistant turns carry the loss; the user turns do not.
    from transformers import AutoTokenizer

    settings = load_settings(ws / "settings.toml")
    tok = AutoTokenizer.from_pretrained(ws / "model-cache" / "tiny-random")
    example = encode(tok, to_messages(load_rows(settings, ws)[0], settings), 256)
    learned = tok.decode([t for t in example["labels"] if t != -100])
    assert "Say a phrase." in learned and rows[0]["messages"][3]["content"] in learned
    assert "Tone?" not in learned and rows[0]["messages"][2]["content"] not in learned


def test_hugging_face_dataset(render_factory, tuned_workspace: Path, tmp_path: Path) -> None:
    ws = copy_render(render_factory, tmp_path, dataset_source="huggingface", dataset_hf_id="someone/tones")
    # The Hub is out of reach in tests: the same datasets.load_dataset call reads a local dataset folder.
    write_jsonl(tmp_path / "hf-tones" / "train.jsonl", sample_rows())
    settings = ws / "settings.toml"
    settings.write_text(settings.read_text().replace('"someone/tones"', json.dumps(str(tmp_path / "hf-tones"))))
    assert "on 420 rows" in short_run(ws, tuned_workspace)
    # An unknown dataset id is one clear line, before any model is loaded.
    settings.write_text(settings.read_text().replace(json.dumps(str(tmp_path / "hf-tones")), '"nobody/nothing"'))
    run = run_py(ws, "finetuning/invoke_olive.py")
    assert run.returncode == 2 and "cannot load Hugging Face dataset 'nobody/nothing'" in run.stderr
    assert run.stderr.count("\n") == 1


def load_in(ws: Path) -> list[dict]:
    return load_rows(load_settings(ws / "settings.toml"), ws)


def test_csv_quoted_fields_keep_their_line_breaks(render_factory, tmp_path: Path) -> None:
    ws = copy_render(render_factory, tmp_path, dataset_source="local", dataset_path="dataset/tones.csv")
    (ws / "dataset" / "tones.csv").write_bytes(b'phrase,tone\r\n"Two lines:\nstill one field",joy\r\nplain,fear\r\n')
    expected = [{"phrase": "Two lines:\nstill one field", "tone": "joy"}, {"phrase": "plain", "tone": "fear"}]
    assert load_in(ws) == expected


def test_jsonl_strings_may_hold_unicode_line_separators(render_factory, tmp_path: Path) -> None:
    ws = copy_render(render_factory, tmp_path, dataset_source="local", dataset_path="dataset/tones.jsonl")
    rows = [{"phrase": "a\u2028b\u0085c\u2029d", "tone": "joy"}, {"phrase": "e", "tone": "fear"}]
    # ensure_ascii=False: the separators are raw characters inside the JSON strings.
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n"
    (ws / "dataset" / "tones.jsonl").write_text(text, "utf-8", newline="")
    assert load_in(ws) == rows


def test_json_array_in_a_jsonl_file_says_what_to_do(render_factory, tmp_path: Path) -> None:
    ws = copy_render(render_factory, tmp_path, dataset_source="local", dataset_path="dataset/tones.jsonl")
    (ws / "dataset" / "tones.jsonl").write_text(json.dumps(sample_rows(), indent=1), "utf-8")
    run = run_py(ws, "finetuning/invoke_olive.py")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "holds one JSON array, not JSON lines: rename it to .json, or write one object per line" in run.stderr
    assert not (ws / "models").exists()


def test_answers_past_max_seq_len_are_refused_before_olive(render_factory, tuned_workspace: Path, tmp_path: Path):
    ws = copy_render(render_factory, tmp_path, dataset_source="local", dataset_path="dataset/long.jsonl")
    shutil.copytree(tuned_workspace / "model-cache", ws / "model-cache")
    long = " ".join(["the weather was fine and we walked along the river"] * 12)
    write_jsonl(ws / "dataset" / "long.jsonl", [{"phrase": f"{long} {i}", "tone": "joy"} for i in range(20)])
    run = run_py(ws, "finetuning/invoke_olive.py")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "every answer starts past max_seq_len 64 tokens (longest example:" in run.stderr
    assert not (ws / "models").exists()
