"""tuner/settings.py: settings.toml is read by every script through one function: a broken file (a
`copier update` conflict, invalid TOML) stops each script with one line naming the file and the
line; `--set` overrides and [train] values are checked before anything runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_py, set_train
from tuner.settings import SettingsError, load_settings, with_overrides

SCRIPTS = [
    "finetuning/invoke_olive.py",
    "finetuning/evaluate_adapter.py",
    "setup/download_model.py",
    "setup/download_onnx.py",
    "inference/console_chat.py",
    "inference/gradio_chat.py",
    "inference/export_onnx.py",
]

CONFLICT = """<<<<<<< before updating
max_new_tokens = 128
=======
max_new_tokens = 256
>>>>>>> after updating
"""


@pytest.fixture(scope="module")
def broken(render_factory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    src = render_factory(model="tiny-random", platform="cpu", mode="local")
    workspaces = {}
    for name in ("conflict", "invalid"):
        ws = tmp_path_factory.mktemp(name) / "ws"
        shutil.copytree(src, ws)
        text = (ws / "settings.toml").read_text("utf-8")
        if name == "conflict":
            text = text.replace("max_new_tokens = 128\n", CONFLICT)
        else:
            text = text.replace("max_new_tokens = 128", "max_new_tokens = = 128")
        (ws / "settings.toml").write_text(text, "utf-8")
        workspaces[name] = ws
    return workspaces


def line_of(ws: Path, start: str) -> int:
    return next(n for n, line in enumerate((ws / "settings.toml").read_text().split("\n"), 1) if line.startswith(start))


@pytest.mark.parametrize("kind", ["conflict", "invalid"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_broken_settings_give_one_line_with_the_line_number(broken: dict[str, Path], script: str, kind: str) -> None:
    ws = broken[kind]
    run = run_py(ws, script)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1, run.stderr
    if kind == "conflict":
        line = line_of(ws, "<<<<<<<")
        assert f"settings.toml:{line}: a conflict marker left by `copier update`" in run.stderr
        assert "delete the <<<<<<< ======= >>>>>>> lines" in run.stderr
    else:
        assert "settings.toml: invalid TOML:" in run.stderr
        assert f"(at line {line_of(ws, 'max_new_tokens')}, column" in run.stderr


BAD_OVERRIDES = [
    ("train.lora_r=0", "[train] lora_r = 0 is not valid: it must be a whole number from 1 to 1024"),
    ("train.lr=1", "[train] has no setting 'lr'"),
    ("train.method=full", '[train] method = "full" is not valid: it must be one of "lora", "qlora"'),
    ("train.gradient_checkpointing=yes", "it must be true or false"),
    ("chat.max_new_tokens=many", "expected a value of the same kind as 128"),
    ("nosuch.key=1", "settings.toml has no [nosuch] table"),
    ("learning_rate=1", "write section.key=value"),
]


@pytest.mark.parametrize(("override", "message"), BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_overrides_are_refused(render_factory, override: str, message: str) -> None:
    settings = load_settings(render_factory(model="tiny-random", platform="cpu", mode="local") / "settings.toml")
    with pytest.raises(SettingsError) as err:
        with_overrides(settings, [override])
    assert message in str(err.value)


def test_overrides_keep_kinds_and_leave_the_loaded_settings_alone(render_factory) -> None:
    settings = load_settings(render_factory(model="tiny-random", platform="cpu", mode="local") / "settings.toml")
    changed = with_overrides(settings, ["chat.temperature=1", 'train.target_modules=["q_proj"]', "train.method=lora"])
    assert changed["chat"]["temperature"] == 1.0 and isinstance(changed["chat"]["temperature"], float)
    assert changed["train"]["target_modules"] == ["q_proj"]
    assert settings["chat"]["temperature"] == 0.0


def test_an_invalid_train_value_stops_a_run_in_one_line(render_factory, tmp_path: Path) -> None:
    """Before any model is loaded: a bad --set, or a bad value in the file itself."""
    ws = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform="cpu", mode="local"), ws)
    run = run_py(ws, "finetuning/invoke_olive.py", "--set", "train.learning_rate=2")
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "[train] learning_rate = 2 is not valid: it must be a number above 0, at most 1" in run.stderr
    set_train(ws, lora_dropout=1.5)
    run = run_py(ws, "finetuning/invoke_olive.py")
    assert run.returncode == 1 and run.stderr.strip() == (
        "error: [train] lora_dropout = 1.5 is not valid: it must be a number from 0 up to (not including) 1"
    )
    assert not (ws / "models").exists()
