"""tuner/settings.py: settings.toml is read by every script through one function, which checks every
table (each setting's type, range or choices, default): a broken file (a `copier update` conflict,
invalid TOML, a value that is not allowed) stops each script with one line naming the file, the
line and the setting; `--set` overrides are checked the same way; every script has --settings and
--set and ends through run_script (one `error:` line, exit code 1, 2 for a bad dataset, 130 on Ctrl-C)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from conftest import PYTHON, run_py, set_train
from tuner.settings import SettingsError, check_settings, check_value, dump_settings, load_settings, with_overrides

# Every entry script, with the arguments it needs to get as far as reading the settings.
SCRIPTS = {
    "setup/build_tiny_model.py": [],
    "setup/download_model.py": [],
    "setup/download_onnx.py": [],
    "finetuning/invoke_olive.py": [],
    "finetuning/train_sft.py": [],
    "finetuning/evaluate_adapter.py": [],
    "inference/console_chat.py": ["--prompt", "hi"],
    "inference/gradio_chat.py": ["--port", "0"],
    "inference/export.py": ["--format", "onnx"],
    "infra/remote.py": ["status"],
}

CONFLICT = """<<<<<<< before updating
max_new_tokens = 128
=======
max_new_tokens = 256
>>>>>>> after updating
"""
EDITS = {
    "conflict": ("max_new_tokens = 128\n", CONFLICT),
    "invalid": ("max_new_tokens = 128", "max_new_tokens = = 128"),
    "value": ('backend = "torch"', 'backend = "onxx"'),
}


@pytest.fixture(scope="module")
def rendered(render_factory) -> Path:
    """tiny-random, CPU, local and Azure: a workspace with every script (infra/remote.py too)."""
    return render_factory(model="tiny-random", platform="cpu", mode="both")


@pytest.fixture(scope="module")
def settings(rendered: Path) -> dict:
    return load_settings(rendered / "settings.toml")


@pytest.fixture(scope="module")
def broken(rendered: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    workspaces = {}
    for name, (old, new) in EDITS.items():
        ws = tmp_path_factory.mktemp(name) / "ws"
        shutil.copytree(rendered, ws)
        text = (ws / "settings.toml").read_text("utf-8")
        assert text.count(old) == 1, old
        (ws / "settings.toml").write_text(text.replace(old, new), "utf-8")
        workspaces[name] = ws
    return workspaces


def line_of(path: Path, start: str) -> int:
    return next(n for n, line in enumerate(path.read_text("utf-8").split("\n"), 1) if line.startswith(start))


def one_error_line(run: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert run.returncode == code and "Traceback" not in run.stderr, (run.returncode, run.stderr[-3000:])
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), run.stderr
    return run.stderr.strip()


def test_every_entry_script_is_checked_here(rendered: Path) -> None:
    found = {
        p.relative_to(rendered).as_posix()
        for d in ("setup", "finetuning", "inference", "infra")
        for p in (rendered / d).glob("*.py")
    }
    assert found - {"finetuning/user_script.py"} == set(SCRIPTS)  # user_script.py: Olive's, not a command


@pytest.mark.parametrize("kind", list(EDITS))
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_broken_settings_file_is_one_line_with_the_line_number(
    broken: dict[str, Path], script: str, kind: str
) -> None:
    ws = broken[kind]
    path = ws / "settings.toml"
    line = one_error_line(run_py(ws, script, *SCRIPTS[script]))
    if kind == "conflict":
        assert f"settings.toml:{line_of(path, '<<<<<<<')}: a conflict marker left by `copier update`" in line
        assert "delete the <<<<<<< ======= >>>>>>> lines" in line
    elif kind == "invalid":
        assert "settings.toml: invalid TOML:" in line and f"(at line {line_of(path, 'max_new_tokens')}, column" in line
    else:
        assert line == (
            f'error: {path}:{line_of(path, "backend = ")}: chat.backend = "onxx" is not valid: '
            'it must be one of "torch", "onnx", "gguf"'
        )


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_script_takes_set_and_checks_it(rendered: Path, script: str) -> None:
    """Refused by the settings' check, not by argparse: the script has --set, and checks every table."""
    line = one_error_line(run_py(rendered, script, *SCRIPTS[script], "--set", "chat.backend=onxx"))
    assert line == 'error: --set: chat.backend = "onxx" is not valid: it must be one of "torch", "onnx", "gguf"'


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_no_script_takes_an_abbreviated_option(rendered: Path, script: str) -> None:
    """argparse would take --setting (or --set, where a script lacked it) for --settings."""
    run = run_py(rendered, script, *SCRIPTS[script], "--setting", "other.toml")
    assert run.returncode == 2 and "unrecognized arguments: --setting" in run.stderr, run.stderr


def test_set_changes_what_a_script_does(rendered: Path) -> None:
    run = run_py(
        rendered, "setup/download_onnx.py", "--dry-run", "--set", "onnx.repo=org/m", "--set", "onnx.variant=cpu"
    )
    assert run.returncode == 0 and run.stdout.startswith("would download org/m files cpu/* to"), run.stderr


def test_a_byte_order_mark_is_accepted(rendered: Path, settings: dict, tmp_path: Path) -> None:
    """Some Windows editors start a UTF-8 file with one."""
    ws = tmp_path / "ws"
    shutil.copytree(rendered, ws)
    path = ws / "settings.toml"
    path.write_text("\ufeff" + path.read_text("utf-8"), "utf-8")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_settings(path) == settings
    run = run_py(ws, "setup/download_onnx.py", "--dry-run", "--set", "onnx.repo=org/m", "--set", "onnx.variant=cpu")
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------- each check, and what it says

# (--set item, the whole message): one example of every kind of check, in every table.
REFUSED = [
    ("chat.backend=onxx", 'chat.backend = "onxx" is not valid: it must be one of "torch", "onnx", "gguf"'),
    ('chat.backend="ONNX"', 'chat.backend = "ONNX" is not valid: it must be one of "torch", "onnx", "gguf"'),
    ("chat.backend=1", 'chat.backend = 1 is not valid: it must be one of "torch", "onnx", "gguf"'),
    ("chat.max_new_tokens=0", "chat.max_new_tokens = 0 is not valid: it must be a whole number, 1 or more"),
    ("chat.max_new_tokens=many", 'chat.max_new_tokens = "many" is not valid: it must be a whole number, 1 or more'),
    ("chat.temperature=-1", "chat.temperature = -1 is not valid: it must be a number from 0 to 2"),
    ("chat.temperature=inf", "chat.temperature = inf is not valid: it must be a number from 0 to 2"),
    ("chat.temperature=nan", "chat.temperature = nan is not valid: it must be a number from 0 to 2"),
    ("chat.top_p=5", "chat.top_p = 5 is not valid: it must be a number above 0, at most 1"),
    ("chat.top_k=-1", "chat.top_k = -1 is not valid: it must be a whole number, 0 or more"),
    ("chat.top_k=1.5", "chat.top_k = 1.5 is not valid: it must be a whole number, 0 or more"),
    (
        "dataset.source=huggingfase",
        'dataset.source = "huggingfase" is not valid: it must be one of "sample", "local", "huggingface"',
    ),
    ("dataset.format=column", 'dataset.format = "column" is not valid: it must be one of "columns", "chat"'),
    (
        "dataset.input_columns=[1]",
        'dataset.input_columns = [1] is not valid: it must be a list of column names, like ["text"]',
    ),
    ("model.platform=tpu", 'model.platform = "tpu" is not valid: it must be one of "cuda", "windows-gpu", "cpu"'),
    ("model.path=5", "model.path = 5 is not valid: it must be a non-empty text in quotes"),
    ("model.gated=1", "model.gated = 1 is not valid: it must be true or false"),
    (
        "model.offline_sha256=abc",
        'model.offline_sha256 = "abc" is not valid: it must be "" or a sha256: 64 lowercase hex digits',
    ),
    ("prompt.system=5", "prompt.system = 5 is not valid: it must be text in quotes"),
    (
        'serve.max_request_bytes="2MB"',
        'serve.max_request_bytes = "2MB" is not valid: it must be a positive number of bytes, like 2_097_152 (2 MiB)',
    ),
    ("serve.port=65536", "serve.port = 65536 is not valid: it must be a whole number from 1 to 65535"),
    ("serve.port=0", "serve.port = 0 is not valid: it must be a whole number from 1 to 65535"),
    ("serve.vllm_port=70000", "serve.vllm_port = 70000 is not valid: it must be a whole number from 1 to 65535"),
    (
        "serve.gpu_memory_utilization=0",
        "serve.gpu_memory_utilization = 0 is not valid: it must be a number above 0, at most 1",
    ),
    (
        "serve.gpu_memory_utilization=1.5",
        "serve.gpu_memory_utilization = 1.5 is not valid: it must be a number above 0, at most 1",
    ),
    ("serve.vllm_max_model_len=0", "serve.vllm_max_model_len = 0 is not valid: it must be a whole number, 1 or more"),
    (
        'serve.api_key_env="MY KEY"',
        'serve.api_key_env = "MY KEY" is not valid: it must be an environment variable name, like "API_KEY"',
    ),
    (
        "serve.host=",
        'serve.host = "" is not valid: it must be a host to listen on: "127.0.0.1" (this machine only), '
        'or "0.0.0.0" to listen on every interface deliberately',
    ),
    ("serve.backend=tgi", 'serve.backend = "tgi" is not valid: it must be one of "engine", "vllm"'),
    ("onnx.precision=int8", 'onnx.precision = "int8" is not valid: it must be one of "int4", "fp16", "fp32"'),
    ('onnx.output_dir=""', 'onnx.output_dir = "" is not valid: it must be a non-empty text in quotes'),
    ('azure.location=""', 'azure.location = "" is not valid: it must be a non-empty text in quotes'),
    ("train.lora_r=0", "train.lora_r = 0 is not valid: it must be a whole number from 1 to 1024"),
    ("train.lora_dropout=1", "train.lora_dropout = 1 is not valid: it must be a number from 0 up to (not including) 1"),
    ("train.method=full", 'train.method = "full" is not valid: it must be one of "lora", "qlora"'),
    ("train.gradient_checkpointing=yes", 'train.gradient_checkpointing = "yes" is not valid: it must be true or false'),
    (
        "train.max_steps=0",
        "train.max_steps = 0 is not valid: it must be -1 (train for the epochs) or a positive number",
    ),
    (
        "train.target_modules=[]",
        "train.target_modules = [] is not valid: it must be a non-empty list of module names, "
        'like ["q_proj", "v_proj"]',
    ),
    ("train.seed=4294967296", "train.seed = 4294967296 is not valid: it must be a whole number from 0 to 4294967295"),
]
REFUSED_AS_IS = [  # said without the "--set: " of a value
    ("train.lr=1", "--set: train.lr is not a setting; [train] has: method, compute_dtype, quant_type, double_quant,"),
    ("nosuch.key=1", "--set nosuch.key: [nosuch] is not a table of the settings; they are: model, dataset, prompt,"),
    ("learning_rate=1", '--set "learning_rate=1": write section.key=value, like train.learning_rate=3e-4'),
    ("train.seed=1\nb", '--set "train.seed=1\\nb": a value is one line of printable text'),
]


@pytest.mark.parametrize(("override", "message"), REFUSED, ids=[o for o, _ in REFUSED])
def test_each_check_refuses_with_one_line(settings: dict, override: str, message: str) -> None:
    with pytest.raises(SettingsError) as err:
        with_overrides(settings, [override])
    assert str(err.value) == "--set: " + message


@pytest.mark.parametrize(
    ("override", "message"), REFUSED_AS_IS, ids=["unknown key", "unknown table", "no dot", "newline"]
)
def test_bad_overrides_are_refused(settings: dict, override: str, message: str) -> None:
    with pytest.raises(SettingsError) as err:
        with_overrides(settings, [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_local_workspace_has_no_azure_table(render_factory) -> None:
    settings = load_settings(render_factory(model="tiny-random", platform="cpu", mode="local") / "settings.toml")
    assert "azure" not in settings
    with pytest.raises(SettingsError, match=r"^--set azure\.location: these settings have no \[azure\] table$"):
        with_overrides(settings, ["azure.location=westus3"])


def test_overrides_keep_kinds_and_leave_the_loaded_settings_alone(settings: dict) -> None:
    changed = with_overrides(settings, ["chat.temperature=1", 'train.target_modules=["q_proj"]', "train.method=lora"])
    assert changed["chat"]["temperature"] == 1.0 and isinstance(changed["chat"]["temperature"], float)
    assert changed["train"]["target_modules"] == ["q_proj"]
    assert settings["chat"]["temperature"] == 0.0


def test_an_option_given_another_way_is_checked_as_the_setting(settings: dict) -> None:
    """gradio_chat.py --host, console_chat.py --temperature: checked as [serve] host and [chat] temperature are."""
    assert check_value(settings, "serve", "host", "0.0.0.0", "--host") == "0.0.0.0"
    assert check_value(settings, "chat", "temperature", 1, "--temperature") == 1.0
    with pytest.raises(SettingsError, match=r'^--host: serve\.host = " " is not valid: it must be a host to listen on'):
        check_value(settings, "serve", "host", " ", "--host")
    with pytest.raises(SettingsError, match=r"^--temperature: chat\.temperature = -0\.5 is not valid"):
        check_value(settings, "chat", "temperature", -0.5, "--temperature")


def test_script_options_are_checked_as_the_settings_they_replace(rendered: Path) -> None:
    line = one_error_line(run_py(rendered, "inference/console_chat.py", "--prompt", "hi", "--temperature", "-1"))
    assert line == "error: --temperature: chat.temperature = -1.0 is not valid: it must be a number from 0 to 2"
    line = one_error_line(run_py(rendered, "inference/gradio_chat.py", "--host", ""))
    assert line.startswith('error: --host: serve.host = "" is not valid: it must be a host to listen on: "127.0.0.1"')
    # --port 0 is a free port, which [serve] port cannot be; past 65535 argparse refuses it.
    run = run_py(rendered, "inference/gradio_chat.py", "--port", "70000")
    assert run.returncode == 2 and "argument --port: 70000 is not between 0 and 65535" in run.stderr, run.stderr


# ---------------------------------------------------------------- the file itself


def edited(rendered: Path, tmp_path: Path, old: str, new: str) -> Path:
    path = tmp_path / "settings.toml"
    text = (rendered / "settings.toml").read_text("utf-8")
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new), "utf-8")
    return path


def test_a_missing_key_with_a_default_gets_it(rendered: Path, settings: dict, tmp_path: Path) -> None:
    path = edited(rendered, tmp_path, "top_k = 50\n", "")
    assert load_settings(path)["chat"]["top_k"] == 50 and load_settings(path) == settings


def test_a_missing_key_without_a_default_is_refused(rendered: Path, tmp_path: Path) -> None:
    path = edited(rendered, tmp_path, 'platform = "cpu"\n', "")
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    assert str(err.value) == (
        f'{path}:{line_of(path, "[model]")}: model.platform is missing; it must be one of "cuda", "windows-gpu", "cpu"'
    )


def test_a_missing_table_is_refused(rendered: Path, tmp_path: Path) -> None:
    text = (rendered / "settings.toml").read_text("utf-8")
    start, end = text.index("[prompt]"), text.index("[train]")
    path = tmp_path / "settings.toml"
    path.write_text(text[:start] + text[end:], "utf-8")
    with pytest.raises(SettingsError, match=rf"^{path}: the \[prompt\] table is missing$"):
        load_settings(path)


def test_an_unknown_key_or_table_is_refused(rendered: Path, tmp_path: Path) -> None:
    path = edited(rendered, tmp_path, "top_k = 50\n", "top_k = 50\ncolour = 1\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    assert str(err.value) == (
        f"{path}:{line_of(path, 'colour')}: chat.colour is not a setting; [chat] has: backend, max_new_tokens, "
        "temperature, top_p, top_k"
    )
    path = edited(rendered, tmp_path, "[chat]\n", "[extra]\nx = 1\n\n[chat]\n")
    with pytest.raises(SettingsError, match=rf"^{path}:{line_of(path, '[extra]')}: \[extra\] is not a table of the"):
        load_settings(path)


def test_whole_numbers_where_numbers_are_expected_become_floats(rendered: Path, tmp_path: Path) -> None:
    path = edited(rendered, tmp_path, "temperature = 0.0", "temperature = 1")
    assert repr(load_settings(path)["chat"]["temperature"]) == "1.0"
    assert repr(load_settings(path)["train"]["num_train_epochs"]) == "10.0"  # written 10 in the file


def test_a_train_value_in_the_file_stops_a_run_in_one_line(rendered: Path, tmp_path: Path) -> None:
    """Before any model is loaded: a bad --set, or a bad value in the file itself."""
    ws = tmp_path / "ws"
    shutil.copytree(rendered, ws)
    line = one_error_line(run_py(ws, "finetuning/invoke_olive.py", "--set", "train.learning_rate=2"))
    assert line == "error: --set: train.learning_rate = 2 is not valid: it must be a number above 0, at most 1"
    set_train(ws, lora_dropout=1.5)
    line = one_error_line(run_py(ws, "finetuning/invoke_olive.py"))
    path = ws / "settings.toml"
    assert line == (
        f"error: {path}:{line_of(path, 'lora_dropout')}: train.lora_dropout = 1.5 is not valid: "
        "it must be a number from 0 up to (not including) 1"
    )
    assert not (ws / "models").exists()


def test_dumped_settings_read_back_the_same(settings: dict) -> None:
    """What a remote run gets when --set changed the settings (infra/remote.py --set)."""
    changed = with_overrides(settings, ['prompt.system="say \\"hi\\"\\n\\tthen \\u007f é"', "train.lora_alpha=8"])
    assert check_settings(tomllib.loads(dump_settings(changed))) == changed


# ---------------------------------------------------------------- run_script: the one error path

RUN = """
import sys
from tuner.data import DatasetError
from tuner.settings import Interrupted, SettingsError, run_script
def main():
    {body}
run_script(main)
"""


@pytest.mark.parametrize(
    ("body", "code", "stderr"),
    [
        ("raise KeyboardInterrupt", 130, "\ninterrupted\n"),
        ('raise Interrupted("interrupted: nothing was written")', 130, "error: interrupted: nothing was written\n"),
        ('raise SettingsError("a setting")', 1, "error: a setting\n"),
        ('raise DatasetError("row 2: no text")', 2, "error: row 2: no text\n"),
        ("return 3", 3, ""),
        ("return None", 0, ""),
    ],
    ids=["ctrl-c", "interrupted", "settings", "dataset", "code", "none"],
)
def test_run_script_is_the_one_error_path(rendered: Path, body: str, code: int, stderr: str) -> None:
    run = subprocess.run([PYTHON, "-c", RUN.format(body=body)], cwd=rendered, capture_output=True, text=True)
    assert (run.returncode, run.stderr) == (code, stderr)


def test_under_a_launcher_only_the_first_process_of_a_machine_says_it(rendered: Path) -> None:
    for rank, said in (("0", "error: a setting\n"), ("1", "")):
        run = subprocess.run(
            [PYTHON, "-c", RUN.format(body='raise SettingsError("a setting")')],
            cwd=rendered,
            capture_output=True,
            text=True,
            env={**os.environ, "LOCAL_RANK": rank},
        )
        assert (run.returncode, run.stderr) == (1, said)
