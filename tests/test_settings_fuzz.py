"""A fuzz test of the settings surfaces that stays in CI: seeded, generated `--set` overrides and
hand edits of settings.toml. The contract: the settings are accepted, or refused with one
SettingsError line (in-process, thousands of cases); and the scripts, given the worst of them,
exit non-zero with one `error:` line and no traceback (a few subprocess runs)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from conftest import run_py
from tuner.data import DatasetError, check_prompt
from tuner.settings import SettingsError, check_train, load_settings, with_overrides

SEED = 20261207
CASES = 3000

# Value texts as a user (or a typo) writes them after `=`.
VALUES = [
    "0",
    "1\nb",  # a newline typed into a --set value
    "x\ry",
    '"multi\nline"',
    "-1",
    "1",
    "3e-4",
    "1e309",
    "-1e309",
    "inf",
    "nan",
    "-0.0",
    "4294967296",
    "99999999999999999999",
    "true",
    "false",
    "True",
    '""',
    '"x"',
    "x",
    "[]",
    '["q_proj"]',
    "[1, 2]",
    "{}",
    "{a = 1}",
    "'single'",
    '"a\\nb"',
    "\ufeff1",
    "é",
    "\x00",
    "  7  ",
    "=",
    "1=2",
    '"' + "y" * 5000 + '"',
    "[[[[",
    "0x10",
    "1_000",
]
KEYS = ["", ".", "train", "train.", ".lr", "train.nope", "nope.key", "train.seed.x", "TRAIN.seed"]


def override(rng: random.Random, settings: dict) -> str:
    """One `--set` item: mostly real keys, some broken names, any value text."""
    if rng.random() < 0.85:
        section = rng.choice([s for s in settings if isinstance(settings[s], dict)])
        name = f"{section}.{rng.choice(list(settings[section]))}"
    else:
        name = rng.choice(KEYS)
    separator = rng.choice(["=", "=", "=", " = ", ""])
    return f"{name}{separator}{rng.choice(VALUES)}"


@pytest.fixture(scope="module")
def settings(render_factory) -> dict:
    return load_settings(render_factory(model="tiny-random", platform="cpu", mode="local") / "settings.toml")


def test_generated_overrides_are_accepted_or_one_line(settings: dict) -> None:
    rng = random.Random(SEED)
    start, accepted, refused = time.monotonic(), 0, 0
    for _ in range(CASES):
        items = [override(rng, settings) for _ in range(rng.randint(1, 3))]
        try:
            changed = with_overrides(settings, items)
            check_train(changed)
            check_prompt(changed)
            accepted += 1
        except (SettingsError, DatasetError) as err:
            message = str(err)
            assert message and "\n" not in message and "Traceback" not in message, (items, message)
            refused += 1
        # Anything else (TypeError, KeyError, OverflowError...) is a traceback for the user: it fails here.
    seconds = time.monotonic() - start
    print(f"settings fuzz: {CASES} cases, {accepted} accepted, {refused} refused, {seconds:.1f} s")
    assert accepted > 50 and refused > 1000  # the generator reaches both sides


def test_generated_hand_edits_are_accepted_or_one_line(settings: dict, tmp_path: Path) -> None:
    """settings.toml edited by hand: a line of [train] replaced by a generated one."""
    rng = random.Random(SEED + 1)
    lines = [
        f"{k} = {v!r}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}" for k, v in settings["train"].items()
    ]
    path = tmp_path / "settings.toml"
    for _ in range(500):
        edited = list(lines)
        edited[rng.randrange(len(edited))] = f"{rng.choice(list(settings['train']))} = {rng.choice(VALUES)}"
        if rng.random() < 0.1:
            edited.insert(0, rng.choice(["<<<<<<< ours", "[train", "\ufeff", "=== x"]))
        path.write_text("[train]\n" + "\n".join(edited) + "\n", "utf-8")
        try:
            check_train(load_settings(path))
        except SettingsError as err:
            assert "\n" not in str(err), str(err)


@pytest.mark.slow
def test_scripts_answer_the_worst_overrides_in_one_line(tuned_workspace: Path) -> None:
    """A few generated refusals through the scripts themselves: exit 1, one `error:` line, no traceback."""
    rng = random.Random(SEED + 2)
    settings = load_settings(tuned_workspace / "settings.toml")
    refused: list[str] = []
    while len(refused) < 6:
        item = override(rng, settings)
        try:
            check_train(with_overrides(settings, [item]))
        except SettingsError:
            refused.append(item)
    scripts = ["finetuning/invoke_olive.py", "finetuning/train_sft.py", "inference/gradio_chat.py"]
    for i, item in enumerate(refused):
        run = run_py(tuned_workspace, scripts[i % len(scripts)], "--set", item, timeout=120)
        assert run.returncode == 1 and "Traceback" not in run.stderr, (item, run.stderr[-2000:])
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), (item, run.stderr)
