"""ONNX Runtime GenAI: the fine-tuned adapter exported for onnxruntime-genai (inference/export.py --format
onnx, tuner/export/onnx.py) and the engine on it (tuner/serving/ort.py), checked against transformers +
peft. The published builds are tests/test_hub.py's."""

from __future__ import annotations

import contextlib
import json
import re
import runpy
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, killed_at_swap, run_py
from tuner.settings import load_settings

# ---------------------------------------------------------------- export and engine (slow)
# In this process: the package (template/tuner) with a workspace's settings and root.


def in_workspace(ws: Path) -> tuple[dict, Path]:
    return load_settings(ws / "settings.toml"), ws


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """tiny-random's matrices are tiny: one thread is faster and gives steady numbers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def first_token_diffs(ws: Path, base: Any = None) -> dict[str, float]:
    """max |logits| difference of the first answer token: onnxruntime-genai vs transformers + peft
    on `base` (default: the base model's folder in float32)."""
    import numpy as np
    import onnxruntime_genai as og
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tuner.data import load_rows, split_rows, to_messages

    settings, root = in_workspace(ws)
    model_path = root / settings["model"]["path"]
    tok = AutoTokenizer.from_pretrained(model_path)
    if base is None:
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, root / "models" / "adapter").eval()
    onnx_dir = root / "models" / "onnx" / "fp32"
    models = {"adapter": og.Model(str(onnx_dir)), "merged": og.Model(str(onnx_dir / "merged"))}
    adapters = og.Adapters(models["adapter"])
    adapters.load(str(onnx_dir / "adapter.onnx_adapter"), "finetuned")

    def first_logits(model: og.Model, ids: list[int], adapter: bool) -> np.ndarray:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1)
        generator = og.Generator(model, params)
        if adapter:
            generator.set_active_adapter(adapters, "finetuned")
        generator.append_tokens(np.array([ids], dtype=np.int32))
        logits = generator.get_output("logits")
        return logits.reshape(-1, logits.shape[-1])[-1]

    train, _ = split_rows(load_rows(settings, root), 0.1, 42)
    diffs = {"adapter": 0.0, "merged": 0.0, "base": 0.0}
    for row in train[:8]:
        text = tok.apply_chat_template(to_messages(row, settings)[:-1], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            ref = tuned(torch.tensor([ids])).logits[0, -1].numpy()
            with tuned.disable_adapter():
                ref_base = tuned(torch.tensor([ids])).logits[0, -1].numpy()
        for name, model, adapter, want in (
            ("adapter", models["adapter"], True, ref),
            ("merged", models["merged"], False, ref),
            ("base", models["adapter"], False, ref_base),
        ):
            diffs[name] = max(diffs[name], float(np.abs(first_logits(model, ids, adapter) - want).max()))
    return diffs


def tone_answers(ws: Path, precision: str) -> dict:
    """Greedy answers on the training phrases, with and without the adapter."""
    from tuner.data import load_rows, split_rows, to_messages
    from tuner.serving.ort import OnnxEngine

    settings, root = in_workspace(ws)
    train, _ = split_rows(load_rows(settings, root), 0.1, 42)
    tones = {row["tone"] for row in train}
    result: dict = {}
    for name, baseonly in (("adapter", False), ("base", True)):
        engine = OnnxEngine(settings, root, baseonly=baseonly, precision=precision)
        right = tone = 0
        stats: dict = {}
        for row in train:
            stats = {}
            answer = "".join(engine.stream(to_messages(row, settings)[:-1], max_new_tokens=4, stats=stats)).strip()
            right += answer == row["tone"]
            tone += answer in tones
            assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0
        engine.close()
        result[name] = right / len(train)
        result[name + "_tone_word"] = tone / len(train)
        result[name + "_finish"] = stats["finish_reason"]
        result[name + "_model"] = engine.model_name
    return result


@pytest.fixture(scope="module")
def exported(tuned_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fine-tuned tiny workspace (a private copy), exported at fp32 and int4."""
    ws = tmp_path_factory.mktemp("onnx") / "ws"
    shutil.copytree(tuned_workspace, ws, ignore=shutil.ignore_patterns("olive-cache", "checkpoints"))
    for precision in ("fp32", "int4"):
        run = run_py(ws, "inference/export.py", "--format", "onnx", "--precision", precision)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert f"Exported to models/onnx/{precision}" in run.stdout
    return ws


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_export_layout(exported: Path, precision: str) -> None:
    import onnx
    import onnxruntime as ort

    out = exported / "models" / "onnx" / precision
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "adapter.onnx_adapter"):
        assert (out / name).is_file(), name
    assert (out / "merged" / "model.onnx").is_file() and (out / "merged" / "genai_config.json").is_file()
    assert not list((exported / "models" / "onnx").glob(".staging-*"))
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    assert len(inputs) == len(set(inputs))  # each adapter input listed once
    params = ort.AdapterFormat.read_adapter(str(out / "adapter.onnx_adapter")).get_parameters()
    assert params and set(params) <= set(inputs)
    lora = [n for n in graph.node if "/lora_" in n.name]
    assert lora and all(n.op_type == "MatMul" for n in lora)  # adapters stay float, also in int4
    if precision == "int4":
        assert any(n.op_type == "MatMulNBits" for n in graph.node)
    info = json.loads((out / "export.json").read_text())
    assert info["precision"] == precision and info["adapter_tensors"] == len(params)


@pytest.mark.slow
def test_fp32_first_token_logits_match_peft(exported: Path) -> None:
    with one_thread():
        diffs = first_token_diffs(exported)
    print(f"max |logits(onnxruntime-genai) - logits(transformers)|: {diffs}")
    assert diffs["adapter"] < 1e-4  # og.Adapters + .onnx_adapter vs transformers + peft
    assert diffs["merged"] < 1e-4  # merge_and_unload, then built
    assert diffs["base"] < 1e-4  # the same model with no adapter active is the base model


@pytest.mark.slow
def test_int4_adapter_answers_in_the_trained_form(exported: Path) -> None:
    """int4 + the adapter file answers with one of the six tone words, as fine-tuned; the base does
    not. (tiny-random only memorises, and how well is chaotic across machines: which tone is right
    is for the SmolLM2 tests, test_finetune.py, to measure.)"""
    with one_thread():
        result = tone_answers(exported, "int4")
    print(f"int4 greedy on training phrases: adapter {result['adapter']:.1%} right, base {result['base']:.1%}")
    assert result["adapter_tone_word"] >= 0.9, result
    assert result["base_tone_word"] <= 0.4, result
    assert result["adapter_finish"] == "stop" and result["base_finish"] in ("stop", "length")
    assert result["adapter_model"] == "tiny-random-finetuned-onnx-int4"


@pytest.mark.slow
def test_precision_setting_picks_the_export(exported: Path, tmp_path: Path) -> None:
    """[onnx] precision in settings.toml decides what `export.py --format onnx` builds and which export the
    ONNX backend loads: fp16 here, with only the int4 and fp32 exports beside it."""
    ws = tmp_path / "ws"
    shutil.copytree(exported, ws, ignore=shutil.ignore_patterns("olive-cache", "checkpoints"))
    settings = ws / "settings.toml"
    settings.write_text(settings.read_text("utf-8").replace('precision = "int4"', 'precision = "fp16"'), "utf-8")
    export = run_py(ws, "inference/export.py", "--format", "onnx", "--skip-merged")
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    assert "Exported to models/onnx/fp16" in export.stdout
    assert json.loads((ws / "models" / "onnx" / "fp16" / "export.json").read_text())["precision"] == "fp16"
    run = run_py(ws, "inference/console_chat.py", "--backend", "onnx", "--prompt", "The puppy fell asleep on my lap.")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stdout.strip(), "no answer"
    from tuner.serving.ort import OnnxEngine

    engine = OnnxEngine(*in_workspace(ws))
    assert engine.model_name.endswith("-onnx-fp16")
    engine.close()


@pytest.mark.slow
def test_stream_limits_and_stop_strings(exported: Path) -> None:
    from tuner.serving.engine import conversation
    from tuner.serving.ort import OnnxEngine

    settings, root = in_workspace(exported)
    engine = OnnxEngine(settings, root, baseonly=True, precision="fp32")
    messages = conversation([], "The puppy fell asleep on my lap again.", settings)
    stats: dict = {}
    again: dict = {}
    text = "".join(engine.stream(messages, max_new_tokens=6, stats=stats))
    assert [stats["completion_tokens"], stats["finish_reason"]] == [6, "length"]  # random: no early end
    stop = text[3:6]
    assert len(stop) == 3, text
    pieces = list(engine.stream(messages, max_new_tokens=6, stop=["never printed", stop], stats=again))
    engine.close()
    # Nothing of the stop string is ever sent, even when it spans several tokens.
    assert "".join(pieces) == text[: text.find(stop)]
    assert again["finish_reason"] == "stop"


@pytest.mark.slow
def test_missing_pieces_name_the_command(exported: Path, tmp_path: Path) -> None:
    from tuner.serving.engine import EngineError
    from tuner.serving.ort import OnnxEngine

    ws = tmp_path / "ws"
    shutil.copytree(exported, ws, ignore=shutil.ignore_patterns("onnx", "olive-cache", "checkpoints"))
    for precision, command in (
        ("int4", "python inference/export.py --format onnx"),
        ("fp16", "python inference/export.py --format onnx --precision fp16"),
    ):
        with pytest.raises(EngineError) as err:
            OnnxEngine(*in_workspace(ws), precision=precision)
        assert str(err.value) == f"ONNX model not found in {ws / 'models' / 'onnx' / precision}: run `{command}` first"
    shutil.rmtree(ws / "models" / "adapter")
    export = run_py(ws, "inference/export.py", "--format", "onnx")
    assert export.returncode == 1
    lines = export.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("run `python finetuning/invoke_olive.py` first"), export.stderr


@pytest.mark.slow
def test_baseonly_falls_back_to_the_downloaded_model(exported: Path, tmp_path: Path) -> None:
    """Without an export, --baseonly chats with the published build setup/download_onnx.py fetched
    (stood in for by the export, adapter file removed: tiny-random has no published build)."""
    from tuner.serving.engine import EngineError, conversation
    from tuner.serving.ort import OnnxEngine

    ws = tmp_path / "ws"
    shutil.copytree(exported, ws, ignore=shutil.ignore_patterns("olive-cache", "checkpoints"))
    variant = ws / "model-cache" / "onnx" / "example" / "tiny-onnx" / "cpu" / "cpu-int4"
    shutil.move(ws / "models" / "onnx" / "int4", variant)
    shutil.rmtree(ws / "models" / "onnx")
    (variant / "adapter.onnx_adapter").unlink()
    settings_path = ws / "settings.toml"
    text = re.sub(r"(?m)^\[onnx\]\n(?:(?!\[).*\n?)*", "", settings_path.read_text("utf-8"))  # drop [onnx]
    onnx = '[onnx]\nrepo = "example/tiny-onnx"\nvariant = "cpu/cpu-int4"\npath = "model-cache/onnx/example/tiny-onnx"\n'
    settings_path.write_text(text + "\n" + onnx, "utf-8")
    settings, root = in_workspace(ws)
    engine = OnnxEngine(settings, root, baseonly=True)
    stats: dict = {}
    engine.reply(conversation([], "The puppy fell asleep on my lap again.", settings), max_new_tokens=3, stats=stats)
    engine.close()
    assert engine.path == variant and stats["completion_tokens"] == 3
    with pytest.raises(EngineError, match=r"run `python inference/export.py --format onnx` first$"):
        OnnxEngine(settings, root)  # the adapter needs an export


@pytest.mark.slow
def test_bench_onnx_vs_torch(exported: Path) -> None:
    run = run_py(REPO, str(REPO / "bench" / "onnx_vs_torch.py"), str(exported), "--tokens", "32", "--repeats", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    rates = json.loads(run.stdout.strip().splitlines()[-1])["decode_tokens_per_s"]
    print("\n" + "\n".join(run.stdout.strip().splitlines()[:-1]))
    assert set(rates) == {"torch fp32 + peft", "onnx fp32 + adapter", "onnx int4 + adapter"}
    assert all(rate > 0 for rate in rates.values())


# ---------------------------------------------------------------- killed at the swap (fast)


def fake_builder(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path, str], None]:
    """inference/export.py --format onnx, run in this process with its builder steps replaced by
    writing a few files (the marker in genai_config.json), and its held-out check and model card by
    stand-ins: what is tested is where the export lands."""
    import types

    from tuner.export import check
    from tuner.export import onnx as onnx_build

    marker = [""]

    def build(model_dir: Path, out: Path, *args: object) -> None:
        out.mkdir(parents=True)
        (out / "model.onnx").write_text(marker[0])
        (out / "genai_config.json").write_text(marker[0])

    def extract_adapter(src: Path, dst: Path) -> int:
        dst.mkdir(parents=True)
        (dst / "model.onnx").write_text(marker[0])
        (dst / "adapter.onnx_adapter").write_text(marker[0])
        return 1

    monkeypatch.setattr(onnx_build, "build", build)
    monkeypatch.setattr(onnx_build, "extract_adapter", extract_adapter)
    monkeypatch.setattr(check, "check_export", lambda *args: {"exact_match": 1.0, "adapter_exact_match": 1.0})
    monkeypatch.setitem(sys.modules, "tuner.export.card", types.SimpleNamespace(model_card=lambda *args: "card"))
    monkeypatch.setattr(sys, "argv", ["export.py", "--format", "onnx", "--skip-merged", "--precision", "fp32"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def export(ws: Path, text: str) -> None:
        marker[0] = text
        runpy.run_path(str(ws / "inference" / "export.py"))["main"]()  # main(), not run_script's exit

    return export


def test_export_killed_at_the_swap_keeps_the_previous_export(
    render_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export killed between moving the last export aside and putting the new one in place:
    the last export is kept whole, and the next export run puts the new one in place."""
    ws = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform="cpu", mode="local"), ws)
    settings = ws / "settings.toml"
    # No torch thread setting in the forked child (the builder is fake: nothing computes).
    settings.write_text(re.sub(r"(?m)^threads = .*$", "threads = 0", settings.read_text()))
    for folder, name in (("model-cache/tiny-random", "config.json"), ("models/adapter", "adapter_config.json")):
        (ws / folder).mkdir(parents=True)
        (ws / folder / name).write_text("{}")
    out = ws / "models" / "onnx" / "fp32"
    export = fake_builder(monkeypatch)
    export(ws, "last")
    assert (out / "genai_config.json").read_text() == "last" and (out / "export.json").is_file()
    killed_at_swap(out, lambda: export(ws, "new"))
    previous = out.with_name("fp32.previous")
    assert not out.exists() and (previous / "genai_config.json").read_text() == "last"
    assert {p.name for p in previous.iterdir()} >= {"model.onnx", "adapter.onnx_adapter", "export.json", "README.md"}
    export(ws, "next")
    assert (out / "genai_config.json").read_text() == "next" and (out / "export.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["fp32"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
