"""The chat engine itself, in-process: batching of concurrent requests, per-row stops, incremental
detokenisation, the merged adapter, and the QLoRA load settings.

Batching tests run the tiny random model without its adapter: its answers are long random
token streams (multi-byte pieces included), so any mix-up between rows, or any drift from left
padding, shows as a different answer.
"""

from __future__ import annotations

import random
import threading
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tuner.data import load_rows
from tuner.serving.engine import DONE, Job, PromptTooLong, Row, conversation, is_text
from tuner.serving.hf import Engine

TOKENS = 40


def settings_of(ws: Path) -> dict[str, Any]:
    return tomllib.loads((ws / "settings.toml").read_text("utf-8"))


@pytest.fixture(scope="module")
def engine(tiny_built: Path) -> Engine:
    eng = Engine(settings_of(tiny_built), tiny_built, baseonly=True)
    eng.gather_s = 0.0  # the tests decide what is batched: they queue jobs under the lock
    sizes: list[int] = []
    generate = eng.generate

    def recording(rows: list[Row]) -> None:
        sizes.append(len(rows))
        generate(rows)

    eng.generate = recording  # type: ignore[method-assign]
    eng.batch_sizes = sizes  # type: ignore[attr-defined]
    return eng


@pytest.fixture(scope="module")
def prompts(tiny_built: Path) -> list[list[dict[str, str]]]:
    """16 conversations of different lengths (so rows are padded differently)."""
    settings = settings_of(tiny_built)
    rows = load_rows(settings, tiny_built)
    return [conversation([], rows[i]["phrase"] + " and" * (i % 5), settings) for i in range(16)]


@pytest.fixture(scope="module")
def alone(engine: Engine, prompts: list[list[dict[str, str]]]) -> list[str]:
    """Each prompt's greedy answer, asked alone."""
    answers = [engine.reply(p, max_new_tokens=TOKENS) for p in prompts]
    assert engine.batch_sizes[-len(prompts) :] == [1] * len(prompts)
    return answers


def together(engine: Engine, jobs: list[tuple[list[dict[str, str]], dict[str, Any]]]) -> list[Job]:
    """Queue every job at once (the worker cannot take any before all are queued), then wait."""
    with engine.lock:
        queued = [engine.submit(messages, **options) for messages, options in jobs]
    for job in queued:
        job.answer = "".join(job.pieces())  # type: ignore[attr-defined]
    return queued


def test_concurrent_greedy_answers_equal_single_ones(engine: Engine, prompts, alone: list[str]) -> None:
    jobs = together(engine, [(p, {"max_new_tokens": TOKENS}) for p in prompts])
    assert engine.batch_sizes[-1] == 16
    assert [job.answer for job in jobs] == alone
    for job in jobs:
        assert job.stats["completion_tokens"] <= TOKENS
        assert job.stats["finish_reason"] in {"stop", "length"}


def test_a_cancelled_row_leaves_the_others_alone(engine: Engine, prompts, alone: list[str]) -> None:
    pieces: list[str] = []

    def cancel_after_two(item: Any) -> None:
        if isinstance(item, str):
            pieces.append(item)
            if len(pieces) == 2:
                victim.cancel.set()  # set from the worker thread, mid-generation

    with engine.lock:
        first = engine.submit(prompts[0], max_new_tokens=TOKENS)
        victim = engine.submit(prompts[1], on_item=cancel_after_two, max_new_tokens=TOKENS)
        last = engine.submit(prompts[2], max_new_tokens=TOKENS)
    assert "".join(first.pieces()) == alone[0]
    assert "".join(last.pieces()) == alone[2]
    assert engine.batch_sizes[-1] == 3
    assert victim.stats["finish_reason"] == "cancelled"
    # Within a token: the row took the one token after the cancel, and no more.
    assert "".join(pieces) == alone[1][: len("".join(pieces))]
    assert victim.stats["completion_tokens"] < TOKENS


def test_stop_strings_and_limits_end_their_row_only(engine: Engine, prompts, alone: list[str]) -> None:
    stop = alone[1][12:15]  # a stop string in the middle of row 1's answer
    cut = alone[1].index(stop)
    jobs = together(
        engine,
        [
            (prompts[0], {"max_new_tokens": TOKENS}),
            (prompts[1], {"max_new_tokens": TOKENS, "stop": ["never in there", stop]}),
            (prompts[2], {"max_new_tokens": 5}),
            (prompts[3], {"max_new_tokens": TOKENS}),
        ],
    )
    assert engine.batch_sizes[-1] == 4
    assert jobs[0].answer == alone[0] and jobs[3].answer == alone[3]
    assert jobs[1].answer == alone[1][:cut] and jobs[1].stats["finish_reason"] == "stop"
    assert alone[2].startswith(jobs[2].answer)
    assert jobs[2].stats["completion_tokens"] == 5 and jobs[2].stats["finish_reason"] == "length"


def test_a_prompt_too_long_fails_alone(engine: Engine, prompts, alone: list[str]) -> None:
    long = [{"role": "user", "content": "word " * engine.context}]
    with engine.lock:
        ok = engine.submit(prompts[0], max_new_tokens=TOKENS)
        bad = engine.submit(long, max_new_tokens=TOKENS)
    with pytest.raises(PromptTooLong):
        list(bad.pieces())
    assert "".join(ok.pieces()) == alone[0]


def test_sampling_options_batch_separately(engine: Engine, prompts) -> None:
    jobs = together(
        engine,
        [(p, {"max_new_tokens": 4, "temperature": 0.8 if i % 2 else 0.0}) for i, p in enumerate(prompts[:6])],
    )
    assert engine.batch_sizes[-2:] == [3, 3]  # the greedy three, then the sampled three
    assert all(job.stats["completion_tokens"] >= 1 for job in jobs)


def test_incremental_detokenisation_matches_a_full_decode(engine: Engine) -> None:
    """Random tokens (half characters, spaces, specials) decoded a few at a time give exactly
    the full decode, and a stop string cuts it where the full text has it."""
    tokenizer = engine.tokenizer
    rand = random.Random(13)
    ids = [rand.randrange(len(tokenizer)) for _ in range(300)]
    ids = [t for t in ids if t not in engine.end_ids]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    stop = full[200:203]

    def run(stop_strings: list[str]) -> tuple[list[str], dict[str, Any]]:
        got: list[str] = []
        job = Job([], {"max_new_tokens": 10**6, "stop": stop_strings}, got.append)
        fake = SimpleNamespace(tokenizer=tokenizer, end_ids=engine.end_ids, context=10**6, prompt_ids=lambda _: [1])
        row = Row(fake, job)  # type: ignore[arg-type]
        for token in ids:
            if row.add(token):
                break
        row.finish()
        return got, job.stats

    pieces, stats = run([])
    assert "".join(pieces) == full and stats["completion_tokens"] == len(ids)
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # never half a character mid-answer
    pieces, stats = run([stop])
    assert "".join(pieces) == full[: full.index(stop)] and stats["finish_reason"] == "stop"


def test_job_delivers_through_one_callback() -> None:
    got: list[Any] = []
    job = Job([], {}, got.append)
    job.put("a")
    job.put(DONE)
    assert got == ["a", DONE] and job.out.empty()
    plain = Job([], {})
    plain.put("b")
    plain.put(DONE)
    assert list(plain.pieces()) == ["b"]


def test_is_text() -> None:
    assert is_text("héllo 🙂") and not is_text("a\udc80b")


def test_merged_adapter_answers_like_peft(tuned_workspace: Path) -> None:
    """The adapter merged into the weights at load gives the greedy answers of the unmerged peft model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings = settings_of(tuned_workspace)
    engine = Engine(settings, tuned_workspace)
    assert not isinstance(engine.model, PeftModel)  # merged
    base = AutoModelForCausalLM.from_pretrained(tuned_workspace / settings["model"]["path"], dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tuned_workspace / "models" / "adapter").eval()
    for row in load_rows(settings, tuned_workspace)[:6]:
        messages = conversation([], row["phrase"], settings)
        ids = torch.tensor([engine.prompt_ids(messages)])
        with torch.inference_mode():
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        expected = engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        stats: dict[str, Any] = {}
        answer = "".join(engine.stream(messages, stats, max_new_tokens=8))
        # The peft run does not stop at the chat template's end token; the engine does.
        assert expected.startswith(answer) and answer, (answer, expected)


def test_worker_survives_many_small_batches(engine: Engine, prompts, alone: list[str]) -> None:
    """Jobs arriving from many threads at random moments: everyone still gets their own answer."""
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = engine.reply(prompts[i], max_new_tokens=TOKENS)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(16)] == alone
