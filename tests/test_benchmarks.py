"""evaluate_adapter.py --benchmarks: lm-evaluation-harness before and after fine-tuning, offline.

A small task of our own (a YAML file and a local JSON lines dataset, as a user writes one for
--include-path) is loaded through the pinned lm-eval's own TaskManager, and simple_evaluate runs
it for real on the tiny model and on SmolLM2-135M with what tuner/training/benchmarks.py hands it
(the `hf` model's arguments, peft= for the adapter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_py
from test_evaluation import untrained_adapter
from tuner.settings import load_settings
from tuner.training.benchmarks import DROP_WARNING, benchmark, model_args, print_benchmarks, task_manager

QUESTIONS = [
    ("The sky on a clear day is", [" blue", " loud"], 0),
    ("Fire feels", [" cold", " hot"], 1),
    ("Ice feels", [" cold", " hot"], 0),
    ("Two plus two is", [" four", " five"], 0),
    ("A cat says", [" woof", " meow"], 1),
    ("The sun rises in the", [" east", " west"], 0),
]


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    """One multiple-choice task, `ws_check`, reading a local JSON lines file (no Hub)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "ws_check.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "ws_check.yaml").write_text(
        "task: ws_check\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        "utf-8",
    )
    return folder


def test_our_task_loads_through_lm_evals_task_manager(task_dir: Path) -> None:
    manager = task_manager(["ws_check"], task_dir)
    loaded = manager.load_task_or_group(["ws_check"])
    task = loaded["ws_check"]
    assert len(list(task.test_docs())) == len(QUESTIONS)


def test_unknown_task_and_missing_folder_are_one_line(tiny_built: Path, task_dir: Path, tmp_path: Path) -> None:
    """Checked before the held-out evaluation: no model is loaded for a typo."""
    ws = tmp_path / "ws"
    shutil.copytree(tiny_built, ws)
    untrained_adapter(ws)
    for args, message in (
        (["--benchmarks", "ws_chek", "--include-path", str(task_dir)], "lm-eval has no task 'ws_chek'"),
        (["--benchmarks", "ws_check", "--include-path", str(tmp_path / "nope")], "is not a folder"),
        (["--benchmarks", "ws_check", "--limit", "0"], "--limit must be 1 or more"),
    ):
        run = run_py(ws, "finetuning/evaluate_adapter.py", *args)
        assert run.returncode == 1 and message in run.stderr, run.stderr[-2000:]
        assert "Traceback" not in run.stderr and "Held-out evaluation" not in run.stdout


def test_drop_beyond_the_threshold_warns_naming_the_task(capsys: pytest.CaptureFixture[str]) -> None:
    def row(base: float, tuned: float) -> dict:
        drop = base - tuned
        return {"metric": "acc", "base": base, "tuned": tuned, "change": tuned - base, "warning": drop > DROP_WARNING}

    print_benchmarks(
        {
            "limit": None,
            "drop_warning": DROP_WARNING,
            "tasks": {"arc_easy": row(0.6, 0.5)} | {"hellaswag": row(0.4, 0.39), "mmlu": row(0.3, 0.35)},
        }
    )
    out = capsys.readouterr().out
    assert "arc_easy" in out and "60.0%" in out and "-10.0" in out and "+5.0" in out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "arc_easy fell by 10.0 points" in warnings[0]


@pytest.mark.slow
def test_benchmarks_before_and_after_on_the_tiny_model(tuned_workspace: Path, task_dir: Path, tmp_path: Path) -> None:
    """The script end to end: the held-out evaluation, then the task on the base and on the
    fine-tuned model, side by side in the output, in eval.json and in the run's TensorBoard folder."""
    ws = tmp_path / "ws"
    shutil.copytree(tuned_workspace, ws)
    events_before = set((ws / "models" / "runs").rglob("events.out.tfevents.*"))
    run = run_py(ws, "finetuning/evaluate_adapter.py", "--benchmarks", "ws_check", "--include-path", str(task_dir))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Held-out evaluation" in run.stdout and "General ability (lm-evaluation-harness)" in run.stdout
    report = json.loads((ws / "models" / "adapter" / "eval.json").read_text("utf-8"))
    assert "prompted" in report  # the held-out evaluation is still there, beside the benchmarks
    row = report["benchmarks"]["tasks"]["ws_check"]
    assert row["metric"] == "acc"
    for score in (row["base"], row["tuned"]):  # a share of the questions answered right
        assert any(score == pytest.approx(i / len(QUESTIONS), abs=1e-4) for i in range(len(QUESTIONS) + 1))
    assert row["change"] == pytest.approx(row["tuned"] - row["base"], abs=1e-4)
    assert next(line for line in run.stdout.splitlines() if line.strip().startswith("ws_check"))
    run_id = json.loads((ws / "models" / "adapter" / "run.json").read_text("utf-8"))["run"]
    new = set((ws / "models" / "runs").rglob("events.out.tfevents.*")) - events_before
    assert [p.parent.name for p in new] == [run_id]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(iter(new)))).Reload()
    scalars = events.Scalars("benchmarks/ws_check/acc")
    assert [s.value for s in scalars] == pytest.approx([row["base"], row["tuned"]]) and scalars[0].step == 0


@pytest.mark.slow
def test_benchmarks_on_smollm2_with_an_adapter(smol_base: Path, task_dir: Path, tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct through lm-eval's `hf` model with peft=: the adapter loads on the real
    model, and one that changes nothing (peft's initialisation) changes no score."""
    ws = tmp_path / "ws"
    shutil.copytree(smol_base, ws)
    adapter = untrained_adapter(ws)
    settings = load_settings(ws / "settings.toml")
    assert set(model_args(settings, ws, adapter)) == {"pretrained", "dtype", "device", "peft"}
    report = benchmark(adapter, settings, ws, ["ws_check"], None, task_manager(["ws_check"], task_dir))
    row = report["tasks"]["ws_check"]
    print(row)
    assert 0 < row["base"] <= 1 and row["tuned"] == row["base"] and row["change"] == 0 and not row["warning"]
