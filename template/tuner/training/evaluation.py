"""Score the fine-tuned adapter against the base model on the held-out rows (never trained on).

Three rows: the base model as it is, the base model prompted as a user would prompt it instead of
fine-tuning ("base, prompted": for a column dataset, the labels when there are at most MAX_LABELS
of them, and [eval] prompt_examples rows of the training split as example turns), and the base
model with the adapter. Column datasets: greedy answers, scored by exact match (case-insensitive,
trimmed, first line) and by whether the expected answer is mentioned at all. Every dataset: the
loss and perplexity of the expected answers. Prints a table, a plain line when fine-tuning did not
beat the prompted base by DID_NOT_PAY, and three examples side by side, and writes eval.json
beside the adapter (the web page shows it).
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from tuner.data import IGNORE_INDEX, encode, load_rows, split_rows, to_messages
from tuner.settings import in_workspace
from tuner.training.precision import Device, decide

BATCH_SIZE = 16  # prompts generated together (left-padded): seconds, not minutes, on a CPU
MAX_LABELS = 20  # a target column with at most this many values is a label set, listed in the prompt
DID_NOT_PAY = 0.05  # the prompted base within 5 points of exact match: fine-tuning did not pay
# Prompts that all start with this many tokens or more (the prompted base's system message and
# examples) run those tokens once and each row only its own: the same numbers, several times faster.
MIN_SHARED = 64

Conversation = list[dict[str, str]]
Progress = Callable[[int], object]  # told how many rows were just done


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip().casefold()


def score(answer: str, expected: str) -> dict[str, bool]:
    return {
        "exact_match": first_line(answer) == first_line(expected),
        "mentioned": first_line(expected) in answer.casefold(),
    }


def prompt_examples(settings: dict[str, Any]) -> int:
    """[eval] prompt_examples: how many training rows the prompted base is shown (0 to 64)."""
    return settings["eval"]["prompt_examples"]  # checked by the settings


def few_shot(train_rows: list[dict[str, Any]], settings: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """What a user would put in the prompt instead of fine-tuning, from the training split only
    (never a held-out row): the labels, when the target column has at most MAX_LABELS values, and
    [eval] prompt_examples rows, picked reproducibly (data_seed) one label at a time, so that the
    examples show as many different answers as they can."""
    target = settings["dataset"]["target_column"]
    values = sorted({str(row[target]) for row in train_rows})
    labels = values if len(values) <= MAX_LABELS else []
    shuffled = train_rows[:]
    random.Random(settings["train"]["data_seed"]).shuffle(shuffled)
    by_answer: dict[str, list[dict[str, Any]]] = {}
    for row in shuffled:
        by_answer.setdefault(str(row[target]), []).append(row)
    queues, picked, k = list(by_answer.values()), [], prompt_examples(settings)
    while len(picked) < min(k, len(shuffled)):
        picked += [queue.pop(0) for queue in queues if queue][: k - len(picked)]
    return labels, picked


def prompted(
    row: dict[str, Any], settings: dict[str, Any], labels: list[str], examples: list[dict[str, Any]]
) -> Conversation:
    """One row in the prompted base's chat: the system message with the labels, each example as a
    user turn and its answer, then the row's own user turn and (last) its expected answer."""
    system = settings["prompt"]["system"]
    if labels:
        system = (system + "\n" if system else "") + f"Answer with one of: {', '.join(labels)}."
    messages = [{"role": "system", "content": system}] if system else []
    for example in [*examples, row]:
        messages += to_messages(example, settings)[-2:]  # the user turn and the answer
    return messages


def shared_prefix(sequences: list[list[int]], limit: int) -> int:
    """How many leading tokens every sequence shares (at most `limit`), or 0 when fewer than
    MIN_SHARED: not worth a cache."""
    shared = min([limit, *(len(s) for s in sequences)])
    for seq in sequences[1:]:
        shared = next((i for i in range(shared) if seq[i] != sequences[0][i]), shared)
    return shared if shared >= MIN_SHARED else 0


def prefix_cache(model: Any, ids: list[int]) -> tuple[Any, Any]:
    """The keys and values of the tokens every prompt starts with, computed once, and the logits
    of its last token (they predict the first token after it)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True)
    return out.past_key_values, out.logits[:, -1:]


def for_batch(cache: Any, size: int) -> Any:
    """A copy of the shared prefix's cache for `size` rows (each batch extends its own copy)."""
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(size)
    return cache


def generate(
    model: Any, tokenizer: Any, prompts: list[Conversation], max_new_tokens: int, done: Progress = int
) -> list[str]:
    """Greedy answers to many prompts, BATCH_SIZE at a time. A prefix shared by every prompt runs
    once; each row's own tokens follow it, padded in between (the attention mask skips the pads
    and the positions count only real tokens, so each row sees exactly its own prompt)."""
    import torch

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    shared = shared_prefix(ids, min(len(i) for i in ids) - 1)
    cache = prefix_cache(model, ids[0][:shared])[0] if shared else None
    pad = tokenizer.pad_token_id
    answers: list[str] = []
    for start in range(0, len(ids), BATCH_SIZE):
        own = [i[shared:] for i in ids[start : start + BATCH_SIZE]]
        width = max(len(i) for i in own)
        # Left-padded after the shared prefix: every row's prompt ends at the same place.
        rows = [ids[0][:shared] + [pad] * (width - len(i)) + i for i in own]
        mask = [[1] * shared + [0] * (width - len(i)) + [1] * len(i) for i in own]
        kwargs = {"past_key_values": for_batch(cache, len(own))} if cache is not None else {}
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor(rows, device=model.device),
                attention_mask=torch.tensor(mask, device=model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                **kwargs,
            )
        answers += tokenizer.batch_decode(out[:, shared + width :], skip_special_tokens=True)
        done(len(own))
    return [a.strip() for a in answers]


def answer_tokens(tokenizer: Any, expected: list[str]) -> int:
    """How many tokens a greedy answer may take: the longest expected answer and a few more (only
    its first line is scored), at most 64."""
    longest = max((len(tokenizer(e, add_special_tokens=False)["input_ids"]) for e in expected), default=0)
    return min(longest + 8, 64)


def answer_loss(
    model: Any,
    tokenizer: Any,
    conversations: list[Conversation],
    max_seq_len: int,
    last_only: bool = False,
    done: Progress = int,
) -> float:
    """Mean loss per answer token (labels on the assistant turns only, as in training; with
    last_only, on the last one only: the example answers of a prompt are not scored), BATCH_SIZE
    conversations at a time."""
    import torch

    examples = []
    for messages in conversations:
        example = encode(tokenizer, messages, max_seq_len)
        if last_only:
            text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            asked = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            example["labels"] = [IGNORE_INDEX] * min(asked, len(example["labels"])) + example["labels"][asked:]
        examples.append(example)
    # The shared prefix carries no labels (the example answers of a prompt are not scored).
    unlabelled = min(
        next((i for i, x in enumerate(e["labels"]) if x != IGNORE_INDEX), len(e["labels"])) for e in examples
    )
    shared = shared_prefix([e["input_ids"] for e in examples], unlabelled)
    if shared:
        cache, first = prefix_cache(model, examples[0]["input_ids"][:shared])
    total, count = 0.0, 0
    for start in range(0, len(examples), BATCH_SIZE):
        batch = examples[start : start + BATCH_SIZE]
        # Padded on the right: a causal model never looks ahead, and the pads carry no labels.
        width = max(len(e["input_ids"]) for e in batch) - shared
        ids = torch.tensor([e["input_ids"][shared:] + [0] * (width + shared - len(e["input_ids"])) for e in batch])
        labels = torch.tensor(
            [e["labels"][shared:] + [IGNORE_INDEX] * (width + shared - len(e["labels"])) for e in batch]
        )
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width + shared - len(e["input_ids"])) for e in batch])
        kwargs = {"past_key_values": for_batch(cache, len(batch))} if shared else {}
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kwargs).logits
        if shared:  # the prefix's last token predicts this batch's first one
            logits = torch.cat([first.expand(len(batch), -1, -1), logits], dim=1)
            labels = torch.cat([torch.full((len(batch), 1), IGNORE_INDEX), labels], dim=1)
        # Token t predicts token t + 1; summed here, divided once by every answer token at the end.
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device), reduction="sum"
        )
        total += losses.item()
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
        done(len(batch))
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
    """Base, prompted base and fine-tuned on the rows [train] eval_split and data_seed held out of
    training; prints the table and writes adapter/eval.json. The dataset error of tuner.data, if
    any, is raised, SettingsError for a bad [eval], and EngineError for an adapter that is damaged
    or does not fit the base model."""
    from tqdm.auto import tqdm

    from tuner.serving.hf import load_adapter  # the chat engine's checks, one message

    eval_split, data_seed = settings["train"]["eval_split"], settings["train"]["data_seed"]
    train_rows, held_out = split_rows(load_rows(settings, root), eval_split, data_seed)
    if not held_out:
        print("No held-out rows (eval_split is 0): nothing to evaluate.")
        return None
    ds = settings["dataset"]
    columns = ds["format"] == "columns"
    # The prompted base: for a column dataset (a chat dataset's rows bring their own prompts).
    labels, examples = few_shot(train_rows, settings) if columns else ([], [])
    conversations = {"base": [to_messages(row, settings) for row in held_out]}
    if labels or examples:
        conversations["prompted"] = [prompted(row, settings, labels, examples) for row in held_out]
    conversations["tuned"] = conversations["base"]
    max_seq_len = settings["train"]["max_seq_len"]
    model, tokenizer = load_model(settings, in_workspace(root, settings["model"]["path"]))
    model = load_adapter(model, adapter)
    expected = [str(row[ds["target_column"]]) for row in held_out] if columns else []
    budget = answer_tokens(tokenizer, expected)

    results: dict[str, dict[str, Any]] = {}
    steps = len(held_out) * (2 if columns else 1)  # the loss of each row, then (columns) its answer
    with tqdm(total=steps * len(conversations), desc="Evaluating", unit="row", dynamic_ncols=True) as bar:
        for name, chats in conversations.items():
            bar.set_postfix_str(name)
            # One model in memory: the base is the same weights with the adapter switched off.
            with nullcontext() if name == "tuned" else model.disable_adapter():
                # A prompt with examples is longer than training's max_seq_len: it is never cut.
                cut = max_seq_len if name != "prompted" else 1_000_000
                loss = answer_loss(model, tokenizer, chats, cut, name == "prompted", bar.update)
                asked = [chat[:-1] for chat in chats]
                answers = generate(model, tokenizer, asked, budget, bar.update) if columns else []
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
        **{name: result["metrics"] for name, result in results.items()},
    }
    if "prompted" in results:
        report["prompted_with"] = {
            "labels": labels,
            "examples": [
                {"input": to_messages(row, settings)[-2]["content"], "answer": str(row[ds["target_column"]])}
                for row in examples
            ],
        }
        if columns:
            gain = report["tuned"]["exact_match"] - report["prompted"]["exact_match"]
            report["fine_tuning_paid"] = gain >= DID_NOT_PAY
    if columns:
        report["examples"] = [
            {"input": chat[-2]["content"], **{name: r["answers"][i] for name, r in results.items()}, "expected": e}
            for i, (chat, e) in enumerate(zip(conversations["base"], expected, strict=True))
        ]
    (adapter / "eval.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), "utf-8")
    print_report(report, adapter / "eval.json", root)
    return report


def verdict(report: dict[str, Any]) -> str:
    """The plain line when the prompted base came within DID_NOT_PAY of the fine-tuned model."""
    if report.get("fine_tuning_paid", True):
        return ""
    prompted, tuned = 100 * report["prompted"]["exact_match"], 100 * report["tuned"]["exact_match"]
    how = "matches or beats" if prompted >= tuned else f"comes within {100 * DID_NOT_PAY:.0f} points of"
    return (
        f"Fine-tuning did not pay on this data: the base model, prompted with the labels and examples, {how} "
        f"the fine-tuned model ({prompted:.1f}% against {tuned:.1f}% exact match)."
    )


def print_report(report: dict[str, Any], path: Path, root: Path) -> None:
    def percent(value: float) -> str:
        return f"{100 * value:.1f}%"

    shown = [
        (name, title)
        for name, title in (("base", "base"), ("prompted", "base, prompted"), ("tuned", "tuned"))
        if name in report
    ]
    rows = [("exact match", "exact_match", percent), ("answer mentioned", "mentioned", percent)]
    rows += [("answer loss", "answer_loss", "{:.3f}".format), ("perplexity", "perplexity", "{:.2f}".format)]
    print(f"\nHeld-out evaluation: {report['held_out_rows']} rows the model never trained on")
    print(f"  {'':18}" + "".join(f" {title:>14}" for _, title in shown))
    for label, key, fmt in rows:
        if key in report["tuned"]:
            print(f"  {label:18}" + "".join(f" {fmt(report[name][key]):>14}" for name, _ in shown))
    if "prompted_with" in report:
        given = report["prompted_with"]
        told = f"the {len(given['labels'])} labels and " if given["labels"] else ""
        print(f"  base, prompted: the base model told {told}{len(given['examples'])} training rows as examples")
    line = verdict(report)
    if line:
        print(f"\n{line}")
    for example in report.get("examples", [])[:3]:
        print(f"\n  input:    {example['input']}")
        for name, _ in shown:
            print(f"  {name + ':':9} {example[name][:100]!r}")
        print(f"  expected: {example['expected']!r}")
    print(f"\nWritten to {path.relative_to(root) if path.is_relative_to(root) else path}")
