"""The host-memory tier shared across processes: the node's store service decrypts a model once
into anonymous memory (memfd: no file on any disk, excluded from core dumps, locked against
swap) and hands instances on the node a read-only file descriptor over a Unix socket, so a cold
start copies from memory instead of reading and decrypting.

Protocol on the socket (mode 0600, in a 0700 directory, peers checked with SO_PEERCRED): the
client sends one JSON line {"model_id": ...}; the service answers one JSON line {"ok": true,
"nbytes": n} with the descriptor attached, or {"ok": false, "reason": ...}. The model stays pinned
in the tier (not evictable) until the client closes the connection."""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path

from appliance.store.loader import DEFAULT_THREADS, load_into
from appliance.store.tiers import HostTier

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
MAX_REQUEST_BYTES = 4096


class MemfdBuffer:
    """One decrypted model in a sealed-size memfd, mapped writable in the service only."""

    def __init__(self, name: str, nbytes: int):
        self.nbytes = nbytes
        self.fd = os.memfd_create(f"appliance-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, nbytes)
        # Its size can no longer change: a client's mapping cannot be cut short under it.
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.map = mmap.mmap(self.fd, nbytes, flags=mmap.MAP_SHARED)
        self.map.madvise(mmap.MADV_DONTDUMP)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.addr = ctypes.addressof(anchor)
        del anchor
        if _libc.mlock(ctypes.c_void_p(self.addr), ctypes.c_size_t(nbytes)) != 0:
            log.warning("host tier: could not lock %d bytes in memory (RLIMIT_MEMLOCK)", nbytes)

    def view(self) -> memoryview:
        return memoryview(self.map)

    def wipe(self) -> None:
        ctypes.memset(self.addr, 0, self.nbytes)
        self.map.close()
        os.close(self.fd)


def fill_from_store(model, threads: int = 0) -> MemfdBuffer:
    """Decrypt a stored model (already opened and authorised) into a new memfd buffer."""

    buf = MemfdBuffer(model.model_id, model.data_bytes)
    try:
        load_into(model, buf.view(), threads or DEFAULT_THREADS)
    except BaseException:
        buf.wipe()
        raise
    return buf


class HostCacheServer:
    """Serves the tier's memfds to local loaders over a Unix socket, in a background thread."""

    def __init__(self, tier: HostTier, socket_path: Path, allowed_uids: set[int] | None = None):
        self.tier = tier
        self.socket_path = socket_path
        self.allowed_uids = allowed_uids if allowed_uids is not None else {0, os.getuid()}
        socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        socket_path.parent.chmod(0o700)
        if socket_path.exists():
            socket_path.unlink()
        server_self = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                server_self._handle(self.request)

        old_umask = os.umask(0o177)  # the socket is created 0600
        try:
            self.server = socketserver.ThreadingUnixStreamServer(str(socket_path), Handler)
        finally:
            os.umask(old_umask)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> HostCacheServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.socket_path.unlink(missing_ok=True)

    def _handle(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in self.allowed_uids:
            _reply(conn, {"ok": False, "reason": f"uid {uid} may not read the host tier"})
            return
        try:
            request = json.loads(conn.recv(MAX_REQUEST_BYTES).decode() or "{}")
            model_id = str(request["model_id"])
        except (ValueError, KeyError, UnicodeDecodeError):
            _reply(conn, {"ok": False, "reason": "malformed request"})
            return
        entry = self.tier.get(model_id)
        if entry is None:
            _reply(conn, {"ok": False, "reason": f"{model_id} is not in the host tier"})
            return
        try:
            buf = entry.buffer
            assert isinstance(buf, MemfdBuffer)
            payload = (json.dumps({"ok": True, "nbytes": entry.nbytes}) + "\n").encode()
            # A read-only descriptor of the same memory: the client can map it privately
            # (copy on write) but can never write into the tier.
            readonly = os.open(f"/proc/self/fd/{buf.fd}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                socket.send_fds(conn, [payload], [readonly])
            finally:
                os.close(readonly)
            conn.recv(1)  # returns when the client closes: until then the entry stays pinned
        finally:
            self.tier.release(entry)


def _reply(conn: socket.socket, message: dict) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


class HostTierMapping:
    """A model's decrypted bytes from the node's host tier, mapped copy-on-write; `close()` (or
    the end of a `with` block) lets the service evict it again."""

    def __init__(self, conn: socket.socket, mm: mmap.mmap, nbytes: int):
        self.conn = conn
        self.map = mm
        self.nbytes = nbytes

    def __enter__(self) -> HostTierMapping:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.map.close()
        self.conn.close()


def open_from_host_tier(socket_path: Path, model_id: str, timeout_s: float = 5.0):
    """The model's bytes from the host tier, or None when the tier does not hold it (or no
    service runs on this node)."""
    if not socket_path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout_s)
    try:
        conn.connect(str(socket_path))
        conn.sendall(json.dumps({"model_id": model_id}).encode())
        data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST_BYTES, 1)
        answer = json.loads(data.decode() or "{}")
    except (OSError, ValueError) as exc:
        conn.close()
        log.info("host tier not used for %s: %s", model_id, exc)
        return None
    if not answer.get("ok") or not fds:
        conn.close()
        for fd in fds:
            os.close(fd)
        log.info("host tier not used for %s: %s", model_id, answer.get("reason"))
        return None
    fd = fds[0]
    try:
        # Private and writable: copy on write, so a loader that modifies a tensor in place
        # changes its own copy of that page only (the descriptor is read-only anyway).
        mm = mmap.mmap(
            fd, answer["nbytes"], flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    finally:
        os.close(fd)
    mm.madvise(mmap.MADV_DONTDUMP)
    conn.settimeout(None)
    return HostTierMapping(conn, mm, answer["nbytes"])
