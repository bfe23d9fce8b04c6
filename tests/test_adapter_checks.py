"""A damaged adapter, or one made for another model, is one line naming the adapter folder and
the fix (fine-tune again), never a traceback: in the engine's loader (load_adapter, shared with
the held-out evaluation) and in every front-end that loads it after the base model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import free_port, run_py

HINT = "fine-tune again: python finetuning/invoke_olive.py"
WEIGHTS = "adapter_model.safetensors"


def _truncate(adapter: Path) -> None:
    path = adapter / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(adapter: Path) -> None:
    (adapter / WEIGHTS).write_bytes(b"")


def _broken_config(adapter: Path) -> None:
    (adapter / "adapter_config.json").write_text('{"r": 16,', "utf-8")


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(adapter: Path) -> None:
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text("utf-8")) | changes), "utf-8")

    return edit


def _renamed_weights(adapter: Path) -> None:
    """Weights under names of another architecture: peft only warns, and answers as the base."""
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter / WEIGHTS)
    save_file({key.replace(".layers.", ".blocks."): value for key, value in weights.items()}, adapter / WEIGHTS)


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, WEIGHTS),
    "empty": (_empty, WEIGHTS),
    "config-not-json": (_broken_config, "adapter_config.json"),
    "other-target-modules": (_edit_config(target_modules=["c_attn"]), "does not fit the base model"),
    "other-rank": (_edit_config(r=32), "size mismatch"),
    "other-weight-names": (_renamed_weights, "LoRA weights"),
}


@pytest.fixture(scope="module")
def damaged(tuned_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A copy of the tuned workspace (the model, not its checkpoints) with its adapter damaged."""
    made: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in made:
            ws = tmp_path_factory.mktemp(kind) / "ws"
            shutil.copytree(tuned_workspace, ws, ignore=shutil.ignore_patterns("checkpoints", "olive-cache", "runs"))
            DAMAGE[kind][0](ws / "models" / "adapter")
            made[kind] = ws
        return made[kind]

    return make


def one_error_line(stderr: str) -> str:
    """The error line of a script that failed; libraries may log progress before it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-3000:]
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", DAMAGE)
def test_load_adapter_refuses_in_one_line(damaged: Callable[[str], Path], kind: str) -> None:
    from transformers import AutoModelForCausalLM
    from tuner.serving.engine import EngineError
    from tuner.serving.hf import load_adapter

    ws = damaged(kind)
    model = AutoModelForCausalLM.from_pretrained(ws / "model-cache" / "tiny-random")
    with pytest.raises(EngineError) as caught:
        load_adapter(model, ws / "models" / "adapter")
    message = str(caught.value)
    assert "\n" not in message and str(ws / "models" / "adapter") in message, message
    assert DAMAGE[kind][1] in message and message.endswith(HINT), message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "kind"),
    [
        ("inference/console_chat.py", "truncated"),
        ("inference/console_chat.py", "other-rank"),
        ("inference/gradio_chat.py", "empty"),
        ("inference/gradio_chat.py", "other-target-modules"),
        ("finetuning/evaluate_adapter.py", "truncated"),
        ("finetuning/evaluate_adapter.py", "other-weight-names"),
    ],
)
def test_front_ends_refuse_a_damaged_adapter_in_one_line(
    damaged: Callable[[str], Path], script: str, kind: str
) -> None:
    ws = damaged(kind)
    args = {
        "inference/console_chat.py": ["--prompt", "hello"],
        "inference/gradio_chat.py": ["--port", str(free_port())],
    }
    result = run_py(ws, script, *args.get(script, []), timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert str(ws / "models" / "adapter") in line and DAMAGE[kind][1] in line and HINT in line, line


@pytest.mark.slow
def test_a_good_adapter_still_loads(tuned_workspace: Path) -> None:
    """The checks accept what the fine-tune writes (the engine tests use it merged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tuner.serving.hf import load_adapter

    model = AutoModelForCausalLM.from_pretrained(tuned_workspace / "model-cache" / "tiny-random")
    assert isinstance(load_adapter(model, tuned_workspace / "models" / "adapter"), PeftModel)
