"""tuner/export/ollama.py: the Modelfile's TEMPLATE, rendered by Go's own text/template the way
Ollama renders it (tests/ollama_template/main.go), must give exactly what the model's own chat
template gives through transformers, for every family of the catalog.

The chat templates are the real ones: llama.cpp vendors them (models/templates/ of the converter
that tuner/export/gguf.py fetches), SmolLM2's comes with its offline copy, tiny-random's with the
workspace. Mistral v0.3's own template is not vendored: Mistral-Nemo's, of the same shape (the
system message put before the last user turn, [INST] turns, </s> after answers), stands for it.
Phi-3-mini-4k and Phi-4-mini have no copy here: their family's shape is Phi-3.5's and tiny-random's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tuner.export import ExportError
from tuner.export.gguf import converter
from tuner.export.ollama import modelfile
from tuner.settings import load_settings

GO = Path(__file__).parent / "ollama_template"
# Catalog model -> the chat template file that is its own (or its family's), from llama.cpp.
VENDORED = {
    "Qwen/Qwen2.5-0.5B-Instruct": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "meta-llama/Llama-3.2-1B-Instruct": "meta-llama-Llama-3.2-3B-Instruct.jinja",
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "microsoft/Phi-3.5-mini-instruct": "microsoft-Phi-3.5-mini-instruct.jinja",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
}
# Each family's end of an answer: what PARAMETER stop must hold.
END_OF_ANSWER = {"Qwen": "<|im_end|>", "meta-llama": "<|eot_id|>", "microsoft": "<|end|>", "mistralai": "</s>"}
BOS, EOS = "<s>", "</s>"  # the special tokens transformers renders with (Llama's are others: BOS is dropped)
SYSTEM = "Classify the tone of the phrase."
TURNS = ["The bus was late again.", "annoyed", "I won the raffle!"]


@pytest.fixture(scope="session")
def go_render(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/ollama_template built once (Go's standard library only: no network)."""
    if shutil.which("go") is None:
        pytest.fail("Go is needed to render Ollama templates: apt-get install golang-go (scripts/test.sh does)")
    out = tmp_path_factory.mktemp("go") / "ollama-template"
    cache = tmp_path_factory.mktemp("go-cache")
    env = {**os.environ, "GOCACHE": str(cache), "GOTOOLCHAIN": "local"}  # never a toolchain download
    done = subprocess.run(["go", "build", "-o", str(out), "."], cwd=GO, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="session")
def llama_templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converter(tmp_path_factory.mktemp("llama.cpp")).parent / "models" / "templates"


def transformers_render(chat_template: str, messages: list[dict[str, str]]) -> str:
    """What transformers feeds the model: apply_chat_template with the generation prompt, and
    without the BOS that llama.cpp's tokenizer adds itself."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), bos_token=BOS, eos_token=EOS
    )
    text = tok.apply_chat_template(messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True)
    return text.removeprefix(BOS)


def ollama_render(go_render: Path, file: str, messages: list[dict[str, str]]) -> str:
    """As Ollama's chat: the Modelfile's SYSTEM first when the request has no system message."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', file, re.S | re.M).group(1)  # type: ignore[union-attr]
    system = re.search(r'^SYSTEM """(.*?)"""$', file, re.S | re.M)
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system.group(1)}, *messages]
    done = subprocess.run(
        [str(go_render)], input=json.dumps({"template": template, "messages": messages}), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def chat(system: str, turns: list[str]) -> list[dict[str, str]]:
    roles = ["user", "assistant"] * len(turns)
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]


def settings_of(ws: Path, **prompt: str) -> dict[str, Any]:
    settings = load_settings(ws / "settings.toml")
    settings["prompt"].update(prompt)
    return settings


def check_family(go_render: Path, settings: dict[str, Any], chat_template: str, end: str) -> str:
    settings["prompt"]["system"] = ""  # no SYSTEM: Ollama would put it into the conversations below
    file = modelfile(settings, "model-q8_0.gguf", chat_template)
    assert file.splitlines()[1] == "FROM ./model-q8_0.gguf"
    # System + two turns + the generation prompt; without a system message; one turn.
    for messages in (chat(SYSTEM, TURNS), chat("", TURNS), chat(SYSTEM, TURNS[:1])):
        assert ollama_render(go_render, file, messages) == transformers_render(chat_template, messages), messages
    # The end of an answer in this template is a stop: the model's answer ends there in Ollama.
    assert f"PARAMETER stop {json.dumps(end)}" in file
    assert transformers_render(chat_template, chat("", TURNS)).split(TURNS[1], 1)[1].startswith(end)
    return file


@pytest.mark.parametrize("model", list(VENDORED))
def test_template_of_each_family(model: str, go_render: Path, llama_templates: Path, render_factory) -> None:
    ws = render_factory(model="tiny-random", platform="cpu", mode="local")
    template = (llama_templates / VENDORED[model]).read_text("utf-8")
    file = check_family(go_render, settings_of(ws), template, END_OF_ANSWER[model.split("/")[0]])
    if model.startswith("meta-llama"):
        assert "<|begin_of_text|>" not in file  # llama.cpp adds the BOS: twice would be off-distribution


def test_template_of_smollm2_and_tiny_random(go_render: Path, smol_base: Path, render_factory) -> None:
    smol = settings_of(smol_base)
    smol_template = (smol_base / smol["model"]["path"] / "chat_template.jinja").read_text("utf-8")
    check_family(go_render, smol, smol_template, "<|im_end|>")
    tiny = render_factory(model="tiny-random", platform="cpu", mode="local")
    check_family(go_render, settings_of(tiny), (tiny / "setup" / "chat_template.jinja").read_text("utf-8"), "<|end|>")


def test_modelfile_system_sampling_and_the_training_prompt(go_render: Path, smol_base: Path) -> None:
    """SYSTEM is [prompt] system and reaches the model as in training; the user turn is put into
    [prompt] text_template, so `ollama run` takes the bare input; [chat] sampling as PARAMETERs."""
    from tuner.data import user_message

    settings = settings_of(smol_base, text_template="Phrase: {phrase}\nTone?")
    settings["chat"].update(temperature=0.3, top_p=0.9, top_k=20, max_new_tokens=32)
    template = (smol_base / settings["model"]["path"] / "chat_template.jinja").read_text("utf-8")
    file = modelfile(settings, "m.gguf", template)
    assert f'SYSTEM """{settings["prompt"]["system"]}"""' in file
    for line in ("temperature 0.3", "top_p 0.9", "top_k 20", "num_predict 32"):
        assert f"PARAMETER {line}\n" in file
    typed = chat("", ["The bus was late again.", "annoyed", "I won the raffle!"])
    trained = [{"role": "system", "content": settings["prompt"]["system"]}] + [
        {**m, "content": user_message(m["content"], settings)} if m["role"] == "user" else m for m in typed
    ]
    assert ollama_render(go_render, file, typed) == transformers_render(template, trained)
    settings["prompt"]["system"] = ""
    assert "SYSTEM" not in modelfile(settings, "m.gguf", template)


def test_templates_it_cannot_write_are_refused(smol_base: Path) -> None:
    settings = settings_of(smol_base)
    # The system message after the turns, and one whose turns depend on their position.
    for template in (
        "{% for m in messages if m.role != 'system' %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if messages[0].role == 'system' %}[{{ messages[0].content }}]{% endif %}<assistant>",
        "{% for m in messages %}{{ loop.index }}:{{ m.content }};{% endfor %}",
    ):
        with pytest.raises(ExportError, match="cannot write an Ollama TEMPLATE for this chat template"):
            modelfile(settings, "m.gguf", template)
