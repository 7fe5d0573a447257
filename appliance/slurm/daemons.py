"""Start, find and stop the local cluster's slurmctld/slurmd processes (Linux /proc based).

A daemon belongs to a cluster when its command line names that cluster's slurm.conf with ``-f``:
that is how processes are found again after a restart of the CLI, and why processes of other
clusters on the same host are never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# Written to a daemon's output file before each start, so errors are quoted from this start only.
START_MARKER = "=== appliance started"

# Processes started by this Python process: polling them reaps them, so a daemon that died does
# not linger as a zombie that /proc still lists.
_children: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class DaemonProcess:
    """A running Slurm daemon of one cluster: ``slurmctld`` or ``slurmd`` for one node."""

    kind: str
    node: str | None
    pid: int

    @property
    def key(self) -> str:
        return self.kind if self.node is None else f"{self.kind}:{self.node}"


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _parse_daemon(pid: int, argv: list[str], conf: str) -> DaemonProcess | None:
    if not argv:
        return None
    kind = os.path.basename(argv[0])
    if kind not in ("slurmctld", "slurmd"):
        return None
    args = argv[1:]
    if "-f" not in args or args.index("-f") + 1 >= len(args) or args[args.index("-f") + 1] != conf:
        return None
    node = None
    if kind == "slurmd" and "-N" in args and args.index("-N") + 1 < len(args):
        node = args[args.index("-N") + 1]
    return DaemonProcess(kind=kind, node=node, pid=pid)


def find_daemons(slurm_conf: Path) -> dict[str, DaemonProcess]:
    """Live daemons started with ``-f <slurm_conf>``, keyed ``slurmctld`` / ``slurmd:<node>``."""
    _reap()
    conf = str(slurm_conf)
    found: dict[str, DaemonProcess] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        daemon = _parse_daemon(pid, _cmdline(pid), conf)
        if daemon is not None and is_alive(pid):
            found[daemon.key] = daemon
    return found


def is_alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            _children.pop(pid, None)
            return False
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def start_daemon(argv: list[str], output: Path) -> int:
    """Start a daemon in its own session (so a Ctrl-C of the CLI does not reach it)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a") as out:
        stamp = datetime.now().isoformat(timespec="seconds")
        out.write(f"{START_MARKER} {stamp}: {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _children[proc.pid] = proc
    return proc.pid


def stop_processes(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to `timeout` seconds, then SIGKILL whatever is left (and wait briefly)."""
    pending = [p for p in pids if is_alive(p)]
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in pending:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pending and time.monotonic() < deadline:
            pending = [p for p in pending if is_alive(p)]
            if pending:
                time.sleep(0.1)
        if not pending:
            return


def output_tail(output: Path, lines: int = 20) -> str:
    """The last lines a daemon wrote since its latest start."""
    try:
        text = output.read_text(errors="replace")
    except OSError:
        return f"(no output file {output})"
    marker = text.rfind(START_MARKER)
    if marker >= 0:
        text = text[text.find("\n", marker) + 1 :]
    tail = text.strip().splitlines()[-lines:]
    return "\n".join(tail) if tail else "(no output)"


def _reap() -> None:
    for pid in list(_children):
        if _children[pid].poll() is not None:
            _children.pop(pid, None)
