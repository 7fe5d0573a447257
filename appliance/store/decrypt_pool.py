"""Helper processes that read and decrypt a stored model's chunks into shared staging memory.

Decryption in threads of one process releases the GIL inside AES, but every chunk still takes
the GIL several times (read, set up, decrypt, hand the slot on), and with 16 threads that
hand-over, not AES, set the pace: ~22 GB/s on the H100 machine against 38 GB/s for plaintext.
Processes have a GIL each. The parent only schedules slots and copies them to the GPU; the
staging slots live in one memfd that the parent page-locks, so a slot a worker filled is copied
to the GPU at full PCIe speed without another pass over the bytes.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.store.model import StoredModel, StoreIntegrityError
from security.aesgcm import address_of

log = logging.getLogger(__name__)

# Room after the last slot: decryption writes through a view 15 bytes longer than a piece.
_TAIL = 4096
# A worker that has not answered in this long is taken for hung (a 16 MiB unit takes ~ms).
STALL_S = 60.0
START_TIMEOUT_S = 30.0


class DecryptPoolError(ApplianceError):
    """A decrypt worker died, hung or could not start."""


class DecryptPool:
    """`workers` processes with `slots` staging slots of `unit_bytes` each, kept for later loads
    (starting them costs more than decrypting a few GB). Slot j belongs to worker j // slots."""

    def __init__(self, workers: int, unit_bytes: int, slots: int = 2):
        if workers < 1 or slots < 1 or unit_bytes < 1:
            raise ValueError("a decrypt pool needs at least one worker, slot and byte")
        self.workers, self.slots, self.unit_bytes = workers, slots, unit_bytes
        self.size = workers * slots * unit_bytes + _TAIL
        self.lock = threading.Lock()  # one load at a time; a wipe holds it too
        self._fd = os.memfd_create("appliance-staging", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self.size)
        self._mm = mmap.mmap(self._fd, self.size)
        self._mm.madvise(mmap.MADV_DONTDUMP)  # plaintext passes through: keep it out of cores
        self.base = address_of(self._mm)
        self._conns: list[Connection] = []
        self._procs: list[subprocess.Popen] = []
        self._outstanding = [0] * workers
        self._pinned = None
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns)
        try:
            for w in range(workers):
                self._start(w)
            for w, conn in enumerate(self._conns):
                if not conn.poll(START_TIMEOUT_S):
                    raise DecryptPoolError(f"decrypt worker {w} did not start")
                conn.recv()
        except BaseException:
            self.close()
            raise

    def _start(self, w: int) -> None:
        parent, child = socket.socketpair()
        cmd = [sys.executable, "-m", "appliance.store.decrypt_worker", str(self._fd)]
        cmd += [str(child.fileno()), str(self.size)]
        # The package's root on the path: the pool may run from any working directory.
        root = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        proc = subprocess.Popen(
            cmd, pass_fds=(self._fd, child.fileno()), stdin=subprocess.DEVNULL, env=env
        )
        child.close()
        self._procs.append(proc)
        self._conns.append(Connection(parent.detach()))

    def slot_offset(self, j: int) -> int:
        return j * self.unit_bytes

    def view(self, j: int, n: int) -> memoryview:
        """The first n bytes of slot j."""
        start = self.slot_offset(j)
        return memoryview(self._mm)[start : start + n]

    def pinned(self):
        """The staging memory as a page-locked uint8 tensor (registered with CUDA once)."""
        import torch

        if self._pinned is None:
            cudart = torch.cuda.cudart()
            if cudart.cudaHostRegister(self.base, self.size, 0) != 0:
                raise DecryptPoolError("could not page-lock the staging memory for the GPU")
            self._pinned = torch.frombuffer(self._mm, dtype=torch.uint8)
        return self._pinned

    def open(self, model: StoredModel) -> None:
        """Hand every worker the model (path, authenticated header and its data key)."""
        if model.cipher is None:
            raise ValueError("the decrypt pool is for encrypted models")
        spec = ("model", str(model.path), model.header, model.index, model.cipher.key_bytes())
        for w in range(self.workers):
            self._send(w, spec)

    def fill(self, j: int, data_offset: int, n: int) -> None:
        """Ask slot j's worker to fill it with plaintext of bytes [data_offset, +n)."""
        if n > self.unit_bytes:
            raise ValueError(f"{n} bytes do not fit a {self.unit_bytes}-byte slot")
        w = j // self.slots
        self._send(w, ("fill", j, self.slot_offset(j), data_offset, n))
        self._outstanding[w] += 1

    def finished(self, timeout: float) -> list[int]:
        """Slots filled since the last call, waiting up to `timeout` s for the first; raises the
        first worker's error (StoreIntegrityError for a chunk that failed authentication)."""
        done: list[int] = []
        busy = [self._conns[w] for w in range(self.workers) if self._outstanding[w]]
        for conn in wait(busy, timeout) if busy else []:
            w = self._conns.index(conn)
            while self._outstanding[w] and conn.poll():
                reply = self._recv(w)
                self._outstanding[w] -= 1
                if reply[0] == "error":
                    self.drain()
                    raise StoreIntegrityError(reply[2])
                done.append(reply[1])
        return done

    def busy(self) -> bool:
        return any(self._outstanding)

    def drain(self, timeout: float = STALL_S) -> None:
        """Wait out every fill still queued (after an error), dropping the results."""
        deadline = time.monotonic() + timeout
        for w, conn in enumerate(self._conns):
            while self._outstanding[w]:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    self.close()
                    raise DecryptPoolError(f"decrypt worker {w} hung")
                self._recv(w)
                self._outstanding[w] -= 1

    def wipe(self) -> None:
        """Zero the staging memory (it held plaintext) and make the workers forget the key."""
        with self.lock:
            for w in range(self.workers):
                self._send(w, ("forget",))
            _zero(self._mm, self.size)

    def wipe_later(self) -> None:
        """Wipe in the background (the weights are on the GPU; the next load waits for it)."""
        threading.Thread(target=self.wipe, name="decrypt-pool-wipe", daemon=True).start()

    def close(self) -> None:
        """Stop the workers and release the staging memory, zeroed."""
        self._finalizer()
        if self._pinned is not None:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.base)
            self._pinned = None
        if not self._mm.closed:
            _zero(self._mm, self.size)
            self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _send(self, w: int, message: tuple) -> None:
        try:
            self._conns[w].send(message)
        except OSError as exc:
            raise DecryptPoolError(f"decrypt worker {w} is gone: {exc}") from None

    def _recv(self, w: int) -> tuple:
        try:
            return self._conns[w].recv()
        except (EOFError, OSError):
            code = self._procs[w].poll()
            raise DecryptPoolError(f"decrypt worker {w} exited (status {code})") from None


def _zero(mm: mmap.mmap, size: int) -> None:
    import ctypes

    ctypes.memset(address_of(mm), 0, size)


def _shutdown(procs: list[subprocess.Popen], conns: list[Connection]) -> None:
    for conn in conns:
        conn.close()  # the workers read EOF and exit
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
