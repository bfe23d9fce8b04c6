"""A fuzz test of the settings surfaces that stays in CI: seeded, generated `--set` overrides and
hand edits of settings.toml (any table). The contract: the settings are accepted, and then every
value is of its setting's type and within its range, or refused with one SettingsError line
(in-process, thousands of cases); and the scripts, given the worst of them, exit non-zero with one
`error:` line and no traceback (a few subprocess runs)."""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import pytest
from conftest import run_py
from tuner.data import DatasetError, check_prompt
from tuner.settings import SECTIONS, SettingsError, load_settings, with_overrides

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
def workspace(render_factory) -> Path:
    return render_factory(model="tiny-random", platform="cpu", mode="both")


@pytest.fixture(scope="module")
def settings(workspace: Path) -> dict:
    return load_settings(workspace / "settings.toml")


def assert_sound(settings: dict[str, Any]) -> None:
    """What load_settings and with_overrides promise of settings they accept: every setting of
    every table there, of its type, within its range or choices."""
    for section, table in settings.items():
        model = SECTIONS[section]
        kinds = get_type_hints(model)
        assert list(table) == [f.name for f in fields(model)], section
        for spec in fields(model):
            value, kind, rule = table[spec.name], kinds[spec.name], spec.metadata["rule"]
            if get_origin(kind) is list:
                assert all(type(item) is str for item in value), (section, spec.name, value)
            else:
                assert type(value) is kind, (section, spec.name, value)
            assert kind is not float or math.isfinite(value), (section, spec.name, value)
            assert rule is None or rule.ok(value), (section, spec.name, value)


def test_generated_overrides_are_accepted_or_one_line(settings: dict) -> None:
    rng = random.Random(SEED)
    start, accepted, refused = time.monotonic(), 0, 0
    for _ in range(CASES):
        items = [override(rng, settings) for _ in range(rng.randint(1, 3))]
        try:
            changed = with_overrides(settings, items)
            assert_sound(changed)
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


def test_generated_hand_edits_are_accepted_or_one_line(workspace: Path, tmp_path: Path) -> None:
    """settings.toml edited by hand: a setting's line (of any table) replaced by a generated one."""
    rng = random.Random(SEED + 1)
    lines = (workspace / "settings.toml").read_text("utf-8").split("\n")
    settings_lines = [n for n, line in enumerate(lines) if re.match(r"\w+ = ", line)]
    path = tmp_path / "settings.toml"
    accepted = refused = 0
    for _ in range(500):
        edited = list(lines)
        number = rng.choice(settings_lines)
        key = rng.choice([edited[number].split(" = ")[0], edited[rng.choice(settings_lines)].split(" = ")[0]])
        edited[number] = f"{key} = {rng.choice(VALUES)}"
        if rng.random() < 0.1:
            edited.insert(0, rng.choice(["<<<<<<< ours", "[train", "\ufeff", "=== x"]))
        path.write_text("\n".join(edited), "utf-8")
        try:
            assert_sound(load_settings(path))
            accepted += 1
        except SettingsError as err:
            assert "\n" not in str(err) and str(err).startswith(str(path)), str(err)
            refused += 1
    assert accepted > 20 and refused > 200, (accepted, refused)


@pytest.mark.slow
def test_scripts_answer_the_worst_overrides_in_one_line(tuned_workspace: Path) -> None:
    """A few generated refusals through the scripts themselves: exit 1, one `error:` line, no traceback."""
    rng = random.Random(SEED + 2)
    settings = load_settings(tuned_workspace / "settings.toml")
    refused: list[str] = []
    while len(refused) < 6:
        item = override(rng, settings)
        try:
            with_overrides(settings, [item])
        except SettingsError:
            refused.append(item)
    scripts = ["finetuning/invoke_olive.py", "finetuning/train_sft.py", "inference/gradio_chat.py"]
    for i, item in enumerate(refused):
        run = run_py(tuned_workspace, scripts[i % len(scripts)], "--set", item, timeout=120)
        assert run.returncode == 1 and "Traceback" not in run.stderr, (item, run.stderr[-2000:])
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), (item, run.stderr)
