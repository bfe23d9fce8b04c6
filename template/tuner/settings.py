"""settings.toml, the workspace's one settings file, and the values computed from it.

Every script reads the file through load_settings(), which checks every table against its model
below (each setting's type, range or choices, and default, in one place) and returns the checked
values: a script never meets a setting of the wrong kind, and a mistake is one line naming it
before anything runs. One run can change any setting with `--set section.key=value`
(with_overrides()), checked the same way. Derived values (where the adapter goes, which execution
provider ONNX uses) are computed here and never stored in the file, so they cannot disagree with it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, get_origin, get_type_hints

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
ONNX_PRECISIONS = ("int4", "fp16", "fp32")  # what inference/export.py --format onnx builds
GGUF_TYPES = ("f16", "q8_0", "q4_k_m")  # what inference/export.py --format gguf writes


class WorkspaceError(Exception):
    """Something to tell the user in one line before a script stops. Every error of the workspace
    (a setting, the dataset, the model folder, a run, an export, an Azure call) is one of these,
    and run_script() is the one place that prints it and picks the exit code."""

    exit_code = 1


class SettingsError(WorkspaceError):
    """A missing, broken or invalid settings file, said in one line (file and line)."""


class Interrupted(WorkspaceError):
    """Ctrl-C, where the script has something to add (what was kept, how to resume)."""

    exit_code = 130


def run_script(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's main(): a WorkspaceError is one line on stderr and its exit code (1, or 2 for
    a bad dataset), Ctrl-C is exit code 130; never a traceback for either. Under a launcher
    (torchrun), where every process fails alike, only the first process of each machine says it."""
    say = os.environ.get("LOCAL_RANK", "0") == "0"
    # On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a 4-bit kernel from the Hub and
    # logs a warning when it cannot; bitsandbytes then uses its own kernel, so the line is only noise
    # (and it would stand before a script's one-line error).
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())
    try:
        code = main()
    except WorkspaceError as err:
        if say:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        if say:
            print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def load_settings(path: Path) -> dict[str, Any]:
    """The checked settings: every table of the models below, defaults filled in, a whole number
    given where a number is expected made a float. SettingsError names the file, the line where it
    can, and what is wrong."""
    try:
        text = path.read_text("utf-8-sig")  # -sig: a byte-order mark, which some Windows editors add
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"cannot read {path}: {err}") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if line.startswith(MARKERS):
            raise SettingsError(
                f"{path}:{number}: a conflict marker left by `copier update`: keep the lines you want, "
                "delete the <<<<<<< ======= >>>>>>> lines, then run again"
            )
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends with "(at line N, column M)"
        raise SettingsError(f"{path}: invalid TOML: {err}") from None
    return _checked(raw, lambda section, key: f"{path}{_line(text, section, key)}")


def in_workspace(root: Path, value: str) -> Path:
    """A path from the settings: relative ones are relative to the workspace root."""
    path = Path(value)
    return path if path.is_absolute() else root / path


def add_settings_arguments(parser: argparse.ArgumentParser, root: Path | None, example: str) -> None:
    """--settings PATH (default: root/settings.toml, or None without a root) and --set
    SECTION.KEY=VALUE (repeatable)."""
    text = "the settings file (default: settings.toml of this workspace)"
    parser.add_argument("--settings", type=Path, default=root / "settings.toml" if root else None, help=text)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"change a setting for this run only, e.g. --set {example} (repeatable)",
    )


def script_parser(doc: str | None, root: Path, example: str) -> argparse.ArgumentParser:
    """A script's command line: its docstring as the help, --settings and --set. No abbreviations:
    argparse would otherwise take `--se` (or --set, on a parser without it) for --settings."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    add_settings_arguments(parser, root, example)
    return parser


def settings_for_script(path: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """For the scripts: the checked settings with the `--set` overrides (SettingsError if not)."""
    return with_overrides(load_settings(path), overrides or [])


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


def execution_provider(settings: dict[str, Any]) -> str:
    return PROVIDERS[settings["model"]["platform"]]


# ---------------------------------------------------------------- what each setting may be


@dataclass(frozen=True)
class Range:
    """Numbers from low to high (None: no bound); an open end excludes the bound itself. `also`:
    values outside the range that mean something; `text`: said instead of the generated wording."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[int, ...] = ()
    text: str = ""

    def ok(self, value: float) -> bool:
        if value in self.also:
            return True
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self, kind: str) -> str:
        if self.text:
            return self.text
        low = f"above {self.low}" if self.low_open else f"from {self.low}"
        if self.high is None:
            return f"{kind} {low}" if self.low_open else f"{kind}, {self.low} or more"
        if self.low is None:
            return f"{kind} below {self.high}" if self.high_open else f"{kind}, at most {self.high}"
        if self.high_open:
            return f"{kind} {low} up to (not including) {self.high}"
        return f"{kind} {low}, at most {self.high}" if self.low_open else f"{kind} {low} to {self.high}"


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]

    def ok(self, value: str) -> bool:
        return value in self.options

    def describe(self, kind: str) -> str:
        return "one of " + ", ".join(f'"{option}"' for option in self.options)


@dataclass(frozen=True)
class Rule:
    test: Callable[[Any], bool]
    text: str

    def ok(self, value: Any) -> bool:
        return bool(self.test(value))

    def describe(self, kind: str) -> str:
        return self.text


def setting(default: Any = MISSING, rule: Range | Choice | Rule | None = None) -> Any:
    """One setting of a table: its default (none: the file must give it) and what it may be,
    beyond its type."""
    return field(default=default, metadata={"rule": rule})


KINDS = {str: "text in quotes", int: "a whole number", float: "a number", bool: "true or false"}
TEXT = Rule(lambda v: bool(v.strip()), "a non-empty text in quotes")
COLUMNS = Rule(lambda v: all(v), 'a list of column names, like ["text"]')
SHA256 = Rule(lambda v: not v or re.fullmatch(r"[0-9a-f]{64}", v), '"" or a sha256: 64 lowercase hex digits')
PORT = Range(1, 65535)
SEED = Range(0, 2**32 - 1)  # numpy and the Trainer's samplers take 32-bit seeds: more fails deep in training
BATCH = Range(1, 1024)


# One model per table of settings.toml: each field is a setting, with its type, its default (none:
# the file must give it) and what it may be. They describe the file; load_settings() checks it
# against them and returns plain dicts, which the code reads as settings["chat"]["temperature"].


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    id: str = setting(rule=TEXT)
    hf_repo: str = setting()  # "": built offline by setup/build_tiny_model.py
    revision: str = setting("")
    gated: bool = setting(False)
    license: str = setting("")  # the base model's licence, for the model card of an export ("": unknown)
    offline_wheel: str = setting("")
    offline_sha256: str = setting("", SHA256)
    offline_gguf: str = setting("")
    path: str = setting(rule=TEXT)
    platform: str = setting(rule=Choice(tuple(PROVIDERS)))
    threads: int = setting(0, Range(0, 1024))  # CPU threads for torch and ONNX Runtime; 0: every core


@dataclass(frozen=True, kw_only=True)
class DatasetSettings:
    source: str = setting(rule=Choice(("sample", "local", "huggingface")))
    path: str = setting("")  # sample and local
    hf_id: str = setting("")  # huggingface
    split: str = setting("train")
    format: str = setting(rule=Choice(("columns", "chat")))
    input_columns: list[str] = setting(rule=COLUMNS)
    target_column: str = setting()
    messages_column: str = setting("messages")


@dataclass(frozen=True, kw_only=True)
class PromptSettings:
    system: str = setting()
    text_template: str = setting()


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    method: str = setting(rule=Choice(("lora", "qlora")))
    compute_dtype: str = setting(rule=Choice(("bfloat16", "float16", "float32")))
    quant_type: str = setting(rule=Choice(("nf4", "fp4")))
    double_quant: bool = setting()
    # The bounds here and copier.yml's validators agree (tests/test_settings_schema.py checks).
    lora_r: int = setting(rule=Range(1, 1024))
    lora_alpha: float = setting(rule=Range(0, 4096, low_open=True))
    lora_dropout: float = setting(rule=Range(0, 1, high_open=True))
    target_modules: list[str] = setting(
        rule=Rule(lambda v: bool(v) and all(v), 'a non-empty list of module names, like ["q_proj", "v_proj"]')
    )
    eval_split: float = setting(rule=Range(0, 0.5))
    seed: int = setting(rule=SEED)
    data_seed: int = setting(rule=SEED)
    per_device_train_batch_size: int = setting(rule=BATCH)
    per_device_eval_batch_size: int = setting(rule=BATCH)
    gradient_accumulation_steps: int = setting(rule=BATCH)
    gradient_checkpointing: bool = setting()
    learning_rate: float = setting(rule=Range(0, 1, low_open=True))
    lr_scheduler_type: str = setting(rule=Choice(("constant", "constant_with_warmup", "linear", "cosine")))
    num_train_epochs: float = setting(rule=Range(0, 1000, low_open=True))
    max_steps: int = setting(rule=Range(1, also=(-1,), text="-1 (train for the epochs) or a positive number"))
    # The longest context of any model in the catalog; copier.yml asks for at most the model's own.
    max_seq_len: int = setting(rule=Range(16, 131072))
    pad_to_max_len: bool = setting()
    logging_steps: int = setting(rule=Range(1))
    save_steps: int = setting(rule=Range(1))
    eval_steps: int = setting(rule=Range(1))
    report_to: str = setting(rule=Choice(("none", "tensorboard", "mlflow")))


@dataclass(frozen=True, kw_only=True)
class ChatSettings:
    backend: str = setting("torch", Choice(("torch", "onnx", "gguf")))
    max_new_tokens: int = setting(128, Range(1))
    temperature: float = setting(0.0, Range(0, 2))  # 0: greedy; the API and the page take 0 to 2
    top_p: float = setting(1.0, Range(0, 1, low_open=True))
    top_k: int = setting(50, Range(0))  # 0: no limit


# An empty host would be taken by uvicorn for every interface, IPv4 and IPv6: the server exposed to
# the network without anyone having asked for it.
HOST = Rule(
    lambda v: bool(v) and v.isprintable() and not any(c.isspace() for c in v),
    'a host to listen on: "127.0.0.1" (this machine only), or "0.0.0.0" to listen on every interface deliberately',
)


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    backend: str = setting("engine", Choice(("engine", "vllm")))
    host: str = setting("127.0.0.1", HOST)
    port: int = setting(7860, PORT)
    api_key_env: str = setting(
        "FINETUNE_API_KEY",
        Rule(lambda v: re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v), 'an environment variable name, like "API_KEY"'),
    )
    max_request_bytes: int = setting(2_097_152, Range(1, text="a positive number of bytes, like 2_097_152 (2 MiB)"))
    vllm_python: str = setting(".venv-vllm/bin/python", TEXT)
    vllm_port: int = setting(8000, PORT)
    gpu_memory_utilization: float = setting(0.9, Range(0, 1, low_open=True))
    vllm_max_model_len: int = setting(8192, Range(1))


@dataclass(frozen=True, kw_only=True)
class OnnxSettings:
    repo: str = setting("")  # "": no published ONNX build of the base model
    variant: str = setting("")
    revision: str = setting("")
    path: str = setting(rule=TEXT)
    precision: str = setting("int4", Choice(ONNX_PRECISIONS))
    output_dir: str = setting("models/onnx", TEXT)


@dataclass(frozen=True, kw_only=True)
class ExportSettings:
    # Each export in its own folder, named by format (and type): <output_dir>/gguf-q8_0/ ...
    output_dir: str = setting("models/exports", TEXT)
    quantize: str = setting("q8_0", Choice(GGUF_TYPES))  # GGUF (llama.cpp, Ollama)


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    # The "base, prompted" row: the base model shown this many training rows as example turns.
    prompt_examples: int = setting(6, Range(0, 64))


@dataclass(frozen=True, kw_only=True)
class AzureSettings:
    subscription: str = setting("")  # "": the Azure CLI's current one
    resource_group: str = setting(rule=TEXT)
    location: str = setting(rule=TEXT)
    ml_workspace: str = setting("")
    ml_compute: str = setting("")


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "dataset": DatasetSettings,
    "prompt": PromptSettings,
    "train": TrainSettings,
    "chat": ChatSettings,
    "serve": ServeSettings,
    "onnx": OnnxSettings,
    "export": ExportSettings,
    "eval": EvalSettings,
    "azure": AzureSettings,
}
OPTIONAL = {"azure"}  # only workspaces rendered for Azure have it

# Where a value came from, for the message: (section, key) -> "settings.toml:12", or "--set".
Where = Callable[[str | None, str | None], str]
_BAD = object()


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings put together in code, checked as load_settings() checks the file."""
    return _checked(settings, lambda section, key: "settings")


def check_value(settings: dict[str, Any], section: str, key: str, value: Any, where: str) -> Any:
    """A value given another way (a script's option, like --host) checked as [section] key is:
    the value as the setting holds it, or SettingsError saying `where` it came from."""
    return _checked_table(section, settings[section] | {key: value}, lambda *_: where)[key]


def _checked(settings: dict[str, Any], where: Where) -> dict[str, Any]:
    """The settings checked against the models (SettingsError for the first problem), with the
    defaults of the missing keys and a whole number where a number is expected made a float."""
    for name, table in settings.items():
        if name not in SECTIONS:
            tables = ", ".join(SECTIONS)
            raise SettingsError(f"{where(name, None)}: [{name}] is not a table of the settings; they are: {tables}")
        if not isinstance(table, dict):
            raise SettingsError(
                f"{where(None, name)}: {name} = {_toml(table)} is not valid: it must be a [{name}] table"
            )
    checked = {}
    for name in SECTIONS:
        if name in settings or all(f.default is not MISSING for f in fields(SECTIONS[name])):
            checked[name] = _checked_table(name, settings.get(name, {}), where)  # a table of defaults
        elif name not in OPTIONAL:
            raise SettingsError(f"{where(None, None)}: the [{name}] table is missing")
    return checked


def _checked_table(section: str, table: dict[str, Any], where: Where) -> dict[str, Any]:
    model = SECTIONS[section]
    known = {f.name: f for f in fields(model)}
    for key in table:
        if key not in known:
            keys = ", ".join(known)
            raise SettingsError(f"{where(section, key)}: {section}.{key} is not a setting; [{section}] has: {keys}")
    kinds = get_type_hints(model)
    checked = {}
    for key, spec in known.items():
        kind, rule = kinds[key], spec.metadata["rule"]
        wanted = rule.describe(KINDS.get(kind, "")) if rule else KINDS.get(kind, 'a list of text, like ["a"]')
        if key not in table:
            if spec.default is MISSING:
                raise SettingsError(f"{where(section, None)}: {section}.{key} is missing; it must be {wanted}")
            checked[key] = spec.default
            continue
        value = _typed(kind, table[key])
        if value is _BAD or (rule is not None and not rule.ok(value)):
            raise SettingsError(
                f"{where(section, key)}: {section}.{key} = {_toml(table[key])} is not valid: it must be {wanted}"
            )
        checked[key] = value
    return checked


def _typed(kind: Any, value: Any) -> Any:
    """The value as `kind` (a whole number made a float where a number is expected), or _BAD."""
    if get_origin(kind) is list:
        return list(value) if isinstance(value, list) and all(type(item) is str for item in value) else _BAD
    if kind is float and type(value) is int:
        try:
            value = float(value)
        except OverflowError:
            return _BAD
    if type(value) is not kind or (kind is float and not math.isfinite(value)):  # bool is not an int here
        return _BAD
    return value


def _line(text: str, section: str | None, key: str | None) -> str:
    """The line of `key` in [section] as ":N" (the table's own line when key is None), or "" if not found."""
    table = None
    for number, line in enumerate(text.split("\n"), start=1):
        header = re.fullmatch(r"\[\s*([\w-]+)\s*\]\s*(#.*)?", line.strip())
        if header:
            table = header.group(1)
            if table == section and key is None:
                return f":{number}"
        elif table == section and key is not None and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return f":{number}"
    return ""


def _toml(value: Any) -> str:
    """A value as it would be written in settings.toml, on one line and at most ~80 characters, for
    an error message (a newline or a pasted page in a value must not make it a wall of text)."""
    text = (_toml_value(value) if isinstance(value, (bool, str, list)) else repr(value)).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _toml_value(value: Any) -> str:
    """A checked value (text, whole number, finite number, true/false, list of text) as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # JSON's escapes are TOML's; DEL is the one control character JSON leaves
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return repr(value)


def dump_settings(settings: dict[str, Any]) -> str:
    """Checked settings as the text of a settings.toml (without the comments): what a remote run
    gets when --set changed some."""
    tables = [
        f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
        for name, table in settings.items()
    ]
    return "\n".join(tables)


def _parse_value(text: str) -> Any:
    """A value on the command line, as TOML (3e-4, true, ["q_proj"]); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def with_overrides(settings: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the (checked) settings with `section.key=value` overrides applied (one run's
    changes), checked as the file is."""
    settings = copy.deepcopy(settings)
    for item in overrides:
        if not item.isprintable():  # a newline would end the TOML value early, silently
            raise SettingsError(f"--set {_toml(item)}: a value is one line of printable text")
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise SettingsError(f"--set {_toml(item)}: write section.key=value, like train.learning_rate=3e-4")
        if section not in SECTIONS:
            tables = ", ".join(SECTIONS)
            raise SettingsError(f"--set {name}: [{section}] is not a table of the settings; they are: {tables}")
        if not isinstance(settings.get(section), dict):
            raise SettingsError(f"--set {name}: these settings have no [{section}] table")
        settings[section][key.strip()] = _parse_value(text.strip())
    return _checked(settings, lambda section, key: "--set") if overrides else settings
