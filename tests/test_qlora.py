"""QLoRA, the GPU default, for real on the CPU (bitsandbytes 0.50 runs 4-bit there): Olive's QLoRA
pass and train_sft.py train it, every front-end serves the adapter on the 4-bit base it was trained
on (nf4 and fp4, double quantisation on and off) and answers what the held-out evaluation scored,
the web page and the API included, and the ONNX export builds on the 4-bit weights it was trained
on, dequantised to float32. No fake bitsandbytes anywhere."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ARTIFACTS, SMOL, Server, browser_page, run_py, start_server
from test_inference import TONES

pytestmark = pytest.mark.slow


def qlora_workspace(render_factory, tuned_workspace: Path, dst: Path) -> Path:
    """A tiny-random CPU workspace whose answers chose QLoRA, with the base model built."""
    shutil.copytree(render_factory(model="tiny-random", platform="cpu", mode="local", method="qlora"), dst)
    shutil.copytree(tuned_workspace / "model-cache", dst / "model-cache")
    return dst


@pytest.fixture(scope="module")
def qlora_tuned(render_factory, tuned_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """That workspace fine-tuned by invoke_olive.py as it is: Olive's QLoRA pass, then the evaluation."""
    ws = qlora_workspace(render_factory, tuned_workspace, tmp_path_factory.mktemp("qlora") / "ws")
    run = run_py(ws, "finetuning/invoke_olive.py")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (ws / "finetune.log").write_text(run.stdout + run.stderr, "utf-8")
    return ws


def evaluated(ws: Path) -> list[dict]:
    """The held-out rows as the evaluation answered them with the adapter on (eval.json)."""
    return json.loads((ws / "models" / "adapter" / "eval.json").read_text("utf-8"))["examples"]


def test_olive_qlora_pass_trains_on_the_cpu(qlora_tuned: Path) -> None:
    log = (qlora_tuned / "finetune.log").read_text("utf-8")
    assert "QLoRA on the CPU" in log and "--cpu-lora" in log  # said once, not refused
    adapter = qlora_tuned / "models" / "adapter"
    record = json.loads((adapter / "run.json").read_text("utf-8"))
    assert record["settings"]["train"]["method"] == "qlora"
    config = json.loads((adapter / "olive-config.json").read_text("utf-8"))["passes"]["finetune"]
    assert config["type"] == "QLoRA" and config["compute_dtype"] == "float32"  # the CPU's dtype
    # Olive's QLoRA pass puts LoRA on every 4-bit linear layer: every linear layer but the output.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qlora_tuned / record["settings"]["model"]["path"])
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = set(json.loads((adapter / "adapter_config.json").read_text("utf-8"))["target_modules"])
    assert targets == linear - {"lm_head"}, targets
    losses = [h["loss"] for h in json.loads((adapter / "log_history.json").read_text("utf-8")) if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses
    report = json.loads((adapter / "eval.json").read_text("utf-8"))
    assert report["tuned"]["answer_loss"] < report["base"]["answer_loss"]


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_engine_answers_what_the_evaluation_scored(
    render_factory, tuned_workspace: Path, tmp_path: Path, quant_type: str, double_quant: bool
) -> None:
    """train_sft.py with QLoRA, then the torch engine reloads the base as the adapter was trained
    (its run.json: 4-bit type, double quantisation, compute dtype) and gives, greedy, the answers
    the held-out evaluation gave for the same rows."""
    from tuner.serving.engine import conversation
    from tuner.serving.hf import Engine
    from tuner.settings import load_settings

    ws = qlora_workspace(render_factory, tuned_workspace, tmp_path / "ws")
    overrides = [f"train.quant_type={quant_type}", f"train.double_quant={str(double_quant).lower()}"]
    run = run_py(ws, "finetuning/train_sft.py", *(f"--set={o}" for o in overrides), "--set", "train.max_steps=40")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # The settings file still says nf4 + double quantisation: the engine must follow run.json.
    engine = Engine(load_settings(ws / "settings.toml"), ws)
    config = engine.model.base_model.model.config.quantization_config
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (quant_type, double_quant)
    try:
        examples = evaluated(ws)[:12]
        for example in examples:
            messages = conversation([], example["input"], engine.settings)
            assert engine.reply(messages, max_new_tokens=16).strip() == example["tuned"], example
    finally:
        engine.close()
    assert sum(e["tuned"] in TONES for e in examples) >= 9, examples  # it trained: answers are tone words


def test_train_sft_qlora_two_processes_train_what_one_does(
    render_factory, tuned_workspace: Path, tmp_path: Path
) -> None:
    """QLoRA under DDP (2 processes over gloo): the adapter of one process with twice the batch."""
    import torch
    from safetensors.torch import load_file

    ws = qlora_workspace(render_factory, tuned_workspace, tmp_path / "ws")
    common = ["--set", "train.max_steps=4", "--set", "train.pad_to_max_len=true", "--no-eval"]

    def train(batch: int, processes: int, *more: str) -> dict:
        launch = (
            ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
        )
        batch_size = f"train.per_device_train_batch_size={batch}"
        run = run_py(ws, *launch, "finetuning/train_sft.py", *common, "--set", batch_size, *more)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return load_file(ws / "models" / "adapter" / "adapter_model.safetensors")

    one, two = train(4, 1), train(2, 2)
    other_seed = train(4, 1, "--set", "train.seed=1")
    assert one.keys() == two.keys() and any("mlp" in k for k in one)  # every linear layer
    assert {v.dtype for v in one.values()} == {torch.float32}  # as Olive's: not TRL's bfloat16
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    seed_diff = max((one[k] - other_seed[k]).abs().max().item() for k in one)
    print(f"QLoRA 2x2 vs 1x4, max abs diff {diff:.3g}; other seed {seed_diff:.3g}")
    # Equal up to rounding: the sums follow the batch's shape (bitsandbytes' fused 4-bit kernel, the
    # CPU's BLAS), and Adam's first steps grow that to ~1e-4. A bfloat16 adapter differed by 6e-3.
    assert diff < 1e-3 and seed_diff > 50 * max(diff, 1e-5), (diff, seed_diff)
    assert all(one[k].abs().max() > 1e-3 for k in one if "lora_B" in k)  # it trained


def test_console_answers_what_the_evaluation_scored(qlora_tuned: Path) -> None:
    example = evaluated(qlora_tuned)[0]
    run = run_py(qlora_tuned, "inference/console_chat.py", "--prompt", example["input"], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == example["tuned"]


@pytest.fixture(scope="module")
def server(qlora_tuned: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(qlora_tuned, tmp_path_factory.mktemp("qlora-server") / "gradio_chat.log")
    try:
        yield srv
    finally:
        srv.stop()


def test_api_and_page_answer_what_the_evaluation_scored(server: Server, qlora_tuned: Path) -> None:
    examples = evaluated(qlora_tuned)[:4]
    for example in examples:
        r = server.post({"messages": [{"role": "user", "content": example["input"]}], "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip() == example["tuned"]
    with browser_page(server.url + "/") as (page, sync_api):
        sync_api.expect(page.get_by_text("Held-out evaluation on 42 rows", exact=False)).to_be_visible()
        box = page.get_by_placeholder("Type a message...")
        box.fill(examples[0]["input"])
        box.press("Enter")
        sync_api.expect(page.get_by_test_id("bot").last).to_have_text(examples[0]["tuned"])
        page.screenshot(path=str(ARTIFACTS / "gradio_chat_qlora.png"), full_page=True)
    log = server.log_tail(10**7)
    assert "Traceback" not in log, log[-4000:]


def test_onnx_export_builds_on_the_weights_the_adapter_trained_on(qlora_tuned: Path, tmp_path: Path) -> None:
    """The ONNX export of a QLoRA adapter: float32, never 4-bit, built on the base's 4-bit weights
    dequantised (what the adapter learned against); its first-token logits, with the adapter file
    and merged, are transformers + peft's on that base."""
    from test_onnx import first_token_diffs, one_thread
    from tuner.export.merged import base_as_trained
    from tuner.settings import load_settings

    ws = tmp_path / "ws"
    shutil.copytree(qlora_tuned, ws, ignore=shutil.ignore_patterns("olive-cache", "checkpoints"))
    run = run_py(ws, "inference/export.py", "--format", "onnx", "--precision", "fp32")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    settings = load_settings(ws / "settings.toml")
    base = base_as_trained(settings, ws / settings["model"]["path"], ws / "models" / "adapter")
    with one_thread():
        diffs = first_token_diffs(ws, base)
    print(f"QLoRA adapter, fp32 export vs transformers + peft on the dequantised 4-bit base: {diffs}")
    assert diffs["adapter"] < 1e-4 and diffs["merged"] < 1e-4 and diffs["base"] < 1e-4


def test_smollm2_qlora_generalises(smol_base: Path, tmp_path: Path) -> None:
    """A real pretrained model, QLoRA through Olive on the CPU: the held-out phrases (never trained
    on) are answered far better than by the base. The bar holds over seeds (bench/finetune_seeds.py
    --method qlora measured it; see the README)."""
    ws = tmp_path / "ws"
    shutil.copytree(smol_base, ws)
    run = run_py(
        ws, "finetuning/invoke_olive.py", "--set", "train.method=qlora", "--set", "train.max_steps=30", timeout=1800
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((ws / "models" / "adapter" / "eval.json").read_text("utf-8"))
    print(
        f"SmolLM2 QLoRA 30 steps: base {report['base']['exact_match']:.1%}, tuned {report['tuned']['exact_match']:.1%}"
    )
    assert report["tuned"]["exact_match"] >= report["base"]["exact_match"] + 0.15, report
    assert json.loads((ws / "models" / "adapter" / "run.json").read_text())["settings"]["model"]["id"] == SMOL


def test_training_keeps_the_4bit_backward_after_an_evaluation(tuned_workspace: Path) -> None:
    """bitsandbytes 0.50.2 on an AVX512-BF16 CPU repacks a 4-bit layer for inference the first time
    it runs without gradients, and the repacked layer has no backward. Inside trainable_4bit (both
    trainers train in it), an evaluation in the middle of training leaves the gradients as they were.
    (On a CPU without AVX512-BF16 both sides are the plain path and the test holds trivially.)"""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from tuner.training.precision import Device, decide, trainable_4bit

    train = {"method": "qlora", "compute_dtype": "float32", "quant_type": "nf4", "double_quant": True}
    precision = decide(train, Device(cuda=False))

    def first_layer_grads(evaluate_first: bool) -> dict[str, float]:
        torch.manual_seed(0)
        with trainable_4bit(precision):
            model = AutoModelForCausalLM.from_pretrained(
                tuned_workspace / "model-cache" / "tiny-random", **precision.load_kwargs()
            )
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
        ids = torch.randint(0, 100, (2, 16))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.abs().sum().item() for n, p in model.named_parameters() if p.requires_grad and ".0." in n}

    plain, after_eval = first_layer_grads(False), first_layer_grads(True)
    assert plain.keys() == after_eval.keys() and plain
    for name in plain:
        assert after_eval[name] == pytest.approx(plain[name], rel=1e-4), name
