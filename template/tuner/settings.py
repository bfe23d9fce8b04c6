"""settings.toml, the workspace's one settings file, and the values computed from it.

Every script reads the file through load_settings(). Derived values (where the adapter goes,
which execution provider ONNX uses) are computed here and never stored in the file, so they
cannot disagree with it. `[train]` is checked by check_train() before a run, and one run can
change any setting with `--set section.key=value` (with_overrides()).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

MARKERS = ("<<<<<<<", "=======", ">>>>>>>")  # what a `copier update` conflict leaves behind

# Where a run writes: the adapter (published only when complete), checkpoints keyed by a
# fingerprint of the run, Olive's cache, and TensorBoard logs.
MODELS = "models"
ADAPTER = "models/adapter"
CHECKPOINTS = "models/checkpoints"
OLIVE_CACHE = "models/olive-cache"
RUNS = "models/runs"
RUN_RECORD = "run.json"  # beside the adapter: the settings it was trained with
# settings.toml's platform -> onnxruntime-genai execution provider.
PROVIDERS = {"cuda": "cuda", "windows-gpu": "dml", "cpu": "cpu"}


class WorkspaceError(Exception):
    """Something to tell the user in one line before a script stops. Every error of the workspace
    (a setting, the dataset, the model folder, a run, an export, an Azure call) is one of these,
    and run_script() is the one place that prints it and picks the exit code."""

    exit_code = 1


class SettingsError(WorkspaceError):
    """A missing, broken or invalid settings file, said in one line (file and line)."""


def run_script(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's main(): a WorkspaceError is one line on stderr and its exit code (1, or 2 for
    a bad dataset), Ctrl-C is exit code 130; never a traceback for either."""
    try:
        code = main()
    except WorkspaceError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def load_settings(path: Path) -> dict[str, Any]:
    """The parsed settings; SettingsError names the file and the line of what is wrong."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"cannot read {path}: {err}") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if line.startswith(MARKERS):
            raise SettingsError(
                f"{path}:{number}: a conflict marker left by `copier update`: keep the lines you want, "
                "delete the <<<<<<< ======= >>>>>>> lines, then run again"
            )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends with "(at line N, column M)"
        raise SettingsError(f"{path}: invalid TOML: {err}") from None


def in_workspace(root: Path, value: str) -> Path:
    """A path from the settings: relative ones are relative to the workspace root."""
    path = Path(value)
    return path if path.is_absolute() else root / path


def add_settings_arguments(parser: argparse.ArgumentParser, root: Path, example: str) -> None:
    """--settings PATH and --set SECTION.KEY=VALUE (repeatable), for the scripts."""
    parser.add_argument("--settings", type=Path, default=root / "settings.toml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"change a setting for this run only, e.g. --set {example} (repeatable)",
    )


def settings_for_script(path: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """For the scripts: the settings (with `--set` overrides), or exit 1 with the one-line
    error (never a traceback)."""
    try:
        return with_overrides(load_settings(path), overrides or [])
    except SettingsError as err:
        raise SystemExit(f"error: {err}") from None


def adapter_dir(root: Path) -> Path:
    """Where invoke_olive.py publishes the adapter and every chat front-end loads it from."""
    return root / ADAPTER


def trained_with(adapter: Path) -> dict[str, Any] | None:
    """The settings an adapter was trained with (invoke_olive.py writes them beside it, with
    any --set overrides), or None for an adapter from elsewhere."""
    try:
        return json.loads((adapter / RUN_RECORD).read_text("utf-8"))["settings"]
    except (OSError, ValueError, KeyError):
        return None


def check_serve_host(host: Any) -> None:
    """SettingsError for an empty [serve] host: uvicorn would take it for every interface, IPv4
    and IPv6, and expose the server to the network without anyone having asked for that."""
    if not isinstance(host, str) or not host.strip():
        raise SettingsError(
            f'serve.host = {_toml(host)} is not a host to listen on: set it to "127.0.0.1" (this machine only), '
            'or "0.0.0.0" to listen on every interface deliberately'
        )


def execution_provider(settings: dict[str, Any]) -> str:
    return PROVIDERS[settings["model"]["platform"]]


# ---------------------------------------------------------------- [train]: what a value may be


def _int(low: int, high: int | None = None) -> tuple[Callable[[Any], bool], str]:
    ok = lambda v: type(v) is int and v >= low and (high is None or v <= high)  # noqa: E731
    return ok, f"a whole number from {low} to {high}" if high is not None else f"a whole number, {low} or more"


def _number(test: Callable[[float], bool], text: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: type(v) in (int, float) and test(v)), text


def _one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), "one of " + ", ".join(f'"{c}"' for c in choices)


_BOOL = ((lambda v: type(v) is bool), "true or false")

TRAIN: dict[str, tuple[Callable[[Any], bool], str]] = {
    "method": _one_of("lora", "qlora"),
    "compute_dtype": _one_of("bfloat16", "float16", "float32"),
    "quant_type": _one_of("nf4", "fp4"),
    "double_quant": _BOOL,
    "lora_r": _int(1, 1024),
    "lora_alpha": _number(lambda v: 0 < v <= 4096, "a number above 0, at most 4096"),
    "lora_dropout": _number(lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1"),
    "target_modules": (
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(m, str) and m for m in v),
        'a non-empty list of module names, like ["q_proj", "v_proj"]',
    ),
    "eval_split": _number(lambda v: 0 <= v <= 0.5, "a number from 0 to 0.5"),
    # numpy and the Trainer's samplers take 32-bit seeds: a larger one fails deep in training.
    "seed": _int(0, 2**32 - 1),
    "data_seed": _int(0, 2**32 - 1),
    "per_device_train_batch_size": _int(1, 1024),
    "per_device_eval_batch_size": _int(1, 1024),
    "gradient_accumulation_steps": _int(1, 1024),
    "gradient_checkpointing": _BOOL,
    "learning_rate": _number(lambda v: 0 < v <= 1, "a number above 0, at most 1"),
    "lr_scheduler_type": _one_of("constant", "constant_with_warmup", "linear", "cosine"),
    "num_train_epochs": _number(lambda v: 0 < v <= 1000, "a number above 0, at most 1000"),
    "max_steps": ((lambda v: type(v) is int and (v == -1 or v > 0)), "-1 (train for the epochs) or a positive number"),
    "max_seq_len": _int(16, 131072),
    "pad_to_max_len": _BOOL,
    "logging_steps": _int(1),
    "save_steps": _int(1),
    "eval_steps": _int(1),
    "report_to": _one_of("none", "tensorboard", "mlflow"),
}


def check_train(settings: dict[str, Any]) -> None:
    """SettingsError for the first [train] value that is missing, unknown or out of range."""
    train = settings.get("train")
    if not isinstance(train, dict):
        raise SettingsError("settings.toml has no [train] table")
    for key in train:
        if key not in TRAIN:
            raise SettingsError(f"[train] has no setting {key!r}; the settings are: {', '.join(TRAIN)}")
    for key, (ok, wanted) in TRAIN.items():
        if key not in train:
            raise SettingsError(f"[train] {key} is missing; it must be {wanted}")
        if not ok(train[key]):
            raise SettingsError(f"[train] {key} = {_toml(train[key])} is not valid: it must be {wanted}")


def _toml(value: Any) -> str:
    """A value as it would be written in settings.toml, on one line and at most ~80 characters, for
    an error message (a newline or a pasted page in a value must not make it a wall of text)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)  # escapes newlines and quotes as TOML does
    else:
        text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_value(text: str) -> Any:
    """A value on the command line, as TOML (3e-4, true, ["q_proj"]); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def with_overrides(settings: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the settings with `section.key=value` overrides applied (one run's changes).
    Unknown keys and values of the wrong kind are refused; [train] values are range-checked."""
    settings = copy.deepcopy(settings)
    for item in overrides:
        if not item.isprintable():  # a newline would end the TOML value early, silently
            raise SettingsError(f"--set {_toml(item)}: a value is one line of printable text")
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise SettingsError(f"--set {_toml(item)}: write section.key=value, like train.learning_rate=3e-4")
        if section not in settings or not isinstance(settings[section], dict):
            raise SettingsError(f"--set {name}: settings.toml has no [{section}] table")
        table = settings[section]
        known = TRAIN if section == "train" else table
        if key not in known:
            raise SettingsError(f"--set {name}: [{section}] has no setting {key!r}; it has: {', '.join(known)}")
        value = _parse_value(text.strip())
        if section != "train":  # no ranges known here: the value must be of the same kind
            old = table[key]
            if type(old) is float and type(value) is int:
                value = float(value)
            if type(value) is not type(old):
                raise SettingsError(f"--set {name}={_toml(value)}: expected a value of the same kind as {_toml(old)}")
        table[key] = value
    if overrides and "train" in settings:
        check_train(settings)
    return settings
