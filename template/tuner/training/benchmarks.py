"""General ability before and after fine-tuning: lm-evaluation-harness (PyPI lm-eval) on the base
model and on the base model with the adapter, per task side by side with the change, into
eval.json and TensorBoard (the run's folder in models/runs: the base at step 0, fine-tuned at the
run's last step).

    python finetuning/evaluate_adapter.py --benchmarks arc_easy,hellaswag,mmlu --limit 200

lm-eval is not in the default install: `pip install -r setup/requirements-benchmarks.txt`. Its
published tasks download their data from the Hugging Face Hub; your own tasks are YAML files in a
folder (--include-path) that may read local JSON lines (dataset_path: json). A task whose score
falls by more than DROP_WARNING (absolute, in the direction lm-eval says is better) after
fine-tuning gets a warning line: the adapter made the model worse at it (forgetting).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuner.settings import RUN_RECORD, RUNS, WorkspaceError, in_workspace
from tuner.training.precision import Device, decide

DROP_WARNING = 0.02  # 2 points: past the noise of a few hundred questions (--limit), yet a real loss
PREFERRED = ("acc_norm", "acc", "exact_match", "f1")  # the score shown for a task, first one it has


class BenchmarkError(WorkspaceError):
    """A benchmark that cannot run, said in one line."""


def model_args(settings: dict[str, Any], root: Path, adapter: Path | None) -> dict[str, Any]:
    """lm-eval's `hf` model arguments: the base model as it was fine-tuned (the precision policy:
    dtype, the 4-bit config of a QLoRA base), and the adapter on it (peft) when given."""
    precision = decide(settings["train"], Device.detect())
    args: dict[str, Any] = {
        "pretrained": str(in_workspace(root, settings["model"]["path"])),
        "dtype": precision.weights_dtype,
        "device": "cuda" if precision.device_map == "cuda" else "cpu",
    }
    if precision.quantization is not None:
        args["quantization_config"] = precision.bnb_config()
    if adapter is not None:
        args["peft"] = str(adapter)
    return args


def headline(scores: dict[str, Any]) -> tuple[str, float] | None:
    """The one score shown for a task: lm-eval's "metric,filter" keys, PREFERRED first."""
    metrics = {
        key: value
        for key, value in scores.items()
        if "," in key and "_stderr" not in key and isinstance(value, int | float) and not isinstance(value, bool)
    }
    for wanted in PREFERRED:
        for key in metrics:
            if key.split(",")[0] == wanted:
                return key, float(metrics[key])
    return next(iter((k, float(v)) for k, v in metrics.items()), None)


def task_manager(tasks: list[str], include_path: Path | None) -> Any:
    """lm-eval's TaskManager with its own tasks and those in `include_path`; BenchmarkError when
    lm-eval is not installed or does not know one of `tasks`."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise BenchmarkError(
            "--benchmarks needs lm-evaluation-harness: pip install -r setup/requirements-benchmarks.txt"
        ) from None
    if include_path is not None and not include_path.is_dir():
        raise BenchmarkError(f"--include-path {include_path} is not a folder")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else " (your own: --include-path FOLDER of task YAML files)"
        raise BenchmarkError(f"lm-eval has no task {unknown[0]!r}{where}")
    return manager


def run_tasks(
    args: dict[str, Any], tasks: list[str], limit: int | None, manager: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """lm-eval's results and higher_is_better for `tasks` on one model."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model="hf",
        model_args=args,
        tasks=tasks,
        limit=limit,
        task_manager=manager,
        batch_size=8,
        log_samples=False,
        bootstrap_iters=0,  # no standard errors: the table shows none
    )
    results = out["results"] | out.get("groups", {})
    return {task: results[task] for task in tasks if task in results}, out.get("higher_is_better", {})


def benchmark(
    adapter: Path, settings: dict[str, Any], root: Path, tasks: list[str], limit: int | None, manager: Any
) -> dict[str, Any]:
    """Runs `tasks` (checked by task_manager(), which made `manager`) on the base and on base +
    adapter; prints the table and the warnings, adds it to adapter/eval.json under "benchmarks"
    and to TensorBoard."""
    base, better = run_tasks(model_args(settings, root, None), tasks, limit, manager)
    tuned, _ = run_tasks(model_args(settings, root, adapter), tasks, limit, manager)
    table: dict[str, Any] = {}
    for task in tasks:
        shown = headline(base.get(task, {}))
        if shown is None:
            continue
        metric, before = shown
        after = float(tuned[task][metric])
        higher = better.get(task, {}).get(metric.split(",")[0], True)
        drop = (before - after) if higher else (after - before)
        table[task] = {"metric": metric.split(",")[0], "base": round(before, 4), "tuned": round(after, 4)}
        table[task] |= {"change": round(after - before, 4), "warning": drop > DROP_WARNING}
    report = {"limit": limit, "drop_warning": DROP_WARNING, "tasks": table}
    path = adapter / "eval.json"
    try:
        saved = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        saved = {}
    path.write_text(json.dumps(saved | {"benchmarks": report}, indent=1, ensure_ascii=False), "utf-8")
    print_benchmarks(report)
    to_tensorboard(report, adapter, root)
    return report


def print_benchmarks(report: dict[str, Any]) -> None:
    limit = f", at most {report['limit']} questions each" if report["limit"] else ""
    print(f"\nGeneral ability (lm-evaluation-harness{limit})")
    print(f"  {'task':24} {'metric':12} {'base':>8} {'tuned':>8} {'change':>8}")
    for task, row in report["tasks"].items():
        change = f"{100 * row['change']:+.1f}"
        print(f"  {task:24} {row['metric']:12} {100 * row['base']:>7.1f}% {100 * row['tuned']:>7.1f}% {change:>8}")
    for task, row in report["tasks"].items():
        if row["warning"]:
            print(
                f"warning: {task} fell by {100 * abs(row['change']):.1f} points after fine-tuning "
                f"(more than {100 * report['drop_warning']:.0f}): the adapter made the model worse at it"
            )


def to_tensorboard(report: dict[str, Any], adapter: Path, root: Path) -> None:
    """Each task's score in the run's TensorBoard folder: the base at step 0, fine-tuned at the last step."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in the default install; without it, eval.json is enough
        return
    try:
        record = json.loads((adapter / RUN_RECORD).read_text("utf-8"))
        history = json.loads((adapter / "log_history.json").read_text("utf-8"))
        run, last_step = record["run"], max(h.get("step", 0) for h in history)
    except (OSError, ValueError, KeyError, TypeError):
        run, last_step = "adapter", 1  # an adapter from elsewhere: no run folder of its own
    with SummaryWriter(log_dir=str(in_workspace(root, RUNS) / run)) as writer:
        for task, row in report["tasks"].items():
            writer.add_scalar(f"benchmarks/{task}/{row['metric']}", row["base"], 0)
            writer.add_scalar(f"benchmarks/{task}/{row['metric']}", row["tuned"], max(last_step, 1))
