"""The installer from this checkout into a fresh prefix: install (packages, Python environment,
configuration, certificate, administrator, the tiny model imported encrypted, services under the
supervisor, self-test), a second run that changes nothing, then uninstall."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from appliance.security.gocryptfs import mount_points

from appliance_dev.stack import free_port_block

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 1500


def _run(argv: list[str], timeout: float = INSTALL_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _processes_under(prefix: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(prefix) in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.fixture
def prefix(tiny_model_dir):
    if os.geteuid() != 0:
        pytest.skip("the installer test runs as root (it creates an account and services)")
    # Short: Slurm's socket paths under the prefix must stay below the kernel's limit.
    root = Path(tempfile.mkdtemp(prefix="ai-", dir="/tmp"))
    root.chmod(0o755)  # the service account must reach the environment inside it
    user = f"ai{os.getpid() % 100000}"
    yield root, user
    # Whatever happened: unmount its data volume (a killed gocryptfs leaves a dead mount),
    # stop every process of this installation, remove its account.
    mounts = mount_points(Path("/proc/self/mountinfo").read_text())
    for point in [m for m in mounts if m.is_relative_to(root)]:
        subprocess.run(["fusermount3", "-u", "-z", str(point)], capture_output=True, timeout=30)
    for pid in _processes_under(root):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    try:
        pwd.getpwnam(user)
        subprocess.run(["userdel", user], capture_output=True, check=False)
    except KeyError:
        pass
    shutil.rmtree(root, ignore_errors=True)


def test_install_rerun_and_uninstall(prefix, tiny_model_dir):
    root, user = prefix
    base = free_port_block(4)
    argv = [
        str(REPO / "installer" / "install.sh"),
        "--prefix",
        str(root),
        "--offline",
        "--models-dir",
        str(tiny_model_dir.parent),
        "--bind",
        "127.0.0.1",
        "--gateway-port",
        str(base),
        "--webapp-port",
        str(base + 1),
        "--controller-port",
        str(base + 2),
        "--node-port",
        str(base + 3),
        "--service-user",
        user,
    ]

    dry = _run([*argv, "--dry-run"], timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "Profile: cpu-demo" in dry.stdout and "Dry run: nothing was changed." in dry.stdout
    assert not (root / "etc").exists() and not (root / "opt").exists()

    first = _run(argv)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-6000:]
    assert "[changed  ] Python environment" in out
    assert "[changed  ] tiny-chat: imported encrypted" in out
    # The internal CA and the local nodes' certificates (instances serve TLS with them).
    assert "[changed  ] internal CA" in out and "[changed  ] node certificates" in out
    for check in ("chat completion", "knowledge base", "metrics scrape", "web app"):
        assert f"[pass] {check}" in out, out[-4000:]
    assert "API key   ak-" in out  # the administrator's key, shown once
    config = root / "etc" / "appliance" / "config.yaml"
    assert f'service_user: "{user}"' in config.read_text()
    store = root / "var" / "lib" / "appliance" / "store" / "tiny-chat"
    assert store.is_dir() and not list(store.glob("*.safetensors"))  # encrypted, not plaintext
    # The user data in its encrypted volume, opened by the services as their account; the
    # self-test's knowledge base had a volume of its own (made, filled, queried and deleted by
    # the gateway as that account), mounted beside the data volume, never inside it.
    state = root / "var" / "lib" / "appliance"
    assert (state / "vault" / "gocryptfs.conf").is_file()
    mounts = mount_points(Path("/proc/self/mountinfo").read_text())
    assert state / "data" in mounts
    assert [m for m in mounts if m.is_relative_to(state / "data")] == [state / "data"]
    assert (state / "kb-volumes").is_dir() and (state / "kb-mounts").is_dir()
    assert (state / "kb-mounts").stat().st_uid == pwd.getpwnam(user).pw_uid
    supervisor_pid = int((root / "var/lib/appliance/supervisor.pid").read_text())
    gateway_users = {
        pwd.getpwuid(os.stat(f"/proc/{p}").st_uid).pw_name
        for p in _processes_under(root)
        if p != supervisor_pid and _is_gateway(p)
    }
    assert gateway_users == {user}

    second = _run(argv)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-6000:]
    assert "[changed" not in out, out[-4000:]
    assert "Nothing changed" in out
    assert "API key   ak-" not in out  # not shown again

    command = root / "usr" / "local" / "bin" / "appliance"
    status = _run([str(command), "services", "status"], timeout=60)
    assert status.returncode == 0 and "running" in status.stdout

    removed = _run([str(command), "uninstall"], timeout=300)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "kept user data" in removed.stdout
    assert not config.exists() and not command.exists()
    assert not (root / "opt" / "appliance" / "venv").exists()
    assert store.is_dir()  # user data stays
    mounts = mount_points(Path("/proc/self/mountinfo").read_text())
    assert not [m for m in mounts if m.is_relative_to(state)]  # every volume closed
    deadline = time.monotonic() + 60  # vLLM takes a few seconds to stop
    while _processes_under(root) and time.monotonic() < deadline:
        time.sleep(1)
    assert _processes_under(root) == []


def _is_gateway(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().endswith(b"\0gateway\0")
    except OSError:
        return False
