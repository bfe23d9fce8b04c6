"""Decode speed of the fine-tuned model: transformers + peft (greedy generate) vs ONNX Runtime
GenAI (the export of inference/export.py --format onnx, adapter loaded with og.Adapters).

    python bench/onnx_vs_torch.py WORKSPACE [--tokens 64] [--repeats 3] [--threads 1]

WORKSPACE is a rendered workspace with its adapter fine-tuned and exported (any precisions
found under models/onnx/ are measured). Decode tokens/s = (tokens - 1) / (time for `tokens`
new tokens - time for 1 new token), the best of `repeats`: prompt processing is left out, and
both runtimes are forced to produce exactly `tokens` tokens (end tokens ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both runtimes")
    args = parser.parse_args()
    ws = args.workspace.resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ws))  # the workspace's package, tuner/

    import numpy as np
    import onnxruntime_genai as og
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tuner.data import load_rows, to_messages
    from tuner.settings import load_settings

    settings = load_settings(ws / "settings.toml")
    torch.set_num_threads(args.threads)
    base = ws / settings["model"]["path"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    messages = to_messages(load_rows(settings, ws)[0], settings)[:-1]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    results: dict[str, float] = {}

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, ws / "models" / "adapter").eval()
    prompt = torch.tensor([ids])

    def torch_run(n: int) -> None:
        with torch.inference_mode():
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

    torch_run(2)  # warm-up
    t1, tn = best(lambda: torch_run(1), args.repeats), best(lambda: torch_run(args.tokens), args.repeats)
    results["torch fp32 + peft"] = (args.tokens - 1) / (tn - t1)

    for folder in sorted((ws / "models" / "onnx").glob("*/genai_config.json")):
        path = folder.parent
        config = og.Config(str(path))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
        onnx_model = og.Model(config)
        adapters = og.Adapters(onnx_model)
        adapters.load(str(path / "adapter.onnx_adapter"), "finetuned")

        def onnx_run(n: int, onnx_model=onnx_model, adapters=adapters) -> None:
            params = og.GeneratorParams(onnx_model)
            params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
            generator = og.Generator(onnx_model, params)
            generator.set_active_adapter(adapters, "finetuned")
            generator.append_tokens(np.array([ids], dtype=np.int32))
            for _ in range(n):
                generator.generate_next_token()

        onnx_run(2)
        t1, tn = best(lambda: onnx_run(1), args.repeats), best(lambda: onnx_run(args.tokens), args.repeats)
        results[f"onnx {path.name} + adapter"] = (args.tokens - 1) / (tn - t1)

    reference = results["torch fp32 + peft"]
    print(f"{settings['model']['id']}: decode tokens/s, {args.tokens} tokens, {args.threads} thread(s), CPU")
    for name, rate in results.items():
        print(f"  {name:<24} {rate:9.1f} tok/s  ({rate / reference:.1f}x torch)")
    print(json.dumps({"decode_tokens_per_s": results}))


if __name__ == "__main__":
    main()
