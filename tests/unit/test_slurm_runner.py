"""LocalRunner: real subprocesses, stdin, environment, timeouts and missing programs."""

from __future__ import annotations

import time

import pytest

from appliance.errors import ApplianceError
from appliance.slurm.runner import CommandError, LocalRunner


def test_output_exit_status_and_stdin():
    result = LocalRunner().run(["sh", "-c", "cat; echo oops >&2; exit 3"], input="hello\n")
    assert (result.returncode, result.stdout, result.stderr) == (3, "hello\n", "oops\n")
    assert result.argv[0] == "sh" and not result.ok


def test_env_is_added_to_the_current_environment():
    result = LocalRunner().run(
        ["sh", "-c", 'echo "$SLURM_CONF:${PATH:+has-path}"'], env={"SLURM_CONF": "/x/slurm.conf"}
    )
    assert result.stdout == "/x/slurm.conf:has-path\n"


def test_timeout_is_a_clear_error():
    start = time.monotonic()
    with pytest.raises(CommandError) as err:
        LocalRunner().run(["sleep", "5"], timeout=0.3)
    assert time.monotonic() - start < 3
    assert err.value.timed_out and "`sleep 5` did not finish within 0.3 s" in str(err.value)
    assert isinstance(err.value, ApplianceError)


def test_missing_program():
    with pytest.raises(CommandError, match="program not found"):
        LocalRunner().run(["no-such-program-xyz"])
