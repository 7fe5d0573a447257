"""Local accounts for tests that check what another user of the host can read or do, and the
folders they must pass through."""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import subprocess
from pathlib import Path

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


@contextlib.contextmanager
def reachable(path: Path):
    """Let other accounts pass through `path`'s parents (pytest makes its folders 0700) for
    the test, as /etc/appliance and /var/lib/appliance are on an installed system."""
    changed = []
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)
            changed.append((parent, stat.S_IMODE(mode)))
    try:
        yield
    finally:
        for parent, mode in changed:
            os.chmod(parent, mode)
