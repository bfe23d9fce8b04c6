"""The model card (README.md) of an export pushed to the Hugging Face Hub: what was trained, on
what, how well it does on the held-out rows, and how to run it.

The metadata at the top is what the Hub reads and validates (base_model, library_name, license,
tags, datasets, model-index); it is written with huggingface_hub's own ModelCardData, so it is in
the form the Hub's parser expects. The figures come from the adapter's run.json (what it was
trained with) and eval.json (base, prompted base and fine-tuned on the held-out rows, and each
export's own check under "exports").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuner.data import load_rows, split_rows
from tuner.export import ExportError
from tuner.settings import RUN_RECORD, WorkspaceError, adapter_dir, in_workspace

# The Hub's library for each export format (the "Use this model" button, the download counter).
LIBRARIES = {"adapter": "peft", "merged": "transformers", "gguf": "gguf", "ollama": "gguf", "onnx": "onnxruntime-genai"}
# Figures of eval.json put in the card and its model-index (columns datasets have all four).
METRICS = {"exact_match": "exact match", "mentioned": "answer mentioned", "perplexity": "perplexity"}
# eval.json's rows, in the order of the table.
ROWS = {"base": "base model", "prompted": "base model, prompted", "tuned": "fine-tuned (adapter)"}
PLACEHOLDER = "YOUR-NAME/YOUR-MODEL"  # the usage lines when the repo is not known yet


def model_card(settings: dict[str, Any], root: Path, export_name: str, repo_id: str = "") -> str:
    """README.md for the export `export_name` (its folder under [export] output_dir: "merged",
    "gguf-q8_0", "adapter", ...), from the adapter's run.json and eval.json. `repo_id` (optional)
    is put in the usage lines."""
    adapter = adapter_dir(root)
    try:
        run = json.loads((adapter / RUN_RECORD).read_text("utf-8"))
    except (OSError, ValueError):
        raise ExportError(f"{adapter / RUN_RECORD} is missing or unreadable: fine-tune first") from None
    trained = run.get("settings") or settings  # what the adapter was trained with, not today's settings
    try:
        report: dict[str, Any] = json.loads((adapter / "eval.json").read_text("utf-8"))
    except (OSError, ValueError):
        report = {}  # not evaluated (--no-eval, or eval_split 0): a card without figures
    fmt, _, kind = export_name.partition("-")
    data = _metadata(trained, settings, report, export_name, fmt, kind, repo_id)
    body = _body(trained, settings, root, report, export_name, fmt, kind, repo_id or PLACEHOLDER)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _base_repo(trained: dict[str, Any]) -> str:
    """The base model's Hub repo ("" for one built offline, like tiny-random)."""
    return trained["model"].get("hf_repo") or ""


def _results(report: dict[str, Any], export_name: str) -> dict[str, dict[str, float]]:
    """The rows of the held-out table that have figures: base, prompted, tuned, then this export."""
    rows = {name: report[name] for name in ROWS if isinstance(report.get(name), dict)}
    own = (report.get("exports") or {}).get(export_name)
    if isinstance(own, dict):
        rows["export"] = own
    return {name: {k: row[k] for k in METRICS if k in row} for name, row in rows.items()}


def _title(name: str, export_name: str) -> str:
    return f"this export ({export_name})" if name == "export" else ROWS[name]


def _metadata(
    trained: dict[str, Any],
    settings: dict[str, Any],
    report: dict[str, Any],
    export_name: str,
    fmt: str,
    kind: str,
    repo_id: str,
) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    ds, train = trained["dataset"], trained["train"]
    base = _base_repo(trained)
    # A held-out split of the training data: its Hub id when it is from the Hub, else a plain name.
    dataset_id = {"huggingface": ds["hf_id"], "sample": "sample"}.get(ds["source"], Path(ds["path"]).stem)
    held_out = report.get("held_out_rows", 0)
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=dataset_id,
            dataset_name=f"{dataset_id}, {held_out} held-out rows",
            dataset_split="held-out",
            metric_type=metric,
            metric_name=f"{METRICS[metric]}, {_title(name, export_name)}",
            metric_value=value,
        )
        for name, row in _results(report, export_name).items()
        for metric, value in row.items()
    ]
    license_ = trained["model"].get("license") or settings["model"].get("license") or None
    tags = [train["method"], "sft", "copier-finetune", fmt] + ([kind] if kind else [])
    return ModelCardData(
        base_model=base or None,
        # How the Hub relates it to the base: an adapter of it, or a fine-tune (merged weights).
        base_model_relation={"adapter": "adapter", "merged": "finetune"}.get(fmt),
        library_name=LIBRARIES.get(fmt),
        license=license_,
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
        datasets=[ds["hf_id"]] if ds["source"] == "huggingface" else None,
        model_name=repo_id or export_name,
        eval_results=results or None,
    )


def _rows(trained: dict[str, Any], root: Path, held_out: int) -> str:
    """How many rows trained it (the dataset read again, split as training split it), or "".
    A Hub dataset is not downloaded again for this: only the held-out count is said."""
    if trained["dataset"]["source"] == "huggingface":
        return f"{held_out} rows held out" if held_out else ""
    try:
        train_rows, _ = split_rows(
            load_rows(trained, root), trained["train"]["eval_split"], trained["train"]["data_seed"]
        )
    except WorkspaceError:
        return ""  # the dataset is gone or unreachable: the card says less
    return f"{len(train_rows)} rows trained on, {held_out} held out"


def _body(
    trained: dict[str, Any],
    settings: dict[str, Any],
    root: Path,
    report: dict[str, Any],
    export_name: str,
    fmt: str,
    kind: str,
    repo: str,
) -> str:
    model, ds, train = trained["model"], trained["dataset"], trained["train"]
    base = _base_repo(trained)
    base_text = (
        f"[{base}](https://huggingface.co/{base})" if base else f"`{model['id']}` (built offline, not on the Hub)"
    )
    method = "QLoRA (4-bit base)" if train["method"] == "qlora" else "LoRA"
    what = {
        "adapter": "the LoRA adapter alone (load it on the base model with peft)",
        "merged": "the base model with the adapter merged into its weights, in full precision",
        "gguf": f"a GGUF file ({kind or 'llama.cpp'}) of the merged model, for llama.cpp",
        "ollama": f"a GGUF file ({kind}) of the merged model with an Ollama Modelfile",
        "onnx": f"an ONNX Runtime GenAI build ({kind}) of the merged model",
    }.get(fmt, export_name)
    source = {
        "huggingface": f"[{ds['hf_id']}](https://huggingface.co/datasets/{ds['hf_id']}) (split `{ds['split']}`)",
        "sample": f"the workspace's sample dataset (`{ds['path']}`)",
    }.get(ds["source"], f"a local dataset (`{Path(ds['path']).name}`)")
    held_out = report.get("held_out_rows", 0)
    counts = _rows(trained, root, held_out)
    quantized = f" ({train['quant_type']}, double quantization {train['double_quant']})" if method != "LoRA" else ""
    hyper = [
        ("method", method + quantized),
        ("LoRA r / alpha / dropout", f"{train['lora_r']} / {train['lora_alpha']} / {train['lora_dropout']}"),
        ("target modules", ", ".join(train["target_modules"])),
        ("learning rate, schedule", f"{train['learning_rate']}, {train['lr_scheduler_type']}"),
        ("epochs / max steps", f"{train['num_train_epochs']} / {train['max_steps']}"),
        (
            "batch size x accumulation",
            f"{train['per_device_train_batch_size']} x {train['gradient_accumulation_steps']}",
        ),
        ("max sequence length", str(train["max_seq_len"])),
        ("compute dtype", train["compute_dtype"]),
        ("seed / data seed", f"{train['seed']} / {train['data_seed']}"),
    ]
    columns = f" (inputs {', '.join(ds['input_columns'])}, answer {ds['target_column']})"
    lines = [
        f"# {repo.split('/')[-1] if repo != PLACEHOLDER else export_name}",
        "",
        f"A fine-tune of {base_text} with {method}: {what}.",
        "",
        "## Training",
        "",
        f"Data: {source}" + (f"; {counts}" if counts else "") + ".",
        f"Format: {ds['format']}" + (columns if ds["format"] == "columns" else "") + ".",
        "",
        "| hyperparameter | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in hyper],
        "",
        *_table(report, export_name, held_out),
        *_usage(settings, root, export_name, fmt, kind, repo, base, trained),
        "## Limitations",
        "",
        f"- The figures above are from {held_out or 'the'} held-out rows of the same dataset: they say how well it "
        "learned this task, not how it does on anything else. On a small dataset they move by several points "
        "from one seed to the next.",
        "- It inherits the base model's limitations, biases and licence; fine-tuning on a narrow task can make it "
        "worse at everything else.",
        "- It was not evaluated for safety or factuality. Check its answers before relying on them.",
        "",
    ]
    return "\n".join(lines)


def _table(report: dict[str, Any], export_name: str, held_out: int) -> list[str]:
    results = _results(report, export_name)
    if not results:
        return ["Not evaluated on held-out rows.", ""]
    metrics = [m for m in METRICS if any(m in row for row in results.values())]

    def cell(row: dict[str, float], metric: str) -> str:
        if metric not in row:
            return "-"
        return f"{row[metric]:.2f}" if metric == "perplexity" else f"{100 * row[metric]:.1f}%"

    return [
        "## Held-out evaluation",
        "",
        f"{held_out} rows the model never trained on, greedy answers; exact match compares the first line "
        "(case and spaces ignored).",
        "",
        "| | " + " | ".join(METRICS[m] for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
        *[
            f"| {_title(name, export_name)} | " + " | ".join(cell(row, m) for m in metrics) + " |"
            for name, row in results.items()
        ],
        "",
    ]


def _usage(
    settings: dict[str, Any],
    root: Path,
    export_name: str,
    fmt: str,
    kind: str,
    repo: str,
    base: str,
    trained: dict[str, Any],
) -> list[str]:
    system = trained["prompt"]["system"]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "..."}]
    if fmt == "merged":
        code = [
            "```python",
            "from transformers import pipeline",
            "",
            f'chat = pipeline("text-generation", model="{repo}")',
            f'print(chat({messages!r}, max_new_tokens=128)[0]["generated_text"][-1]["content"])',
            "```",
        ]
    elif fmt == "adapter":
        code = [
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base or "PATH/TO/BASE"}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{base or "PATH/TO/BASE"}")',
            "```",
        ]
    elif fmt in ("gguf", "ollama"):
        tag = kind.upper() or "Q8_0"
        folder = in_workspace(root, settings["export"]["output_dir"]) / export_name
        names = sorted(p.name for p in folder.glob("*.gguf"))
        code = [
            "```bash",
            "# llama.cpp",
            f"llama-server -hf {repo}:{tag}",
            "# Ollama, straight from the Hub",
            f"ollama run hf.co/{repo}:{tag}",
        ]
        if fmt == "ollama":
            code += ["# or with the Modelfile (chat template, stop tokens, system prompt), after downloading the repo"]
            code += [f"ollama create {repo.split('/')[-1].lower()} -f Modelfile"]
        code += ["```"]
        if names:
            code += ["", f"File: `{'`, `'.join(names)}`."]
    else:
        code = [f"See the files of this repository ({export_name})."]
    return ["## Use it", "", *code, ""]
