"""Shared fixtures: the tiny model (built once, reused) and the local Slurm cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Built artefacts shared between test runs (the tiny model takes minutes to train).
CACHE_DIR = Path(os.environ.get("APPLIANCE_TEST_CACHE", REPO_ROOT / ".state" / "test-cache"))

pytest_plugins = ["tests.slurm_fixtures"]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny chat model, built on first use and reused by later runs."""
    from appliance.models.tiny import build_tiny_model, tiny_model_exists

    out = CACHE_DIR / "tiny-chat"
    if not tiny_model_exists(out):
        build_tiny_model(out)
    return out
