"""Fixtures for this workspace's own checks: `make test` (or `python -m pytest tests`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tuner.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def settings() -> dict[str, Any]:
    """settings.toml, parsed (test_settings.py reports a file that does not parse)."""
    return load_settings(ROOT / "settings.toml")
