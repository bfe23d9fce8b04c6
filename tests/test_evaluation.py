"""tuner/training/evaluation.py: how an answer is scored, what the prompted base is shown (training
rows only, reproducibly), and the report it prints; the prompted base on a real model
(SmolLM2-135M). The whole evaluation, base vs fine-tuned, is tests/test_finetune.py's."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_py
from tuner.data import load_rows, split_rows
from tuner.settings import SettingsError, check_value, load_settings
from tuner.training.evaluation import few_shot, print_report, prompted, score

SETTINGS = {
    "dataset": {"format": "columns", "input_columns": ["phrase"], "target_column": "tone"},
    "prompt": {"system": "Classify the tone.", "text_template": "Phrase: {phrase}"},
    "train": {"data_seed": 7},
    "eval": {"prompt_examples": 6},  # the default
}


@pytest.mark.parametrize(
    ("answer", "expected", "exact", "mentioned"),
    [
        ("joy", "joy", True, True),
        ("  Joy \n(because the puppy...)", "joy", True, True),  # first line, case and spaces ignored
        ("The tone is joy.", "joy", False, True),
        ("sadness", "joy", False, False),
        ("", "joy", False, False),
    ],
)
def test_score(answer: str, expected: str, exact: bool, mentioned: bool) -> None:
    assert score(answer, expected) == {"exact_match": exact, "mentioned": mentioned}


def test_report_shows_base_and_tuned_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = {"exact_match": 0.5, "mentioned": 0.75, "answer_loss": 1.25, "perplexity": 3.49}
    report = {
        "held_out_rows": 4,
        "base": {**metrics, "exact_match": 0.0},
        "tuned": metrics,
        "examples": [{"input": "The puppy slept.", "base": "A puppy.", "tuned": "joy", "expected": "joy"}],
    }
    print_report(report, tmp_path / "models" / "adapter" / "eval.json", tmp_path)
    out = capsys.readouterr().out
    assert "Held-out evaluation: 4 rows the model never trained on" in out
    assert "exact match" in out and "0.0%" in out and "50.0%" in out and "3.49" in out
    assert "expected: 'joy'" in out and "Written to models/adapter/eval.json" in out


def rows(n: int, labels: list[str]) -> list[dict[str, str]]:
    return [{"phrase": f"phrase {i}", "tone": labels[i % len(labels)]} for i in range(n)]


def test_few_shot_shows_the_labels_and_one_row_per_label_first() -> None:
    train = rows(30, ["joy", "fear", "anger"])
    labels, examples = few_shot(train, SETTINGS | {"eval": {"prompt_examples": 5}})
    assert labels == ["anger", "fear", "joy"]
    assert len(examples) == 5 and all(e in train for e in examples)
    assert {e["tone"] for e in examples[:3]} == {"joy", "fear", "anger"}  # every label before any twice
    # The same rows and seed pick the same examples; another data_seed picks others.
    assert few_shot(train, SETTINGS | {"eval": {"prompt_examples": 5}}) == (labels, examples)
    other = SETTINGS | {"train": {"data_seed": 8}, "eval": {"prompt_examples": 5}}
    assert few_shot(train, other)[1] != examples


def test_few_shot_lists_no_labels_for_free_text_and_takes_what_there_is() -> None:
    free = rows(25, [f"answer {i}" for i in range(25)])  # 25 distinct targets: not a label set
    labels, examples = few_shot(free, SETTINGS)
    assert labels == [] and len(examples) == 6  # the default [eval] prompt_examples
    few = few_shot(rows(3, ["joy"]), SETTINGS | {"eval": {"prompt_examples": 10}})[1]
    assert sorted(r["phrase"] for r in few) == [r["phrase"] for r in rows(3, ["joy"])]  # all there is
    assert few_shot(free, SETTINGS | {"eval": {"prompt_examples": 0}})[1] == []


@pytest.mark.parametrize("bad", [-1, 65, 2.5, "6", True])
def test_prompt_examples_out_of_range_is_refused(bad: object) -> None:
    """Checked with the settings, before anything runs (settings.toml or --set)."""
    with pytest.raises(SettingsError, match=r"eval.prompt_examples = .* a whole number from 0 to 64"):
        check_value(SETTINGS, "eval", "prompt_examples", bad, "--set")


def test_prompted_conversation_is_system_with_labels_then_examples_then_the_row() -> None:
    examples = rows(2, ["joy", "fear"])
    chat = prompted({"phrase": "held out", "tone": "anger"}, SETTINGS, ["anger", "fear", "joy"], examples)
    assert chat[0] == {"role": "system", "content": "Classify the tone.\nAnswer with one of: anger, fear, joy."}
    assert [m["role"] for m in chat[1:]] == ["user", "assistant"] * 3
    assert chat[1]["content"] == "Phrase: phrase 0" and chat[2]["content"] == "joy"
    assert chat[-2:] == [{"role": "user", "content": "Phrase: held out"}, {"role": "assistant", "content": "anger"}]


def three_rows(prompted_em: float, tuned_em: float) -> dict:
    metrics = {"exact_match": tuned_em, "mentioned": 0.75, "answer_loss": 1.25, "perplexity": 3.49}
    return {
        "held_out_rows": 4,
        "base": metrics | {"exact_match": 0.0},
        "prompted": metrics | {"exact_match": prompted_em},
        "tuned": metrics,
        "prompted_with": {"labels": ["joy", "fear"], "examples": [{"input": "x", "answer": "joy"}]},
        "fine_tuning_paid": tuned_em - prompted_em >= 0.05,
        "examples": [
            {"input": "The puppy slept.", "base": "A puppy.", "prompted": "fear", "tuned": "joy", "expected": "joy"}
        ],
    }


def test_report_shows_the_prompted_base_between_base_and_tuned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    print_report(three_rows(0.5, 0.9), tmp_path / "eval.json", tmp_path)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "base, prompted" in line and "tuned" in line)
    assert header.index("base ") < header.index("base, prompted") < header.index("tuned")
    assert "50.0%" in out and "90.0%" in out
    assert "the base model told the 2 labels and 1 training rows as examples" in out
    assert "prompted: 'fear'" in out and "did not pay" not in out


@pytest.mark.parametrize(("prompted_em", "tuned_em"), [(0.8, 0.83), (0.9, 0.8)])
def test_report_says_plainly_when_fine_tuning_did_not_pay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], prompted_em: float, tuned_em: float
) -> None:
    print_report(three_rows(prompted_em, tuned_em), tmp_path / "eval.json", tmp_path)
    out = capsys.readouterr().out
    assert "Fine-tuning did not pay on this data" in out
    assert f"({100 * prompted_em:.1f}% against {100 * tuned_em:.1f}% exact match)" in out


def untrained_adapter(ws: Path) -> Path:
    """A LoRA adapter whose weights change nothing (peft's initialisation): the fine-tuned row
    equals the base row, and the evaluation runs without a fine-tune."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    settings = load_settings(ws / "settings.toml")
    model = AutoModelForCausalLM.from_pretrained(ws / settings["model"]["path"])
    config = LoraConfig(r=4, target_modules=settings["train"]["target_modules"], task_type="CAUSAL_LM")
    adapter = ws / "models" / "adapter"
    get_peft_model(model, config).save_pretrained(adapter)
    return adapter


@pytest.mark.slow
def test_prompted_base_on_smollm2_is_reproducible_and_never_sees_a_held_out_row(
    smol_base: Path, tmp_path: Path
) -> None:
    """The real thing on SmolLM2-135M-Instruct: the prompted row is scored, its examples are rows
    of the training split (never a held-out one), and a second evaluation gives the same row."""
    ws = tmp_path / "ws"
    shutil.copytree(smol_base, ws)
    settings_file = ws / "settings.toml"  # 21 held-out rows instead of 84: a quarter of the time
    settings_file.write_text(re.sub(r"(?m)^eval_split = .*$", "eval_split = 0.05", settings_file.read_text("utf-8")))
    adapter = untrained_adapter(ws)
    reports, logs = [], []
    for _ in range(2):
        run = run_py(ws, "finetuning/evaluate_adapter.py")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        reports.append(json.loads((adapter / "eval.json").read_text("utf-8")))
        logs.append(run.stdout)
    report = reports[0]
    print({name: report[name]["exact_match"] for name in ("base", "prompted", "tuned")})
    assert report["held_out_rows"] == 21 and set(report["prompted"]) == set(report["base"])
    assert report["tuned"] == report["base"]  # the untrained adapter changes nothing
    settings = load_settings(settings_file)
    train, held_out = split_rows(load_rows(settings, ws), 0.05, settings["train"]["data_seed"])
    shown = report["prompted_with"]
    assert shown["labels"] == sorted({r["tone"] for r in train}) and len(shown["examples"]) == 6
    inputs = [example["input"] for example in shown["examples"]]  # text_template is "{phrase}"
    assert set(inputs) <= {r["phrase"] for r in train} and not set(inputs) & {r["phrase"] for r in held_out}
    # Reproducible: the same examples, answers and scores the second time.
    assert reports[1]["prompted_with"] == shown and reports[1]["prompted"] == report["prompted"]
    assert [e["prompted"] for e in reports[1]["examples"]] == [e["prompted"] for e in report["examples"]]
    assert "base, prompted" in logs[0] and "training rows as examples" in logs[0]


def test_answer_loss_in_batches_equals_one_row_at_a_time(tiny_built: Path) -> None:
    """The loss is computed BATCH_SIZE rows at a time (right-padded): the same mean per answer token
    as row by row, with and without last_only (the prompted base's example answers not scored)."""
    from tuner.training import evaluation
    from tuner.training.evaluation import answer_loss, few_shot, load_model, prompted

    settings = load_settings(tiny_built / "settings.toml")
    train, held_out = split_rows(load_rows(settings, tiny_built), 0.2, 7)
    labels, examples = few_shot(train, settings)
    model, tokenizer = load_model(settings, tiny_built / settings["model"]["path"])
    chats = [prompted(row, settings, labels, examples[:2]) for row in held_out[:20]]  # lengths differ
    for last_only in (False, True):
        batched = answer_loss(model, tokenizer, chats, 1_000_000, last_only)
        evaluation.BATCH_SIZE, saved = 1, evaluation.BATCH_SIZE
        try:
            one_by_one = answer_loss(model, tokenizer, chats, 1_000_000, last_only)
        finally:
            evaluation.BATCH_SIZE = saved
        assert batched == pytest.approx(one_by_one, rel=1e-4)
    assert answer_loss(model, tokenizer, chats, 1_000_000, True) != pytest.approx(
        answer_loss(model, tokenizer, chats, 1_000_000, False), rel=1e-3
    )


def test_shared_prefix_runs_once_and_changes_nothing(tiny_built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompted base's prompts share their system message and examples: those tokens run once
    (a cache copied per batch) and each row only its own. The loss and the greedy answers are the
    ones of running every prompt whole."""
    from tuner.training import evaluation
    from tuner.training.evaluation import answer_loss, generate, load_model, prompted, shared_prefix

    settings = load_settings(tiny_built / "settings.toml")
    train, held_out = split_rows(load_rows(settings, tiny_built), 0.2, 7)
    labels, examples = few_shot(train, settings)
    model, tokenizer = load_model(settings, tiny_built / settings["model"]["path"])
    chats = [prompted(row, settings, labels, examples) for row in held_out[:20]]
    prompts = [chat[:-1] for chat in chats]
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert shared_prefix(ids, 10**6) > evaluation.MIN_SHARED  # the cached path is the one taken
    cached = answer_loss(model, tokenizer, chats, 1_000_000, True), generate(model, tokenizer, prompts, 12)
    monkeypatch.setattr(evaluation, "MIN_SHARED", 10**6)  # no prefix is long enough: every prompt whole
    whole = answer_loss(model, tokenizer, chats, 1_000_000, True), generate(model, tokenizer, prompts, 12)
    assert cached[0] == pytest.approx(whole[0], rel=1e-5)
    assert cached[1] == whole[1] and len(set(whole[1])) > 1


def test_shared_prefix_is_the_common_start_and_none_when_short() -> None:
    from tuner.training.evaluation import MIN_SHARED, shared_prefix

    start = list(range(100, 100 + MIN_SHARED + 5))
    assert shared_prefix([[*start, 1, 2], [*start, 1, 3], [*start, 4]], 10**6) == MIN_SHARED + 5
    assert shared_prefix([[*start, 1, 2], [*start, 1, 3]], 10**6) == MIN_SHARED + 6
    assert shared_prefix([[*start, 1, 2], [*start, 1, 3]], MIN_SHARED + 2) == MIN_SHARED + 2  # the limit
    assert shared_prefix([[*start, 1], [9, *start]], 10**6) == 0
    assert shared_prefix([start[: MIN_SHARED - 1] + [1], start[: MIN_SHARED - 1] + [2]], 10**6) == 0
