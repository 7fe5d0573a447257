"""A second local account for tests that check what another user of the host can read."""

from __future__ import annotations

import os
import pwd
import subprocess

import pytest

OUTSIDER = "appliance-outsider"


@pytest.fixture(scope="module")
def outsider() -> str:
    if os.geteuid() != 0:
        pytest.skip("only root can act as another local account")
    try:
        pwd.getpwnam(OUTSIDER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OUTSIDER],
            check=True,
        )
    return OUTSIDER


def as_outsider(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", OUTSIDER, "--", *argv], capture_output=True, text=True, timeout=30
    )
