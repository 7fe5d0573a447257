"""Shared fixtures: the tiny model (built once, reused), free ports, per-test state dirs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Built artefacts shared between test runs (the tiny model takes minutes to train).
CACHE_DIR = Path(os.environ.get("APPLIANCE_TEST_CACHE", REPO_ROOT / ".state" / "test-cache"))

pytest_plugins = ["tests.slurm_fixtures"]


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny chat model, built on first use and reused by later runs."""
    from appliance.models.tiny import build_tiny_model, tiny_model_exists

    out = CACHE_DIR / "tiny-chat"
    if not tiny_model_exists(out):
        build_tiny_model(out)
    return out
