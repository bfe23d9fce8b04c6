"""Training speed: the anchor's configuration against ours, on the same model, LoRA and data,
measured side by side in one run.

    python bench/train_speed.py [--workspace WS] [--steps 8] [--model ID]

The anchor ("AI Toolkit" workspace) trains with batch 1, gradient accumulation 4, gradient
checkpointing and eager attention. Ours takes batch size, accumulation and checkpointing from the
workspace's [train] (the catalog's per-model defaults) and PyTorch's fused attention (sdpa).
Both use the workspace's LoRA settings, its tokenised rows (chat template, loss on the answers)
and the same examples in the same order, in the same optimizer loop as the Trainer's. Each
configuration runs in a process of its own, so its peak memory is its own.

Reported per configuration: trained tokens/s (real tokens, padding excluded, after one warm-up
step), peak memory (RSS on CPU, allocated memory on CUDA), and MFU: model FLOPs over the peak of
this device as measured here (the best of a few large matmuls in the training dtype). Model FLOPs
are 4 x parameters per token: the forward pass (2N) and the backward pass through the frozen
weights (2N); LoRA computes no weight gradients for them, and recomputation by gradient
checkpointing does not count. Then the ratios ours / anchor.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import workspace, workspace_env

ANCHOR = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "gradient_checkpointing": True}


def matmul_peak(torch: Any, device: str, dtype: Any) -> float:
    """FLOP/s of a large square matmul: what this device reaches at best, in this dtype."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def worker(ws: Path, name: str, steps: int) -> dict[str, Any]:
    """Train `steps` optimizer steps with one configuration; its measurements."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tuner.data import load_rows, tokenize
    from tuner.settings import load_settings

    settings = load_settings(ws / "settings.toml")
    train = settings["train"]
    if name == "anchor":
        config: dict[str, Any] = ANCHOR | {"attention": "eager"}
    else:
        config = {key: train[key] for key in ANCHOR} | {"attention": "sdpa"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, train["compute_dtype"]) if device == "cuda" else torch.float32
    torch.manual_seed(train["seed"])
    path = ws / settings["model"]["path"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=config["attention"]).to(device)
    lora = LoraConfig(
        r=train["lora_r"],
        lora_alpha=train["lora_alpha"],
        lora_dropout=train["lora_dropout"],
        target_modules=train["target_modules"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train["learning_rate"])
    examples = tokenize(tokenizer, load_rows(settings, ws), settings)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch_size, accumulation = config["per_device_train_batch_size"], config["gradient_accumulation_steps"]
    per_step = batch_size * accumulation

    def micro_batch(index: int) -> tuple[dict[str, Any], int]:
        chunk = [examples[(index * batch_size + i) % len(examples)] for i in range(batch_size)]
        width = max(len(e["input_ids"]) for e in chunk)
        padded = {
            key: torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in chunk], device=device)
            for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", -100))
        }
        return padded, sum(len(e["input_ids"]) for e in chunk)

    tokens = 0
    start = time.perf_counter()
    for step in range(steps + 1):  # step 0 warms up and is not timed
        if step == 1:
            if device == "cuda":
                torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        for micro in range(accumulation):
            batch, count = micro_batch(step * accumulation + micro)
            (model(**batch).loss / accumulation).backward()
            tokens += count
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    rate = tokens / seconds
    peak_memory = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "config": config,
        "examples_per_step": per_step,
        "tokens_per_s": rate,
        "peak_memory_mib": peak_memory,
        "mfu": 4 * params * rate / matmul_peak(torch, device, dtype),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--workspace", type=Path, help="reuse this rendered workspace (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per configuration")
    parser.add_argument("--worker", choices=["anchor", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.workspace, args.worker, args.steps)))
        return

    ws = workspace(args.model, args.workspace, "train-speed-").resolve()
    results = {}
    for name in ("anchor", "ours"):
        command = [sys.executable, __file__, "--worker", name, "--workspace", str(ws), "--steps", str(args.steps)]
        run = subprocess.run(command, env=workspace_env(ws), capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{name} failed:\n{run.stderr[-3000:]}")
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    anchor, ours = results["anchor"], results["ours"]
    print(f"{args.model} on {ours['device']}, {args.steps} optimizer steps each\n")
    print(f"{'':8} {'batch x accum':>13} {'ckpt':>5} {'attention':>9} {'tokens/s':>9} {'peak MiB':>9} {'MFU':>7}")
    for name, r in results.items():
        c = r["config"]
        shape = f"{c['per_device_train_batch_size']} x {c['gradient_accumulation_steps']}"
        print(
            f"{name:8} {shape:>13} {'yes' if c['gradient_checkpointing'] else 'no':>5} {c['attention']:>9} "
            f"{r['tokens_per_s']:9.0f} {r['peak_memory_mib']:9.0f} {r['mfu']:7.1%}"
        )
    speed = ours["tokens_per_s"] / anchor["tokens_per_s"]
    memory = ours["peak_memory_mib"] / anchor["peak_memory_mib"]
    print(f"\nours / anchor: {speed:.2f}x tokens/s, {memory:.2f}x peak memory")
    print(json.dumps({"speedup": speed, "memory_ratio": memory, "results": results}))


if __name__ == "__main__":
    main()
