"""inference/export.py: the merged model (plain transformers, no peft, full precision even for a
QLoRA adapter), the adapter alone, the held-out check of every export (tuner/export/check.py) and
where an export lands when it is killed. The ONNX format is tests/test_onnx.py's; GGUF and
Ollama are tests/test_gguf.py's."""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import test_qlora
from conftest import killed_at_swap, run_py
from test_adapter_checks import one_error_line
from tuner.settings import load_settings

qlora_tuned = test_qlora.qlora_tuned  # the fixture: tiny-random fine-tuned by Olive's QLoRA pass

# Loads the merged folder as a user without peft would: peft made unimportable, plain
# transformers, the folder's own chat template and generation config, greedy by that config.
PLAIN = """
import json, sys
sys.modules["peft"] = None  # as if peft were not installed
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import is_peft_available
assert not is_peft_available()
folder, chats, limit = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
answers = []
for chat in chats:
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=limit)
    answers.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
print(json.dumps({"answers": answers, "dtype": str(model.dtype)}))
"""


def export(ws: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return run_py(ws, "inference/export.py", *args, timeout=timeout)


def plain_answers(ws: Path, folder: Path, tmp_path: Path) -> dict:
    """The merged model's greedy answers to the held-out rows, through plain transformers."""
    from transformers import AutoTokenizer
    from tuner.export.check import held_out
    from tuner.training.evaluation import answer_tokens

    chats, expected = held_out(load_settings(ws / "settings.toml"), ws)
    (tmp_path / "chats.json").write_text(json.dumps(chats), "utf-8")
    limit = answer_tokens(AutoTokenizer.from_pretrained(folder), expected)  # as the evaluation did
    run = run_py(ws, "-c", PLAIN, str(folder), str(tmp_path / "chats.json"), str(limit))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def evaluated(ws: Path) -> dict:
    return json.loads((ws / "models" / "adapter" / "eval.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def merged(tuned_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fine-tuned tiny workspace (a private copy), exported --format merged."""
    ws = tmp_path_factory.mktemp("merged") / "ws"
    shutil.copytree(tuned_workspace, ws, ignore=shutil.ignore_patterns("olive-cache", "checkpoints"))
    run = export(ws, "--format", "merged")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Exported to models/exports/merged" in run.stdout, run.stdout
    return ws


@pytest.mark.slow
def test_merged_answers_as_the_adapter_without_peft(merged: Path, tmp_path: Path) -> None:
    """Plain transformers, peft not importable, answers the held-out rows exactly as the adapter
    did in its evaluation (transformers + peft), and stops at the end-of-turn token."""
    folder = merged / "models" / "exports" / "merged"
    assert not list(folder.glob("adapter_*")), "adapter files in the merged folder"
    result = plain_answers(merged, folder, tmp_path)
    report = evaluated(merged)
    tuned = [example["tuned"] for example in report["examples"]]
    assert result["answers"] == tuned
    assert result["dtype"] == "torch.float32"
    assert report["exports"]["merged"]["exact_match"] == report["tuned"]["exact_match"]
    assert report["exports"]["merged"]["adapter_exact_match"] == report["tuned"]["exact_match"]


@pytest.mark.slow
def test_merged_folder_carries_the_template_and_end_tokens(merged: Path) -> None:
    from transformers import AutoTokenizer
    from tuner.serving.engine import END_TOKENS

    folder = merged / "models" / "exports" / "merged"
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "export.json"} <= {
        p.name for p in folder.iterdir()
    }
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoTokenizer.from_pretrained(merged / "model-cache" / "tiny-random")
    assert tok.chat_template == base.chat_template and tok.chat_template
    generation = json.loads((folder / "generation_config.json").read_text("utf-8"))
    vocab = tok.get_vocab()
    ends = {vocab[t] for t in END_TOKENS if t in vocab}
    assert ends and ends <= set(generation["eos_token_id"])
    assert generation.get("do_sample") in (None, False)  # [chat] temperature = 0: greedy
    assert generation["max_new_tokens"] == load_settings(merged / "settings.toml")["chat"]["max_new_tokens"]
    info = json.loads((folder / "export.json").read_text("utf-8"))
    assert info["format"] == "merged" and info["seconds"] > 0
    assert not list(folder.parent.glob(".staging-*"))


@pytest.mark.slow
def test_sampling_defaults_go_into_the_generation_config(merged: Path, tmp_path: Path) -> None:
    """[chat] temperature > 0: the merged model samples as the chat does."""
    from transformers import AutoTokenizer, GenerationConfig
    from tuner.export.merged import generation_config

    settings = load_settings(merged / "settings.toml")
    settings["chat"] |= {"temperature": 0.7, "top_p": 0.9, "top_k": 20}
    tok = AutoTokenizer.from_pretrained(merged / "model-cache" / "tiny-random")
    config = generation_config(settings, tok, GenerationConfig())
    config.save_pretrained(tmp_path)  # validated as it is saved
    saved = json.loads((tmp_path / "generation_config.json").read_text("utf-8"))
    assert saved["do_sample"] is True and saved["temperature"] == 0.7 and saved["top_p"] == 0.9
    assert saved["top_k"] == 20


@pytest.mark.slow
def test_an_export_that_answers_worse_is_refused_in_one_line(merged: Path, tmp_path: Path) -> None:
    """A base model damaged after the adapter's evaluation (its output layer scrambled): the merged
    export answers the held-out rows worse than the adapter did, the command stops with one line,
    the export in place stays, and eval.json keeps its figures."""
    import torch
    from safetensors.torch import load_file, save_file

    ws = tmp_path / "ws"
    shutil.copytree(merged, ws)
    report = evaluated(ws)
    if report["tuned"]["exact_match"] < 0.1:  # too little to lose: make the adapter's figure the bar
        report["tuned"]["exact_match"] = 1.0
        (ws / "models" / "adapter" / "eval.json").write_text(json.dumps(report), "utf-8")
    weights_file = ws / "model-cache" / "tiny-random" / "model.safetensors"
    weights = load_file(weights_file)
    torch.manual_seed(0)
    weights = {k: torch.randn_like(v) if v.dim() == 2 else v for k, v in weights.items()}  # every matrix
    save_file(weights, weights_file, metadata={"format": "pt"})
    before = evaluated(ws)
    kept = (ws / "models" / "exports" / "merged" / "export.json").read_text("utf-8")
    run = export(ws, "--format", "merged")
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    line = one_error_line(run.stderr)
    assert re.fullmatch(
        r"error: the merged export answers [\d.]+% of the \d+ held-out rows exactly, the adapter [\d.]+%: "
        r"it loses more than 3 points, so it was not kept "
        r"\(a higher precision loses less; --max-loss POINTS keeps it anyway\)",
        line,
    ), line
    assert evaluated(ws) == before
    assert (ws / "models" / "exports" / "merged" / "export.json").read_text("utf-8") == kept
    assert sorted(p.name for p in (ws / "models" / "exports").iterdir()) == ["merged"]
    # Kept when the user accepts the loss, and the figure says under which limit.
    run = export(ws, "--format", "merged", "--max-loss", "100")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    figures = evaluated(ws)["exports"]["merged"]
    assert figures["threshold"] == 1.0 and figures["exact_match"] < evaluated(ws)["tuned"]["exact_match"]
    assert (ws / "models" / "exports" / "merged" / "export.json").read_text("utf-8") != kept
    run = export(ws, "--format", "merged", "--max-loss", "101")
    assert run.returncode == 2 and "--max-loss: 101 is not a number of points from 0 to 100" in run.stderr


@pytest.mark.slow
def test_adapter_export_is_the_adapter_with_its_records(merged: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(merged, ws)
    run = export(ws, "--format", "adapter")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = ws / "models" / "exports" / "adapter"
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "run.json", "eval.json", "README.md"} <= names
    report = evaluated(ws)
    assert report["exports"]["adapter"]["exact_match"] == report["tuned"]["exact_match"]
    assert report["exports"]["merged"]  # the other export's figure is kept
    assert json.loads((folder / "eval.json").read_text("utf-8"))["exports"]["adapter"]
    # tiny-random has no Hub repo: the base stays where this workspace has it.
    config = json.loads((folder / "adapter_config.json").read_text("utf-8"))
    assert Path(config["base_model_name_or_path"]).parts[-2:] == ("model-cache", "tiny-random")
    # A model from the Hub: the exported adapter names its repo and revision, as peft loads them.
    settings_file = ws / "settings.toml"
    text = settings_file.read_text("utf-8").replace('hf_repo = ""', 'hf_repo = "someone/tiny-base"', 1)
    settings_file.write_text(text.replace('revision = ""', 'revision = "v1.0"', 1), "utf-8")
    run = export(ws, "--format", "adapter")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    config = json.loads((folder / "adapter_config.json").read_text("utf-8"))
    assert (config["base_model_name_or_path"], config["revision"]) == ("someone/tiny-base", "v1.0")
    from peft import PeftConfig

    loaded = PeftConfig.from_pretrained(folder)
    assert (loaded.base_model_name_or_path, loaded.revision) == ("someone/tiny-base", "v1.0")
    # A damaged adapter is refused before anything is written.
    (ws / "models" / "adapter" / "adapter_model.safetensors").write_bytes(b"damaged")
    shutil.rmtree(folder)
    run = export(ws, "--format", "adapter")
    assert run.returncode == 1 and "adapter_model.safetensors" in one_error_line(run.stderr)
    assert not folder.exists() and not list(folder.parent.glob(".staging-*"))


@pytest.mark.slow
def test_merged_qlora_adapter_is_full_precision_over_the_weights_it_trained_on(
    qlora_tuned: Path, tmp_path: Path
) -> None:
    """A QLoRA adapter learned its updates against the 4-bit base. Merged, it is float32 with no
    quantization_config, and computes what the adapter does on the 4-bit base (as the evaluation
    loads it), not on the original weights: merged into those, it would be another model."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from tuner.training.evaluation import load_model

    ws = tmp_path / "ws"
    shutil.copytree(qlora_tuned, ws, ignore=shutil.ignore_patterns("olive-cache", "checkpoints"))
    run_record = json.loads((ws / "models" / "adapter" / "run.json").read_text())
    assert run_record["settings"]["train"]["method"] == "qlora"
    run = export(ws, "--format", "merged")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "dequantized" not in run.stdout + run.stderr  # transformers' note on the dtype is ours to say
    report = evaluated(ws)
    print(
        f"QLoRA adapter {report['tuned']['exact_match']:.1%}, merged {report['exports']['merged']['exact_match']:.1%}"
    )
    folder = ws / "models" / "exports" / "merged"
    config = json.loads((folder / "config.json").read_text("utf-8"))
    assert "quantization_config" not in config
    with safe_open(folder / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_tensor(k).dtype for k in weights.keys()}
    assert dtypes == {torch.float32}
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    four_bit, _ = load_model(run_record["settings"], ws / "model-cache" / "tiny-random")
    assert any("4bit" in type(m).__name__ for m in four_bit.modules())
    as_evaluated = PeftModel.from_pretrained(four_bit, ws / "models" / "adapter").eval()
    original = AutoModelForCausalLM.from_pretrained(ws / "model-cache" / "tiny-random", dtype=torch.float32)
    on_original = PeftModel.from_pretrained(original, ws / "models" / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        merged, other = plain(ids).logits, on_original(ids).logits
    # With gradients flowing (as in training): bitsandbytes' plain 4-bit kernel, the one training
    # ran. Without them, on CPUs with AVX512-BF16, it switches to a repacked bfloat16 kernel that
    # is 0.08 off here.
    as_evaluated.get_input_embeddings().weight.requires_grad_(True)
    with torch.enable_grad():
        expected = as_evaluated(ids).logits.detach()
    assert torch.allclose(merged, expected, atol=1e-4)
    assert not torch.allclose(merged, other, atol=1e-2)  # the 4-bit rounding is not lost in the merge


# ---------------------------------------------------------------- killed at the swap (fast)


def test_merged_export_killed_at_the_swap_keeps_the_previous_export(
    render_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inference/export.py --format merged run in this process, its merge and check replaced by
    writing a marker (what is tested is where the export lands): killed between moving the last
    export aside and putting the new one in place, the last export is kept whole, and the next run
    puts the new one in place."""
    from tuner.export import check
    from tuner.export import merged as merged_module

    ws = tmp_path / "ws"
    shutil.copytree(render_factory(model="tiny-random", platform="cpu", mode="local"), ws)
    settings = ws / "settings.toml"
    settings.write_text(re.sub(r"(?m)^threads = .*$", "threads = 0", settings.read_text()))  # nothing computes
    for folder, name in (("model-cache/tiny-random", "config.json"), ("models/adapter", "adapter_config.json")):
        (ws / folder).mkdir(parents=True)
        (ws / folder / name).write_text("{}")
    marker = [""]

    def merge(settings: dict, root: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "model.safetensors").write_text(marker[0])

    monkeypatch.setattr(merged_module, "merge", merge)
    monkeypatch.setattr(check, "check_export", lambda *args: {"exact_match": 1.0, "adapter_exact_match": 1.0})
    monkeypatch.setitem(sys.modules, "tuner.export.card", types.SimpleNamespace(model_card=lambda *args: "card"))
    monkeypatch.setattr(sys, "argv", ["export.py", "--format", "merged"])

    def run(text: str) -> None:
        marker[0] = text
        runpy.run_path(str(ws / "inference" / "export.py"))["main"]()  # main(), not run_script's exit

    out = ws / "models" / "exports" / "merged"
    run("last")
    assert (out / "model.safetensors").read_text() == "last" and (out / "README.md").read_text() == "card"
    killed_at_swap(out, lambda: run("new"))
    previous = out.with_name("merged.previous")
    assert not out.exists() and (previous / "model.safetensors").read_text() == "last"
    assert {p.name for p in previous.iterdir()} == {"model.safetensors", "export.json", "README.md"}
    run("next")
    assert (out / "model.safetensors").read_text() == "next"
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]


def test_options_of_other_formats_are_refused(render_factory) -> None:
    ws = render_factory(model="tiny-random", platform="cpu", mode="local")
    for args, said in (
        (["--format", "merged", "--quantize", "q8_0"], "--quantize is for --format gguf or ollama"),
        (["--format", "gguf", "--precision", "fp32"], "--precision, --execution-provider and --skip-merged are for"),
        (["--format", "ollama", "--push-to-hub", "me/model"], "--push-to-hub takes --format merged, gguf, adapter"),
        (["--format", "merged", "--private"], "--private goes with --push-to-hub"),
    ):
        run = export(ws, *args, timeout=120)
        assert run.returncode == 2 and said in run.stderr, run.stderr
    run = export(ws, "--format", "merged", timeout=120)  # no model, no adapter: what to run first
    base = ws / "model-cache" / "tiny-random"
    said = f"error: base model not found in {base}: run `python setup/download_model.py` first"
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [said], run.stderr


# ---------------------------------------------------------------- SmolLM2-135M (slow)


@pytest.mark.slow
def test_smollm2_merged_answers_as_the_adapter(smol_base: Path, tmp_path: Path) -> None:
    """A real pretrained model, LoRA for a few steps: the merged export answers the held-out rows as
    the adapter did in its evaluation (the check's exact match equals the adapter's)."""
    ws = tmp_path / "ws"
    shutil.copytree(smol_base, ws)
    tune = run_py(ws, "finetuning/invoke_olive.py", "--set", "train.max_steps=20", timeout=1800)
    assert tune.returncode == 0, tune.stdout[-3000:] + tune.stderr[-3000:]
    start = time.monotonic()
    run = export(ws, "--format", "merged", timeout=1800)
    seconds = time.monotonic() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = evaluated(ws)
    tuned, merged_em = report["tuned"]["exact_match"], report["exports"]["merged"]["exact_match"]
    print(f"SmolLM2-135M LoRA 20 steps: adapter {tuned:.1%}, merged {merged_em:.1%}, export {seconds:.0f} s")
    assert abs(merged_em - tuned) <= 0.03, report["exports"]
    answers = plain_answers(ws, ws / "models" / "exports" / "merged", tmp_path)["answers"]
    same = sum(a.split("\n")[0] == e["tuned"].split("\n")[0] for a, e in zip(answers, report["examples"], strict=True))
    assert same >= 0.95 * len(answers), (same, len(answers))
