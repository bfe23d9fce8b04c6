"""Score the fine-tuned adapter against the base model on the held-out rows (never trained on).

Column datasets: greedy answers, scored by exact match (case-insensitive, trimmed, first line)
and by whether the expected answer is mentioned at all. Every dataset: the loss and perplexity
of the expected answers. Prints a table and three examples side by side, and writes eval.json
beside the adapter (the web page shows it).
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from tuner.data import encode, load_rows, split_rows, to_messages
from tuner.settings import in_workspace
from tuner.training.precision import Device, decide

BATCH_SIZE = 16  # prompts generated together (left-padded): seconds, not minutes, on a CPU


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip().casefold()


def score(answer: str, expected: str) -> dict[str, bool]:
    return {
        "exact_match": first_line(answer) == first_line(expected),
        "mentioned": first_line(expected) in answer.casefold(),
    }


def generate(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
    """Greedy answers to many prompts, BATCH_SIZE at a time."""
    import torch

    answers: list[str] = []
    for start in range(0, len(prompts), BATCH_SIZE):
        texts = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts[start : start + BATCH_SIZE]
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def answer_loss(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_seq_len: int, settings: dict[str, Any]
) -> float:
    """Mean loss per answer token (labels on the assistant turns only, as in training)."""
    import torch

    total, count = 0.0, 0
    for row in rows:
        example = encode(tokenizer, to_messages(row, settings), max_seq_len)
        n = sum(label != -100 for label in example["labels"][1:])  # the first token predicts nothing
        if n == 0:
            continue
        ids = torch.tensor([example["input_ids"]], device=model.device)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=torch.tensor([example["labels"]], device=model.device)).loss
        total, count = total + loss.item() * n, count + n
    return total / max(count, 1)


def load_model(settings: dict[str, Any], path: Path) -> tuple[Any, Any]:
    """The base model as it was fine-tuned ([train] and the precision policy): 4-bit for QLoRA,
    in the policy's dtype, on the GPU when there is one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    precision = decide(settings["train"], Device.detect())
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # generation continues after the prompt, so pad before it
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **precision.load_kwargs())
    return model.eval(), tokenizer


def evaluate(adapter: Path, settings: dict[str, Any], root: Path) -> dict[str, Any] | None:
    """Base vs fine-tuned on the rows [train] eval_split and data_seed held out of training;
    prints the table and writes adapter/eval.json. The dataset error of tuner.data, if any, is
    raised, and EngineError for an adapter that is damaged or does not fit the base model."""
    from tuner.serving.hf import load_adapter  # the chat engine's checks, one message

    eval_split, data_seed = settings["train"]["eval_split"], settings["train"]["data_seed"]
    _, held_out = split_rows(load_rows(settings, root), eval_split, data_seed)
    if not held_out:
        print("No held-out rows (eval_split is 0): nothing to evaluate.")
        return None
    ds = settings["dataset"]
    columns = ds["format"] == "columns"
    max_seq_len = settings["train"]["max_seq_len"]
    model, tokenizer = load_model(settings, in_workspace(root, settings["model"]["path"]))
    model = load_adapter(model, adapter)
    prompts = [to_messages(row, settings)[:-1] for row in held_out]
    expected = [str(row[ds["target_column"]]) for row in held_out] if columns else []
    longest = max((len(tokenizer(e, add_special_tokens=False)["input_ids"]) for e in expected), default=0)

    results: dict[str, dict[str, Any]] = {}
    for name in ("base", "tuned"):
        adapter_on = name == "tuned"
        # One model in memory: the base is the same weights with the adapter switched off.
        with nullcontext() if adapter_on else model.disable_adapter():
            loss = answer_loss(model, tokenizer, held_out, max_seq_len, settings)
            answers = generate(model, tokenizer, prompts, min(longest + 8, 64)) if columns else []
        metrics: dict[str, Any] = {"answer_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3)}
        if columns:
            scores = [score(a, e) for a, e in zip(answers, expected, strict=True)]
            for key in ("exact_match", "mentioned"):
                metrics[key] = round(sum(s[key] for s in scores) / len(scores), 4)
        results[name] = {"metrics": metrics, "answers": answers}

    report: dict[str, Any] = {
        "held_out_rows": len(held_out),
        "eval_split": eval_split,
        "data_seed": data_seed,
        "base": results["base"]["metrics"],
        "tuned": results["tuned"]["metrics"],
    }
    if columns:
        report["examples"] = [
            {"input": p[-1]["content"], "base": b, "tuned": t, "expected": e}
            for p, b, t, e in zip(
                prompts, results["base"]["answers"], results["tuned"]["answers"], expected, strict=True
            )
        ]
    (adapter / "eval.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), "utf-8")
    print_report(report, adapter / "eval.json", root)
    return report


def print_report(report: dict[str, Any], path: Path, root: Path) -> None:
    def percent(value: float) -> str:
        return f"{100 * value:.1f}%"

    rows = [("exact match", "exact_match", percent), ("answer mentioned", "mentioned", percent)]
    rows += [("answer loss", "answer_loss", "{:.3f}".format), ("perplexity", "perplexity", "{:.2f}".format)]
    print(f"\nHeld-out evaluation: {report['held_out_rows']} rows the model never trained on")
    print(f"  {'':18} {'base':>8} {'tuned':>8}")
    for label, key, fmt in rows:
        if key in report["tuned"]:
            print(f"  {label:18} {fmt(report['base'][key]):>8} {fmt(report['tuned'][key]):>8}")
    for example in report.get("examples", [])[:3]:
        print(f"\n  input:    {example['input']}")
        print(f"  base:     {example['base'][:100]!r}")
        print(f"  tuned:    {example['tuned'][:100]!r}")
        print(f"  expected: {example['expected']!r}")
    print(f"\nWritten to {path.relative_to(root) if path.is_relative_to(root) else path}")
