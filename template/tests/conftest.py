"""Fixtures for this workspace's own checks: `make test` (or `python -m pytest tests`)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def settings() -> dict[str, Any]:
    """settings.toml, parsed (test_settings.py reports a file that does not parse)."""
    with (ROOT / "settings.toml").open("rb") as f:
        return tomllib.load(f)
