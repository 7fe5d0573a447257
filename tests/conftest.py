"""Shared fixtures: the tiny model (built once, reused) and the local Slurm cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.slurm_fixtures", "tests.ci_skips", "tests.local_accounts"]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny chat model, built on first use and reused by later runs."""
    from appliance.model_builders.tiny import build_tiny_model, tiny_model_exists
    from appliance_dev.stack import tiny_model_cache_dir

    out = tiny_model_cache_dir()
    if not tiny_model_exists(out):
        build_tiny_model(out)
    return out
