"""copier.yml's training questions and tuner/settings.py's [train] model say the same thing: the
same type for each key, the same choices, and the same bounds, checked at the values just inside
and just outside each bound the settings model gives. A bound changed on one side only fails here:
one of those values is then accepted by one side and refused by the other."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import yaml
from conftest import CATALOG, REPO, is_valid, render
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment
from tuner.settings import Choice, Range, SettingsError, TrainSettings, check_value, load_settings


class _Loader(yaml.SafeLoader):
    """copier.yml with its `!include`s left out (the catalog is read from includes/ directly)."""


_Loader.add_constructor("!include", lambda loader, node: None)
QUESTIONS: dict[str, Any] = yaml.load((REPO / "copier.yml").read_text("utf-8"), Loader=_Loader)
SPECS = {f.name: f for f in fields(TrainSettings)}
# The method, and the hyperparameters asked behind customize_training: they land in [train] as they are.
TRAINING = {k: q for k, q in QUESTIONS.items() if k in SPECS}
KINDS = get_type_hints(TrainSettings)
# max_seq_len: copier asks for at most the model's own context; the settings take any up to the longest.
LONGEST = max(CATALOG, key=lambda m: m["context"])


def probes(rule: Range, kind: type) -> list[float]:
    """Each bound, and the value next to it on its other side; each `also` value and its neighbours."""

    def step(value: float, direction: float) -> float:
        return value + direction if kind is int else math.nextafter(value, direction * math.inf)

    values: list[float] = []
    for bound, outward in ((rule.low, -1), (rule.high, 1)):
        if bound is not None:
            values += [bound, step(bound, outward), step(bound, -outward)]
    for value in rule.also:
        values += [value, value - 1, value + 1]
    return [kind(v) for v in values]


def copier_refuses(key: str, value: Any) -> str:
    """What copier's validator for `key` says about `value` ("" = accepted), as copier renders it."""
    context = {key: value, "model_info": LONGEST, "platform": "cuda", "customize_training": True}
    env = SandboxedEnvironment(undefined=StrictUndefined)
    return env.from_string(TRAINING[key].get("validator", "")).render(context).strip()


def settings_refuse(key: str, value: Any, settings: dict) -> str:
    try:
        check_value(settings, "train", key, value, "test")
    except SettingsError as err:
        return str(err)
    return ""


@pytest.fixture(scope="module")
def settings(render_factory) -> dict:
    return load_settings(render_factory(model="tiny-random", platform="cpu", mode="local") / "settings.toml")


def test_every_training_question_is_a_train_setting_of_the_same_type() -> None:
    behind = [k for k, q in QUESTIONS.items() if isinstance(q, dict) and "customize_training" in str(q.get("when"))]
    assert len(behind) >= 15 and set(behind) <= set(TRAINING), set(behind) - set(TRAINING)
    copier_types = {"int": int, "float": float, "bool": bool, "str": str}
    for key, question in TRAINING.items():
        assert key in SPECS, f"copier.yml asks {key}, which [train] does not have"
        assert copier_types[question["type"]] is KINDS[key], key


@pytest.mark.parametrize("key", [k for k in TRAINING if isinstance(SPECS[k].metadata["rule"], Range)])
def test_bounds_agree(key: str, settings: dict) -> None:
    rule: Range = SPECS[key].metadata["rule"]
    assert "validator" in TRAINING[key], f"copier.yml does not check {key}, which [train] bounds"
    if key == "max_seq_len":
        assert rule.high == LONGEST["context"] and all(m["context"] <= rule.high for m in CATALOG)
    checked = probes(rule, KINDS[key])
    assert len(checked) >= 3
    for value in checked:
        by_copier, by_settings = copier_refuses(key, value), settings_refuse(key, value, settings)
        assert bool(by_copier) == bool(by_settings), (
            f"{key} = {value!r}: copier {by_copier!r}, settings {by_settings!r}"
        )


@pytest.mark.parametrize("key", [k for k in TRAINING if isinstance(SPECS[k].metadata["rule"], Choice)])
def test_choices_agree(key: str) -> None:
    choices = TRAINING[key]["choices"]  # a list, or {label: value}
    assert set(choices.values() if isinstance(choices, dict) else choices) == set(SPECS[key].metadata["rule"].options)


@pytest.mark.parametrize("pick", [min, max], ids=["lowest", "highest"])
def test_copier_renders_the_edges_and_the_settings_load_them(template_src: Path, tmp_path: Path, pick) -> None:
    """The same agreement through copier itself: a render with every bounded answer at its lowest (or
    highest) accepted value, and settings that load them as they were given."""
    answers = {}
    for key in TRAINING:
        rule = SPECS[key].metadata["rule"]
        if isinstance(rule, Range):
            answers[key] = pick(v for v in probes(rule, KINDS[key]) if not copier_refuses(key, v))
    platform = next(p for p in ("cpu", "cuda", "windows-gpu") if is_valid(LONGEST["id"], p, "local"))
    ws = render(
        template_src, tmp_path / "ws", model=LONGEST["id"], platform=platform, customize_training=True, **answers
    )
    train = load_settings(ws / "settings.toml")["train"]
    assert {k: train[k] for k in answers} == answers
