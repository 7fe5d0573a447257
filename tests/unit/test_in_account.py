"""in_account: root runs a piece of work as another account in a child process and gets its
bytes back, or its error's message; this process stays root."""

from __future__ import annotations

import os

import pytest
from appliance.security.privileges import PrivilegeError, in_account

from appliance.errors import ApplianceError


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.skip("only root can become another account")


def test_the_work_runs_as_the_account_and_its_bytes_come_back(tmp_path):
    assert in_account("nobody", tmp_path, lambda: str(os.geteuid()).encode()) == b"65534"
    assert os.geteuid() == 0


def _refused() -> bytes:
    raise ApplianceError("the data volume is sealed")


def test_its_error_comes_back_as_a_message(tmp_path):
    with pytest.raises(PrivilegeError, match=r"the data volume is sealed \(as nobody\)"):
        in_account("nobody", tmp_path, _refused)
    with pytest.raises(PrivilegeError, match="does not exist"):
        in_account("no-such-account-here", tmp_path, lambda: b"")
