"""Local accounts for tests that check what another user of the host can read or do, and the
folders they must pass through."""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import subprocess
import time
from pathlib import Path

import pytest

OUTSIDER = "appliance-outsider"


def system_account(name: str) -> pwd.struct_passwd:
    """The local system account `name`, made if missing (no home, no login shell). Another
    worker of the run (pytest -n) may make it at the same moment, or hold /etc/passwd's lock."""
    for _ in range(30):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # 9: the name is taken (the other worker made it); 10: /etc/passwd is locked.
        if made.returncode not in (0, 9, 10):
            raise RuntimeError(f"useradd {name}: {made.stderr.strip()}")
        if made.returncode == 10:
            time.sleep(1)
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
