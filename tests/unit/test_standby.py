"""The warm standby forks a server per request, in a session of its own, with the launcher's
argv, environment and output pipe; passes signals on; reports the exit code; and kills the
server when the launcher goes away. A stand-in module plays vLLM's server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.serving.standby import StandbyServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def socket_path(tmp_path):
    run = tmp_path / "run"
    path = run / "standby-n1.sock"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests/unit/testdata'}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance.serving.standby",
            "--socket",
            str(path),
            "--module",
            "fake_server",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert "ready on" in proc.stdout.readline()
        yield path
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"{pid} still runs"
        time.sleep(0.05)


def test_the_server_gets_argv_env_and_output_and_passes_signals(socket_path):
    server = StandbyServer.start(socket_path, ["--port", "1"], {"MARKER": "x1", "PATH": "/bin"})
    assert server is not None
    line = server.stdout.readline()
    assert "argv=['--port', '1'] marker=x1" in line
    assert f"sid={server.pid}" in line  # its own session: killed as a whole
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 7
    wait_gone(server.pid)


def test_each_request_gets_its_own_server_and_exit_code(socket_path):
    a = StandbyServer.start(socket_path, ["--exit-now"], {})
    b = StandbyServer.start(socket_path, ["--exit-now"], {})
    assert a.pid != b.pid
    assert a.wait() == 3 and b.wait() == 3


def test_a_launcher_that_goes_away_takes_its_server_along(socket_path):
    server = StandbyServer.start(socket_path, [], {})
    server.stdout.readline()
    server.close()  # as when the job's launcher is killed
    wait_gone(server.pid)


def test_no_standby_means_none(tmp_path):
    assert StandbyServer.start(tmp_path / "absent.sock", [], {}) is None
