"""Every export answers the held-out rows before it is called done.

The rows are the ones the adapter's evaluation scored (the split of its run.json, as
finetuning/evaluate_adapter.py takes it), answered greedily through the runtime that will serve
the export (transformers for merged, onnxruntime-genai for ONNX, llama.cpp for GGUF) and scored
the same way (exact match of the first line, answer mentioned). The export's figures go into the
adapter's eval.json under "exports", beside the adapter's own, and an export that loses more than
its threshold of exact match against the adapter is refused: it is never swapped into place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuner.data import load_rows, split_rows, to_messages
from tuner.export import ExportError
from tuner.serving.engine import END_TOKENS
from tuner.settings import adapter_dir, trained_with
from tuner.training.evaluation import answer_tokens, generate, score

Conversation = list[dict[str, str]]

# How many points of held-out exact match an export may lose against the adapter. Full precision
# and 8 bits (merged, ONNX fp32/fp16, GGUF f16/q8_0) compute the same model up to rounding: 3 points
# allow a few answers that flip on a near tie. 4 bits (ONNX int4, GGUF q4_k_m) change the weights
# for real: 10 points, still far less than fine-tuning gains, catch an export that is broken.
LOSS = 0.03
LOSS_4BIT = 0.10
FOUR_BIT = ("int4", "q4")  # in an export's name: onnx-int4, gguf-q4_k_m, ollama-q4_k_m


def threshold(name: str) -> float:
    """The exact match the export `name` (its folder's name: merged, gguf-q8_0, onnx-int4) may lose."""
    return LOSS_4BIT if any(bits in name for bits in FOUR_BIT) else LOSS


def held_out(settings: dict[str, Any], root: Path) -> tuple[list[Conversation], list[str]]:
    """The held-out conversations without their answer turn, and the expected answers: the rows
    the adapter's evaluation scored (the split of the run that made it, from its run.json)."""
    trained = trained_with(adapter_dir(root))
    if trained is not None:
        settings = settings | {"train": trained["train"]}
    train = settings["train"]
    _, rows = split_rows(load_rows(settings, root), train["eval_split"], train["data_seed"])
    if not rows:
        raise ExportError("no held-out rows ([train] eval_split = 0): there is nothing to check the export on")
    chats = [to_messages(row, settings) for row in rows]
    return [chat[:-1] for chat in chats], [chat[-1]["content"] for chat in chats]


def transformers_answers(folder: Path, conversations: list[Conversation], max_new_tokens: int) -> list[str]:
    """Greedy answers of a Hugging Face folder, loaded as anyone would: plain transformers, its own
    tokenizer, chat template and generation config, no peft."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"  # as the evaluation generates: batched, padded before the prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()
    return generate(model, tokenizer, conversations, max_new_tokens)


def onnx_answers(
    folder: Path,
    conversations: list[Conversation],
    max_new_tokens: int,
    tokenizer_folder: Path,
    adapter_file: Path | None,
    threads: int = 0,
) -> list[str]:
    """Greedy answers of an ONNX Runtime GenAI model (with its adapter file, as the ONNX engine
    serves it), the prompt written by the Hugging Face tokenizer's chat template as the engine does."""
    import numpy as np
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = og.Config(str(folder))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    adapters = None
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "finetuned")
    vocab = tokenizer.get_vocab()
    ends = {vocab[t] for t in END_TOKENS if t in vocab} | {tokenizer.eos_token_id}
    answers = []
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        if adapters is not None:
            generator.set_active_adapter(adapters, "finetuned")
        generator.append_tokens(np.array([ids], dtype=np.int32))
        tokens: list[int] = []
        while len(tokens) < max_new_tokens and not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in ends:
                break
            tokens.append(token)
        answers.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return answers


def check_export(
    name: str,
    settings: dict[str, Any],
    root: Path,
    tokenizer_folder: Path,
    answer: Callable[[list[Conversation], int], list[str]],
    max_loss: float | None = None,
) -> dict:
    """held_out(), answered by `answer(conversations, max_new_tokens)` (the export's runtime), then
    check(). The tokenizer of `tokenizer_folder` sizes the answers as the evaluation did."""
    from transformers import AutoTokenizer

    conversations, expected = held_out(settings, root)
    budget = answer_tokens(AutoTokenizer.from_pretrained(tokenizer_folder), expected)
    print(f"Checking {name}: {len(expected)} held-out rows", flush=True)
    return check(name, answer(conversations, budget), expected, settings, root, max_loss)


def evaluation(root: Path) -> tuple[dict[str, Any], Path]:
    """The adapter's eval.json and its path, or ExportError."""
    path = adapter_dir(root) / "eval.json"
    try:
        return json.loads(path.read_text("utf-8")), path
    except (OSError, ValueError):
        raise ExportError(
            f"no readable {path}: an export is checked against the adapter's held-out evaluation; "
            "run `python finetuning/evaluate_adapter.py` first"
        ) from None


def record(name: str, root: Path, figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write eval.json["exports"][name] = figures (default: the adapter's own "tuned" figures, for
    the adapter exported as it is) and return them. Atomic: a kill leaves the old file or the new."""
    report, path = evaluation(root)
    if figures is None:
        tuned = report.get("tuned", {})
        figures = {key: tuned[key] for key in ("exact_match", "mentioned") if key in tuned}
        figures |= {"adapter_exact_match": tuned.get("exact_match"), "held_out_rows": report.get("held_out_rows")}
    report.setdefault("exports", {})[name] = figures
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(json.dumps(report, indent=1, ensure_ascii=False), "utf-8")
    os.replace(staged, path)
    return figures


def check(
    name: str,
    answers: list[str],
    expected: list[str],
    settings: dict[str, Any],
    root: Path,
    max_loss: float | None = None,
) -> dict:
    """Score the export `name`'s answers to the held-out rows against the adapter's exact match
    (its eval.json). Within max_loss (a share; default threshold(name)): records the figures in
    eval.json["exports"][name] and returns them. Otherwise ExportError, and eval.json keeps the
    figures of the export in place."""
    report, path = evaluation(root)
    if report.get("held_out_rows") != len(expected):
        raise ExportError(
            f"{path} scored {report.get('held_out_rows')} held-out rows, the export {len(expected)}: "
            "the dataset or the split changed since; run `python finetuning/evaluate_adapter.py` again"
        )
    scores = [score(a, e) for a, e in zip(answers, expected, strict=True)]
    figures: dict[str, Any] = {
        key: round(sum(s[key] for s in scores) / len(scores), 4) for key in ("exact_match", "mentioned")
    }
    tuned = report.get("tuned", {}).get("exact_match")
    limit = threshold(name) if max_loss is None else max_loss
    figures |= {"adapter_exact_match": tuned, "threshold": limit, "held_out_rows": len(expected)}
    if tuned is not None and figures["exact_match"] < tuned - limit - 1e-9:
        got, bar = format(figures["exact_match"], ".1%"), format(tuned, ".1%")  # no "%" + "}" in a .py file
        raise ExportError(
            f"the {name} export answers {got} of the {len(expected)} held-out rows exactly, "
            f"the adapter {bar}: it loses more than {100 * limit:g} points, so it was not kept "
            "(a higher precision loses less; --max-loss POINTS keeps it anyway)"
        )
    return record(name, root, figures)
