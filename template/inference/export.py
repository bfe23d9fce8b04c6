"""Export the fine-tuned model where people run it; each export answers the held-out rows first.

    python inference/export.py --format merged                   # transformers, no peft needed
    python inference/export.py --format gguf --quantize q4_k_m   # llama.cpp: f16 | q8_0 | q4_k_m
    python inference/export.py --format ollama                   # the GGUF + a Modelfile
    python inference/export.py --format onnx --precision fp32    # ONNX Runtime GenAI
    python inference/export.py --format adapter                  # the LoRA adapter alone
    python inference/export.py --format merged --push-to-hub you/my-model [--private]

Writes <[export] output_dir>/<format>[-<type>]/ (models/exports/merged, models/exports/gguf-q8_0,
models/exports/ollama-q8_0, models/exports/adapter), each with a README.md model card; ONNX goes to
<[onnx] output_dir>/<precision>/, where the ONNX chat engine loads it.

    merged    float32 weights (never 4-bit) with the adapter merged into the ones it trained on
              (for QLoRA, the base's 4-bit weights dequantised): safetensors, tokenizer, chat
              template, and a generation_config.json with the end-of-turn tokens and [chat]'s
              sampling defaults
    gguf      a GGUF file of the merged model, converted and quantized by llama.cpp's own tools
              (pip install -r setup/requirements-gguf.txt); --quantize default: [export] quantize
    ollama    the GGUF and a Modelfile (chat template, system prompt, stop tokens, sampling):
              cd models/exports/ollama-q8_0 && ollama create my-model -f Modelfile
    onnx      model.onnx with the adapter as graph inputs, adapter.onnx_adapter (og.Adapters), and
              merged/ (the merged model built; --skip-merged leaves it out);
              --precision default: [onnx] precision. Chat: python inference/console_chat.py --backend onnx
    adapter   the adapter folder with run.json and eval.json, e.g. to push it alone

Before an export replaces the last one, it answers the held-out rows of the adapter's evaluation
through the runtime that serves it (transformers, llama.cpp, onnxruntime-genai); its exact match
goes into the adapter's eval.json under "exports", and an export that loses more than a few points
(tuner/export/check.py) is refused and never put in place. A killed export leaves the previous one.
--push-to-hub (merged, gguf, adapter) uploads the export with huggingface_hub, the token from
the HF_TOKEN environment variable.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

from tuner.export import ExportError, export_folder
from tuner.export.check import check_export, onnx_answers, record, transformers_answers
from tuner.export.merged import merge, sources, trained_base
from tuner.files import replace_folder
from tuner.serving.ort import ADAPTER_FILE, export_dir
from tuner.settings import (
    GGUF_TYPES,
    ONNX_PRECISIONS,
    PROVIDERS,
    Interrupted,
    in_workspace,
    run_script,
    script_parser,
    settings_for_script,
)

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("merged", "gguf", "ollama", "onnx", "adapter")
PUSHABLE = ("merged", "gguf", "adapter")
LLAMA_CPP = "model-cache/llama.cpp"  # llama.cpp's converter, fetched once


def main() -> None:
    parser = script_parser(__doc__, ROOT, "export.quantize=q4_k_m")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to export")
    parser.add_argument("--quantize", choices=GGUF_TYPES, help="gguf, ollama: default [export] quantize")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the export to this Hub repo (user/name)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    onnx = parser.add_argument_group("onnx")
    onnx.add_argument("--precision", choices=ONNX_PRECISIONS, help="default: [onnx] precision")
    onnx.add_argument(
        "--execution-provider",
        choices=sorted(set(PROVIDERS.values())),
        help="where the model will run (default: from [model] platform)",
    )
    onnx.add_argument("--skip-merged", action="store_true", help="do not build the merged model")
    parser.add_argument(
        "--max-loss",
        type=float,
        metavar="POINTS",
        help="keep an export that loses up to POINTS of held-out exact match against the adapter "
        "(default: 3, or 10 for 4-bit exports)",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failed export")
    args = parser.parse_args()
    settings = settings_for_script(args.settings, args.overrides)
    fmt = args.format
    if args.quantize and fmt not in ("gguf", "ollama"):
        parser.error("--quantize is for --format gguf or ollama")
    if (args.precision or args.execution_provider or args.skip_merged) and fmt != "onnx":
        parser.error("--precision, --execution-provider and --skip-merged are for --format onnx")
    if args.push_to_hub and fmt not in PUSHABLE:
        parser.error(f"--push-to-hub takes --format {', '.join(PUSHABLE)}")
    if args.max_loss is not None and not 0 <= args.max_loss <= 100:
        parser.error(f"--max-loss: {args.max_loss:g} is not a number of points from 0 to 100")
    if args.max_loss is not None and fmt == "adapter":
        parser.error("--max-loss is for exports that answer again (the adapter is checked by its own evaluation)")
    if args.private and not args.push_to_hub:
        parser.error("--private goes with --push-to-hub")
    if not args.push_to_hub:  # everything is local; never ask the Hub (huggingface_hub reads this at import)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sources(settings, ROOT)  # the base model and the adapter, before any long work
    if settings["model"]["threads"]:  # 1 for tiny matrices: threads cost more than they save
        import torch

        torch.set_num_threads(settings["model"]["threads"])

    quantize = args.quantize or settings["export"]["quantize"]
    if fmt == "onnx":
        precision = args.precision or settings["onnx"]["precision"]
        name, folder = f"onnx-{precision}", export_dir(settings, ROOT, precision)
    elif fmt in ("gguf", "ollama"):
        name, folder = f"{fmt}-{quantize}", export_folder(settings, ROOT, fmt, quantize)
    else:
        name, folder = fmt, export_folder(settings, ROOT, fmt)
    # Built beside its destination (the same file system, for the rename), swapped in whole when
    # checked: a half-written export never looks finished, and a kill keeps the last one.
    staging = folder.with_name(f".staging-{folder.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    out = staging / "export"
    max_loss = None if args.max_loss is None else args.max_loss / 100  # points -> a share, as check.py keeps it
    started = time.monotonic()
    try:
        if fmt == "onnx":
            info = export_onnx(settings, args, staging, out, name, max_loss)
        elif fmt == "adapter":
            info = export_adapter(settings, out)
        else:
            info = export_model(settings, fmt, staging, out, name, quantize, max_loss)
        info |= {"format": fmt, "model": settings["model"]["id"], "seconds": round(time.monotonic() - started, 1)}
        (out / "export.json").write_text(json.dumps(info, indent=2), "utf-8")
        write_card(settings, name, out)
    except KeyboardInterrupt:
        shutil.rmtree(staging, ignore_errors=True)
        raise Interrupted("interrupted: nothing was written; the previous export, if any, is kept") from None
    except ExportError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as err:  # the converters raise many kinds; keep their tracebacks out of the way
        shutil.rmtree(staging, ignore_errors=True)
        if args.debug:
            raise
        raise ExportError(f"the {fmt} export failed: {type(err).__name__}: {err} (--debug shows where)") from None
    replace_folder(out, folder)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"Exported to {shown(folder)} in {info['seconds']:.0f} s{figure(info)}")
    if args.push_to_hub:
        from tuner.export.publish import push

        url = push(folder, args.push_to_hub, (folder / "README.md").read_text("utf-8"), args.private)
        print(f"Pushed to {url}")


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def figure(info: dict[str, Any]) -> str:
    checked = info.get("check")
    if not checked or checked.get("adapter_exact_match") is None:
        return ""
    figure, adapter = format(checked["exact_match"], ".1%"), format(checked["adapter_exact_match"], ".1%")
    return f"; held-out exact match {figure} (the adapter: {adapter})"


def write_card(settings: dict[str, Any], name: str, out: Path) -> None:
    """The model card (README.md): what was trained on what, and how well it and this export do."""
    from tuner.export.card import model_card

    (out / "README.md").write_text(model_card(settings, ROOT, name), "utf-8")


def export_model(
    settings: dict[str, Any], fmt: str, staging: Path, out: Path, name: str, quantize: str, max_loss: float | None
) -> dict:
    """merged, gguf or ollama: the merged model, then (gguf, ollama) converted by llama.cpp."""
    merged = out if fmt == "merged" else staging / "merged"
    print("Merging the adapter into the base model's weights, in float32", flush=True)
    merge(settings, ROOT, merged)
    if fmt == "merged":  # through plain transformers, as its users will load it
        return {"check": check_export(name, settings, ROOT, out, partial(transformers_answers, out), max_loss)}
    from tuner.export.gguf import answers, convert  # llama.cpp: only for these formats

    out.mkdir()
    gguf = out / f"{settings['model']['id'].split('/')[-1]}-{quantize}.gguf"
    print(f"Converting to GGUF ({quantize}) with llama.cpp", flush=True)
    convert(merged, gguf, quantize, in_workspace(ROOT, LLAMA_CPP))
    if fmt == "ollama":
        from transformers import AutoTokenizer

        from tuner.export.ollama import modelfile

        template = AutoTokenizer.from_pretrained(merged).chat_template
        (out / "Modelfile").write_text(modelfile(settings, gguf.name, template), "utf-8")
    threads = settings["model"]["threads"]
    answer = partial(answers, gguf, threads=threads)
    figures = check_export(name, settings, ROOT, merged, lambda chats, budget: answer(chats, budget), max_loss)
    shutil.rmtree(merged)
    return {"check": figures, "quantize": quantize, "file": gguf.name}


def export_adapter(settings: dict[str, Any], out: Path) -> dict:
    """The adapter folder as it is (with run.json and eval.json), once it loads on the base model.
    Its figure is its own evaluation's: nothing new to generate."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuner.serving.hf import load_adapter

    base, adapter = sources(settings, ROOT)
    load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map="cpu"), adapter)
    figures = record("adapter", ROOT)
    shutil.copytree(adapter, out)
    # The base named by its Hub repo, not by this workspace's model-cache path: loaded by name
    # elsewhere (AutoPeftModelForCausalLM, the Hub's widgets), the adapter then finds its base.
    if settings["model"]["hf_repo"]:
        config = json.loads((out / "adapter_config.json").read_text("utf-8"))
        config["base_model_name_or_path"] = settings["model"]["hf_repo"]
        config["revision"] = settings["model"]["revision"] or None
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    return {"check": figures}


def export_onnx(
    settings: dict[str, Any], args: Any, staging: Path, out: Path, name: str, max_loss: float | None
) -> dict:
    """onnx: the base with the adapter as graph inputs, the adapter file, and the merged model."""
    from tuner.export.onnx import ADAPTER_NAME, build, extract_adapter

    precision = args.precision or settings["onnx"]["precision"]
    provider = args.execution_provider or PROVIDERS[settings["model"]["platform"]]
    base, adapter = sources(settings, ROOT)
    raw, cache = staging / "raw", staging / "cache"
    print(f"Building {settings['model']['id']} + adapter, {precision}, for {provider}", flush=True)
    # A QLoRA adapter sits on the base's dequantised 4-bit weights, the ones it was trained on.
    build(trained_base(settings, ROOT, staging / "hf-base"), raw, precision, provider, cache, adapter)
    count = extract_adapter(raw, out)
    for item in raw.iterdir():  # genai_config.json, tokenizer and chat template files
        if item.name not in ("model.onnx", "model.onnx.data"):
            shutil.copy2(item, out / item.name)
    shutil.rmtree(raw)
    if not args.skip_merged:
        print("Building the merged model (adapter merged into the weights)", flush=True)
        merge(settings, ROOT, staging / "hf-merged")
        build(staging / "hf-merged", out / "merged", precision, provider, cache, None)
    info: dict[str, Any] = {
        "precision": precision,
        "execution_provider": provider,
        "adapter_file": ADAPTER_FILE,
        "adapter_name": ADAPTER_NAME,
        "adapter_tensors": count,
        "merged": not args.skip_merged,
    }
    if provider != "cpu":  # onnxruntime-genai here runs CPU models only
        print(f"Not checked on the held-out rows: the check runs CPU models only, not {provider} ones", flush=True)
        return info
    threads = settings["model"]["threads"]
    answer = partial(onnx_answers, out, tokenizer_folder=base, adapter_file=out / ADAPTER_FILE, threads=threads)
    return info | {"check": check_export(name, settings, ROOT, base, answer, max_loss)}


if __name__ == "__main__":
    run_script(main)
