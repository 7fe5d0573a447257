"""Shared fixtures: the tiny model (built once, reused) and the local Slurm cluster."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.slurm_fixtures", "tests.ci_skips", "tests.local_accounts"]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny chat model, built on first use and reused by later runs. Under a lock: the
    workers of one run (pytest -n) ask for it at the same time, and one builds it."""
    # Imported here: the builder imports torch, which unit-test runs need not load.
    from appliance.model_builders.tiny import build_tiny_model, tiny_model_exists
    from appliance_dev.stack import tiny_model_cache_dir

    out = tiny_model_cache_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + 900  # a build takes about 4 minutes on 2 cores
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another worker's build of {out} took over 900 s") from None
                time.sleep(1)
        if not tiny_model_exists(out):
            build_tiny_model(out)
    finally:
        os.close(fd)
    return out


@pytest.fixture(autouse=True)
def umask_kept() -> Iterator[None]:
    """Each test ends with the umask it began with. A service's start sets 077
    (appliance.layout.run_privately); a unit test that runs one in this process must not pass it
    on to the next test on its worker, whose files (an installation, a catalog) its service
    account could then not read."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)
