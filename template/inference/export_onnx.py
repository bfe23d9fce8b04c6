"""Export the fine-tuned model for ONNX Runtime GenAI (CPU, CUDA or DirectML).

    python inference/export_onnx.py                     # int4 (the default)
    python inference/export_onnx.py --precision fp32    # or fp16
    python inference/export_onnx.py --skip-merged       # only the base model + adapter file

Writes, under models/onnx/<precision>/:

    model.onnx, model.onnx.data, genai_config.json, tokenizer files
        the base model, with the LoRA weights as (optional) inputs of the graph;
    adapter.onnx_adapter
        the fine-tuned LoRA weights, loaded at run time with og.Adapters (without it the same
        model answers as the base model, so one export serves both);
    merged/
        the adapter merged into the weights (peft merge_and_unload), then built: a plain
        model for tools that know nothing of adapters.

Chat with it: python inference/console_chat.py --backend onnx
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tuner.files import replace_folder
from tuner.serving.onnx_build import ADAPTER_NAME, ExportError, build, extract_adapter, merge
from tuner.serving.ort import ADAPTER_FILE, export_dir
from tuner.settings import (
    ONNX_PRECISIONS,
    PROVIDERS,
    Interrupted,
    adapter_dir,
    in_workspace,
    run_script,
    script_parser,
    settings_for_script,
)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = script_parser(__doc__, ROOT, "onnx.output_dir=models/onnx-try")
    parser.add_argument("--precision", choices=ONNX_PRECISIONS, help="default: [onnx] precision")
    parser.add_argument(
        "--execution-provider",
        choices=sorted(set(PROVIDERS.values())),
        help="where the model will run (default: from [model] platform)",
    )
    parser.add_argument("--skip-merged", action="store_true", help="do not build the merged model")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failed build")
    args = parser.parse_args()
    settings = settings_for_script(args.settings, args.overrides)
    model_id = settings["model"]["id"]
    args.precision = args.precision or settings["onnx"]["precision"]
    args.execution_provider = args.execution_provider or PROVIDERS[settings["model"]["platform"]]

    base = in_workspace(ROOT, settings["model"]["path"])
    adapter = adapter_dir(ROOT)
    if not (base / "config.json").is_file():
        raise ExportError(f"base model not found in {base}: run `python setup/download_model.py` first")
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"adapter not found in {adapter}: run `python finetuning/invoke_olive.py` first")
    out = export_dir(settings, ROOT, args.precision)
    out_root = out.parent
    staging = out_root / f".staging-{args.precision}"
    shutil.rmtree(staging, ignore_errors=True)
    raw, cache = staging / "raw", staging / "cache"

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask the Hub
    if settings["model"]["threads"]:  # 1 for tiny matrices: threads cost more than they save
        import torch

        torch.set_num_threads(settings["model"]["threads"])
    print(f"Building {model_id} + adapter, {args.precision}, for {args.execution_provider}", flush=True)
    try:
        build(base, raw, args.precision, args.execution_provider, cache, adapter)
        count = extract_adapter(raw, staging / "model")
        for item in raw.iterdir():  # genai_config.json, tokenizer and chat template files
            if item.name not in ("model.onnx", "model.onnx.data"):
                shutil.copy2(item, staging / "model" / item.name)
        shutil.rmtree(raw)
        if not args.skip_merged:
            print("Building the merged model (adapter merged into the weights)", flush=True)
            merge(base, adapter, staging / "hf-merged")
            build(
                staging / "hf-merged",
                staging / "model" / "merged",
                args.precision,
                args.execution_provider,
                cache,
                None,
            )
    except KeyboardInterrupt:
        shutil.rmtree(staging, ignore_errors=True)
        raise Interrupted("interrupted: nothing was written") from None
    except ExportError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as err:  # the builder raises many kinds; keep its traceback out of the way
        shutil.rmtree(staging, ignore_errors=True)
        if args.debug:
            raise
        raise ExportError(f"the ONNX export failed: {type(err).__name__}: {err}") from None
    info: dict[str, Any] = {
        "model": model_id,
        "precision": args.precision,
        "execution_provider": args.execution_provider,
        "adapter_file": ADAPTER_FILE,
        "adapter_name": ADAPTER_NAME,
        "adapter_tensors": count,
        "merged": not args.skip_merged,
    }
    (staging / "model" / "export.json").write_text(json.dumps(info, indent=2), "utf-8")
    # Swapped in whole: a half-written export never looks finished, and a kill keeps the last one.
    replace_folder(staging / "model", out)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"Exported to {out.relative_to(ROOT)} ({count} adapter tensors in {ADAPTER_FILE})")


if __name__ == "__main__":
    run_script(main)
