"""Starting and stopping the stack's own background services (pid file, log file, no systemd)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

# What the stack's processes create is their account's alone (layout.PRIVATE_UMASK; a sibling
# module, so not imported).
_PRIVATE_UMASK = 0o077


def read_pid(pidfile: Path) -> int | None:
    """The pid in `pidfile` if that process is alive, else None."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def start_detached(
    argv: list[str],
    log_file: Path,
    pidfile: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start `argv` in its own session (it outlives the caller) and record its pid. The log is
    the account's alone, and so is whatever the process creates (umask 077, which the Slurm jobs
    it submits inherit): logs and knowledge bases hold users' documents."""
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(log_fd, 0o600)  # a log from before this rule was 0644
    with os.fdopen(log_fd, "ab") as log, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(
            argv,
            stdin=devnull,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
            umask=_PRIVATE_UMASK,
        )
    pidfile.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pid_fd = os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(pid_fd, 0o600)
    with os.fdopen(pid_fd, "w") as out:
        out.write(f"{proc.pid}\n")
    return proc.pid


def stop_pid(pidfile: Path, timeout: float = 15.0) -> bool:
    """SIGTERM the recorded process, SIGKILL it after `timeout`; True if one was running."""
    pid = read_pid(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_pid(pidfile) is None:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return True


def listening(path: Path, timeout: float = 1.0) -> bool:
    """Whether a service listens on the Unix socket `path` (it is connected to and left at once,
    having been sent nothing)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
