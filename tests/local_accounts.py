"""A second local account for tests that check what another user of the host can read."""

from __future__ import annotations

import os
import pwd
import subprocess

import pytest

OUTSIDER = "appliance-outsider"


def system_account(name: str) -> pwd.struct_passwd:
    """The local system account `name`, made if missing (no home, no login shell)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
        )
    return pwd.getpwnam(name)


@pytest.fixture(scope="module")
def outsider() -> str:
    if os.geteuid() != 0:
        pytest.skip("only root can act as another local account")
    return system_account(OUTSIDER).pw_name


def as_outsider(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", OUTSIDER, "--", *argv], capture_output=True, text=True, timeout=30
    )
