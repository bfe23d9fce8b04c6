"""Stop strings in the chat engine (tuner/serving/engine.py Row), in-process with a one-character-per-token
tokenizer: what is shown while tokens arrive, where the answer is cut, and that the check costs
time linear in the answer, whatever the length of the stop strings (a red team froze the engine
for a minute with one request whose stop string was a few hundred kilobytes long).
"""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any

from tuner.serving.engine import Job, Row


class CharTokenizer:
    """Token i is the character chr(i)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def feed(text: str, stop: list[str]) -> tuple[list[tuple[int, str]], dict[str, Any]]:
    """Feed `text` one character per token; (tokens fed so far, piece shown) and the job's stats."""
    shown: list[tuple[int, str]] = []
    fed = 0
    job = Job([], {"max_new_tokens": 10**9, "stop": stop}, lambda piece: shown.append((fed, piece)))
    engine = SimpleNamespace(tokenizer=CharTokenizer(), end_ids=set(), context=10**9, prompt_ids=lambda _: [1])
    row = Row(engine, job)  # type: ignore[arg-type]
    for char in text:
        fed += 1
        if row.add(ord(char)):
            break
    row.finish()
    return shown, job.stats


def held_back(text: str, stop: list[str]) -> int:
    """The obvious definition: the longest end of `text` that begins some stop string."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def test_stop_strings_match_the_obvious_definition() -> None:
    """Seeded random texts and stop strings over a small alphabet (so prefixes overlap a lot):
    the answer is cut before the earliest stop string, and after every token exactly the text
    that cannot be the start of a stop string has been shown."""
    rand = random.Random(7)
    for _ in range(2000):
        text = "".join(rand.choice("abc") for _ in range(rand.randrange(0, 40)))
        stop = ["".join(rand.choice("abc") for _ in range(rand.randrange(1, 7))) for _ in range(rand.randrange(1, 5))]
        shown, stats = feed(text, stop)
        # The answer ends at the first token that completes a stop string, before the earliest
        # stop string in the text so far.
        done = next((n for n in range(1, len(text) + 1) if any(s in text[:n] for s in stop)), None)
        end = len(text) if done is None else min(i for s in stop if (i := text[:done].find(s)) >= 0)
        assert "".join(p for _, p in shown) == text[:end], (text, stop)
        assert stats["finish_reason"] == ("length" if done is None else "stop"), (text, stop)
        so_far = ""
        for fed, piece in shown:
            so_far += piece
            if fed != done and fed < len(text):
                assert len(so_far) == fed - held_back(text[:fed], stop), (text, stop, fed)


def test_a_long_stop_string_costs_time_linear_in_the_answer() -> None:
    """A 100,000-character stop string the answer keeps matching the start of: 200 tokens took
    tens of seconds (every token compared every prefix of the stop string); now well under a
    second. The bound is generous (a loaded machine), the old cost far above it."""
    stop = "a" * 100_000 + "b"
    start = time.process_time()
    shown, stats = feed("a" * 200 + "c", ["zz", stop])
    took = time.process_time() - start
    assert "".join(p for _, p in shown) == "a" * 200 + "c" and stats["finish_reason"] == "length"
    assert shown[0][0] == 201  # all held back until the "c" ruled the stop string out
    assert took < 3, f"{took:.1f} s of CPU for 201 tokens"
