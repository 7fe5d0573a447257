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
session is killed. The server runs outside the job's processes (and cgroup): the GPU it uses is
the one Slurm gave the job (CUDA_VISIBLE_DEVICES), and it lives exactly as long as the job."""

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
MAX_REQUEST_BYTES = 1 << 20
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
