"""Decode speed of the chat engine (tuner.serving.hf) against plain `model.generate`, at batch 1
and under concurrent clients, measured side by side in one run.

    python bench/decode_speed.py [--workspace WS] [--tokens 64] [--clients 16]

Renders a workspace (SmolLM2-135M-Instruct on CPU, model from the offline copy when the Hub is
unreachable) unless --workspace names one, and serves the base model (--baseonly: the adapter is
merged into the weights at load, so a fine-tuned model decodes at the same speed). Rows:

- plain generate, batch 1: `model.generate`, greedy, forced to the engine's answer length;
- engine, batch 1: one request through the engine (chat template, streaming, stop checks);
- engine, N one after another: N requests queued one at a time, today's serialised path;
- engine, N clients at once: N threads asking together, batched by the engine;
- anchor path (4-bit base, unmerged LoRA r=64, batch 1 and N): only with CUDA and bitsandbytes.

Tokens/s counts generated tokens over the whole request (prompt processing included), best of
--repeats for the batch-1 rows. Ratios are against plain generate (batch 1) and against the
serialised path (N clients).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import workspace

TOPICS = [
    "a lighthouse keeper who learns to bake bread",
    "a cat that runs a small bookshop",
    "two rival chess players stuck in a lift",
    "a robot gardener on Mars",
    "the last day of a village fair",
    "a lost umbrella travelling the world",
    "a baker's dog that solves mysteries",
    "a violinist who plays for whales",
    "a child who finds a map in a library book",
    "an old train that refuses to retire",
    "a painter who can only paint at night",
    "a fisherman and a talking gull",
    "a snowstorm in a desert town",
    "a clockmaker who fixes time itself",
    "a grandmother's secret recipe",
    "a kite that wants to reach the moon",
]


def story(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long story, at least 600 words, about {TOPICS[i % len(TOPICS)]}."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--workspace", type=Path, help="reuse this rendered workspace (default: a temporary one)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ws = workspace(args.model, args.workspace, "decode-speed-").resolve()
    sys.path.insert(0, str(ws))  # the workspace's package, tuner/, which its setup would install

    import tomllib

    import torch
    from tuner.serving.hf import Engine

    settings = tomllib.loads((ws / "settings.toml").read_text("utf-8"))
    engine = Engine(settings, ws, baseonly=True)
    model, n = engine.model, args.tokens
    rows: list[tuple[str, float, str]] = []  # (what, tokens/s, compared with)

    def ask(i: int) -> int:
        stats: dict[str, Any] = {}
        for _ in engine.stream(story(i), stats, max_new_tokens=n):
            pass
        return stats["completion_tokens"]

    def plain(i: int, count: int) -> None:
        ids = torch.tensor([engine.prompt_ids(story(i))], device=engine.device)
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=False,
                pad_token_id=engine.pad_id,
            )

    count = ask(0)  # warm-up, and the answer's length that plain generate is forced to
    best_plain = best_engine = float("inf")
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        start = time.perf_counter()
        plain(0, count)
        best_plain = min(best_plain, time.perf_counter() - start)
        start = time.perf_counter()
        ask(0)
        best_engine = min(best_engine, time.perf_counter() - start)
    rows.append(("plain generate, batch 1", count / best_plain, "plain"))
    rows.append(("engine, batch 1", count / best_engine, "plain"))

    start = time.perf_counter()
    total = sum(ask(i) for i in range(args.clients))
    rows.append((f"engine, {args.clients} one after another", total / (time.perf_counter() - start), "serial"))

    counts: list[int] = []
    barrier = threading.Barrier(args.clients)

    def client(i: int) -> None:
        barrier.wait()
        counts.append(ask(i))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows.append((f"engine, {args.clients} clients at once", sum(counts) / (time.perf_counter() - start), "serial"))

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        rows += anchor(engine, settings, ws, n, args.clients)
    else:
        print("anchor path (bitsandbytes 4-bit, unmerged LoRA) skipped: it needs CUDA and bitsandbytes")

    base = {"plain": rows[0][1], "serial": rows[2][1]}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.model} on {device}, {n} new tokens per request, greedy")
    print(f"{'':42} {'tokens/s':>9}  ratio")
    for what, speed, against in rows:
        print(f"{what:42} {speed:9.1f}  {speed / base[against]:.2f}x {against}")


def anchor(engine: Any, settings: dict[str, Any], ws: Path, n: int, clients: int) -> list[tuple[str, float, str]]:
    """The anchor's decode path: a bitsandbytes 4-bit base with an unmerged LoRA adapter (r=64,
    every linear layer; random, which decodes at the same speed as a trained one), batch 1 and
    `clients` prompts left-padded into one generate."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(ws / settings["model"]["path"], quantization_config=quant)
    model = get_peft_model(base, LoraConfig(r=64, target_modules="all-linear", task_type="CAUSAL_LM")).eval()
    prompts = [engine.prompt_ids(story(i)) for i in range(clients)]
    width = max(map(len, prompts))

    def run(batch: list[list[int]]) -> float:
        ids = torch.tensor([[engine.pad_id] * (width - len(p)) + p for p in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=engine.pad_id,
            )
        torch.cuda.synchronize()
        return len(batch) * n / (time.perf_counter() - start)

    run(prompts[:1])  # warm-up
    return [
        ("anchor path (4-bit, unmerged), batch 1", run(prompts[:1]), "plain"),
        (f"anchor path (4-bit, unmerged), {clients} batched", run(prompts), "serial"),
    ]


if __name__ == "__main__":
    main()
