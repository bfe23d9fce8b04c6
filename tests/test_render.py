"""Issue 2: every answer combination renders a valid workspace; bad answers are refused."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import CATALOG, MODES, PLATFORMS, REPO, invalid_combinations, render, render_matrix
from tuner.settings import load_settings
from tuner.training.olive import olive_config

BIN = Path(sys.executable).parent
LEFTOVER = re.compile(r"\{\{|\{%|%\}|<placeholder>")
# `}}` closes nested dicts in Python and JSON; elsewhere it can only be a leftover.
LEFTOVER_TEXT = re.compile(r"\{\{|\{%|%\}|\}\}|<placeholder>")
CANARIES = {"HF_TOKEN": "hf_canaryTOKEN1234567890", "FINETUNE_API_KEY": "sk-canary-api-key-0987"}
MATRIX = render_matrix()


def text_files(ws: Path) -> list[Path]:
    return [p for p in ws.rglob("*") if p.is_file() and ".git" not in p.parts and p.suffix not in {".png"}]


def check_workspace(ws: Path, user_text_files: tuple[str, ...] = ()) -> None:
    """What must hold for every render."""
    for path in text_files(ws):
        text = path.read_text("utf-8")
        # Only files whose format *is* Jinja (a chat template) may hold Jinja markers.
        if path.suffix != ".jinja" and path.name not in user_text_files:
            pattern = LEFTOVER if path.suffix in {".py", ".json"} else LEFTOVER_TEXT
            assert not pattern.search(text), f"unrendered marker in {path.relative_to(ws)}"
        for secret in CANARIES.values():
            assert secret not in text, f"secret in {path.relative_to(ws)}"
        if path.suffix == ".json":
            json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M) if path.parent.name == ".devcontainer" else text)
        elif path.suffix in {".yml", ".yaml"}:
            yaml.safe_load(text)
        elif path.suffix == ".toml":
            tomllib.loads(text)
        elif path.suffix == ".py":
            compile(text, str(path), "exec")
    answers = yaml.safe_load((ws / ".copier-answers.yml").read_text("utf-8"))
    assert answers["model"] and answers["platform"] and answers["mode"]
    for cmd in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        ruff = subprocess.run([str(BIN / "ruff"), *cmd], cwd=ws, capture_output=True, text=True)
        assert ruff.returncode == 0, ruff.stdout + ruff.stderr


@pytest.fixture(autouse=True)
def _canaries(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)


def test_matrix_is_generated_from_the_catalog() -> None:
    assert {m for m, _, _ in MATRIX} == {m["id"] for m in CATALOG}
    assert len(MATRIX) + 3 * len(invalid_combinations()) == len(CATALOG) * len(PLATFORMS) * len(MODES)
    assert ("meta-llama/Llama-3.1-8B-Instruct", "cpu", "local") not in MATRIX


def test_no_model_name_in_code() -> None:
    """No code of the workspace (tests aside) and no settings template treats a model by its
    name: what a model needs (threads, logging steps, ...) is a field of its catalog entry."""
    ids = {m["id"] for m in CATALOG}
    for path in (REPO / "template").rglob("*.py"):
        if "tests" in path.relative_to(REPO / "template").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Constant) and node.value in ids:
                raise AssertionError(f"{path.relative_to(REPO)}:{node.lineno} names the model {node.value!r}")
    settings = (REPO / "template" / "settings.toml.jinja").read_text("utf-8")
    assert not [i for i in ids if f"'{i}'" in settings or f'"{i}"' in settings]


@pytest.mark.parametrize(("model", "platform", "mode"), MATRIX, ids=["-".join(c) for c in MATRIX])
def test_render(template_src: Path, tmp_path: Path, model: str, platform: str, mode: str) -> None:
    ws = render(template_src, tmp_path / "ws", model=model, platform=platform, mode=mode)
    check_workspace(ws)
    settings = tomllib.loads((ws / "settings.toml").read_text("utf-8"))
    assert settings["model"]["id"] == model and settings["model"]["platform"] == platform
    assert (ws / "infra").is_dir() == (mode != "local")
    assert ("azure" in settings) == (mode != "local"), "[azure] only where infra/remote.py reads it"
    assert (ws / "dataset" / "sample.jsonl").is_file()
    config = olive_config(load_settings(ws / "settings.toml"), ws, "check")
    (finetune,) = config["passes"].values()
    assert finetune["type"] == ("LoRA" if platform == "cpu" else "QLoRA")
    info = next(m for m in CATALOG if m["id"] == model)
    assert finetune["target_modules"] == info["lora_targets"]
    # What a model needs beyond the defaults comes from its catalog entry (test_no_model_name_in_code).
    assert settings["model"]["threads"] == info.get("threads", 0)
    for key, default in (("logging_steps", 10), ("save_steps", 100), ("eval_steps", 100)):
        assert settings["train"][key] == info["finetune"].get(key, default), key
    variant = ((info["onnx"] or {}).get("variants") or {}).get(platform, "")
    assert settings["onnx"]["variant"] == variant and settings["onnx"]["repo"] == (info["onnx"] or {}).get("repo", "")


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("mode", MODES)
def test_every_script_answers_help(render_factory, platform: str, mode: str) -> None:
    ws = render_factory(model="tiny-random", platform=platform, mode=mode)
    # Every script; the package's modules (tuner/) and Olive's user script are not scripts.
    scripts = sorted(
        p for p in ws.rglob("*.py") if not {"tests", "tuner"} & set(p.parts) and p.name != "user_script.py"
    )
    assert scripts
    for script in scripts:
        run = subprocess.run([sys.executable, str(script), "--help"], cwd=ws, capture_output=True, text=True)
        assert run.returncode == 0 and "usage" in run.stdout.lower(), f"{script}: {run.stderr[-2000:]}"


@pytest.mark.parametrize(("model", "platform", "mode"), invalid_combinations())
def test_validators_refuse_invalid_combinations(template_src: Path, tmp_path: Path, model, platform, mode) -> None:
    with pytest.raises(ValueError, match=f"not sensible on platform {platform}"):
        render(template_src, tmp_path / "ws", model=model, platform=platform, mode=mode)
    assert not (tmp_path / "ws" / "settings.toml").exists()


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({"project_name": ""}, "project_name must not be empty"),
        ({"project_name": "a/b"}, "project_name"),
        ({"project_name": "x" * 65}, "64 at most"),
        ({"project_name": 'quote"s'}, "may only contain"),
        ({"project_name": "$(rm -rf ~)"}, "may only contain"),
        ({"project_name": "{{ 7*7 }}"}, "may only contain"),
        ({"project_name": "two\nlines"}, "may only contain"),
        ({"customize_training": True, "lora_r": 0}, "lora_r must be between"),
        ({"customize_training": True, "learning_rate": -1.0}, "learning_rate must be above 0"),
        ({"customize_training": True, "eval_split": 0.9}, "eval_split must be between"),
        ({"customize_training": True, "max_steps": 0}, "max_steps must be -1"),
        ({"customize_training": True, "max_seq_len": 10**7}, "context length"),
        ({"env_name": "my env"}, "env_name"),
        ({"env_name": "a/b"}, "env_name"),
        ({"dataset_source": "local", "dataset_path": "data.txt"}, "must end in .json, .jsonl or .csv"),
        ({"dataset_source": "huggingface", "dataset_hf_id": "not a valid id"}, "dataset_hf_id"),
        ({"dataset_source": "local", "dataset_path": "d.csv", "text_template": "no columns"}, "text_template"),
        ({"mode": "remote", "azure_region": "West Europe"}, "azure_region"),
    ],
)
def test_bad_answers_are_refused_with_a_message(template_src: Path, tmp_path: Path, answers, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        render(template_src, tmp_path / "ws", **answers)


def test_qlora_on_cpu_is_an_answer_like_any_other(template_src: Path, tmp_path: Path) -> None:
    """bitsandbytes runs 4-bit on the CPU: QLoRA is no longer refused there (slow, but real)."""
    ws = render(template_src, tmp_path / "ws", model="tiny-random", platform="cpu", method="qlora")
    assert load_settings(ws / "settings.toml")["train"]["method"] == "qlora"
    assert "bitsandbytes==" in (ws / "setup" / "requirements-cpu.txt").read_text("utf-8")


def test_hyperparameters_are_asked_only_when_customizing(template_src: Path, tmp_path: Path) -> None:
    """Training hyperparameters stay behind customize_training; either way they land in [train]."""
    default = render(template_src, tmp_path / "a", model="tiny-random", platform="cpu")
    answers = yaml.safe_load((default / ".copier-answers.yml").read_text("utf-8"))
    assert answers["customize_training"] is False and "lora_r" not in answers
    custom = render(
        template_src, tmp_path / "b", model="tiny-random", platform="cpu", customize_training=True, lora_r=8
    )
    assert yaml.safe_load((custom / ".copier-answers.yml").read_text("utf-8"))["lora_r"] == 8
    for ws, r in ((default, 16), (custom, 8)):
        assert load_settings(ws / "settings.toml")["train"]["lora_r"] == r


HOSTILE = 'He said "hi" \\ C:\\path\nnew line\ttab — café 日本語 😀 {{ 7*7 }} {% x %} $(rm -rf ~) `id` ../../etc'


def test_hostile_free_text_lands_literally(template_src: Path, tmp_path: Path) -> None:
    ws = render(
        template_src,
        tmp_path / "ws",
        model="tiny-random",
        platform="cpu",
        project_name="Café 2 ünïcode-test.v1",
        system_prompt=HOSTILE,
        dataset_source="local",
        dataset_path='../data dir/my "odd" file\'s.jsonl',
        input_columns=["phrase", "ctx col"],
        target_column="tone",
        text_template="Phrase: {phrase} / {ctx col} " + HOSTILE,
    )
    settings = tomllib.loads((ws / "settings.toml").read_text("utf-8"))
    assert settings["prompt"]["system"] == HOSTILE
    assert settings["prompt"]["text_template"] == "Phrase: {phrase} / {ctx col} " + HOSTILE
    assert settings["dataset"]["path"] == '../data dir/my "odd" file\'s.jsonl'
    assert settings["dataset"]["input_columns"] == ["phrase", "ctx col"]
    answers = yaml.safe_load((ws / ".copier-answers.yml").read_text("utf-8"))
    assert answers["system_prompt"] == HOSTILE
    # The files still parse, compile and lint; the Jinja-looking text lives on, literally,
    # only in the two files that hold the user's own text.
    check_workspace(ws, user_text_files=("settings.toml", ".copier-answers.yml"))


def test_cli_renders_without_trust(template_src: Path, tmp_path: Path) -> None:
    run = subprocess.run(
        [str(BIN / "copier"), "copy", "--defaults", "--data", "model=tiny-random", "--data", "platform=cpu"]
        + ["--data", "mode=both", str(template_src), str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "ws" / "settings.toml").is_file() and (tmp_path / "ws" / "infra").is_dir()


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_update_keeps_user_edits_and_brings_template_changes(template_src: Path, tmp_path: Path) -> None:
    from copier import run_copy, run_update

    tpl = tmp_path / "tpl"
    shutil.copytree(template_src, tpl)
    git(tpl, "init", "-q", "-b", "main")
    git(tpl, "add", "-A")
    git(tpl, "commit", "-qm", "v1")
    git(tpl, "tag", "v0.1.0")
    ws = tmp_path / "ws"
    run_copy(str(tpl), str(ws), data={"model": "tiny-random", "platform": "cpu"}, defaults=True, quiet=True)
    git(ws, "init", "-q", "-b", "main")
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "rendered")
    # The user edits a generated file...
    settings = ws / "settings.toml"
    settings.write_text(settings.read_text("utf-8").replace("max_new_tokens = 128", "max_new_tokens = 42"), "utf-8")
    git(ws, "commit", "-qam", "my edit")
    # ...and the template gains a change elsewhere.
    gitignore = tpl / "template" / ".gitignore"
    gitignore.write_text(gitignore.read_text("utf-8") + "# added in v0.2.0\nwandb/\n", "utf-8")
    # ...and in the same file, on another line.
    tpl_settings = tpl / "template" / "settings.toml.jinja"
    tpl_settings.write_text(tpl_settings.read_text("utf-8").replace("top_k = 50", "top_k = 40"), "utf-8")
    git(tpl, "commit", "-qam", "v2")
    git(tpl, "tag", "v0.2.0")
    # No --trust: the template has no tasks, extensions or migrations.
    run_update(str(ws), defaults=True, overwrite=True, quiet=True, unsafe=False)
    text = settings.read_text("utf-8")
    assert "max_new_tokens = 42" in text and "top_k = 40" in text and "<<<<<<<" not in text
    assert "wandb/" in (ws / ".gitignore").read_text("utf-8")
    assert yaml.safe_load((ws / ".copier-answers.yml").read_text("utf-8"))["_commit"] == "v0.2.0"
