"""Hardening of a process that holds decrypted weights: no core dumps, no swapping of secrets."""

from __future__ import annotations

import ctypes
import logging
import mmap
import resource

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4
_libc = ctypes.CDLL(None, use_errno=True)


def disable_core_dumps() -> None:
    """No core file and no ptrace by other users' tools: a crash must not write weights to disk."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())


def core_dumps_disabled() -> bool:
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    return soft == 0 and hard == 0 and _libc.prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE


def secret_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory for plaintext weights: excluded from core dumps and, where
    RLIMIT_MEMLOCK allows, locked so it is never written to swap."""
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_DONTDUMP)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if _libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes)) != 0:
        log.info(
            "could not lock %d bytes of weights in memory (RLIMIT_MEMLOCK); they could be "
            "swapped: use encrypted swap or none on model hosts",
            nbytes,
        )
    return buf
