"""Page-locks host memory that CUDA copies read from, through the driver API: read-only where
the driver allows it, so a private (copy-on-write) mapping of the host tier is pinned as it is,
without the kernel copying every page for write access."""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)

# cuMemHostRegister flags (cuda.h).
READ_ONLY = 0x08
DEFAULT = 0x00


@contextlib.contextmanager
def pinned(addr: int, nbytes: int, device_index: int) -> Iterator[bool]:
    """`nbytes` at `addr` page-locked for CUDA copies while the block runs; yields whether that
    worked (copies from pageable memory still work, slower)."""
    cuda = ctypes.CDLL("libcuda.so.1")
    _make_context_current(cuda, device_index)
    ptr, size = ctypes.c_void_p(addr), ctypes.c_size_t(nbytes)
    status = -1
    for flags in (READ_ONLY, DEFAULT):
        status = cuda.cuMemHostRegister_v2(ptr, size, ctypes.c_uint(flags))
        if status == 0:
            break
    if status != 0:
        log.warning("could not page-lock %d bytes for copies (CUDA error %d)", nbytes, status)
    try:
        yield status == 0
    finally:
        if status == 0:
            cuda.cuCtxSynchronize()  # no copy may still read the pages
            cuda.cuMemHostUnregister(ptr)


def _make_context_current(cuda: ctypes.CDLL, device_index: int) -> None:
    """The device's primary context (the one torch uses) current in this thread."""
    current = ctypes.c_void_p()
    if cuda.cuCtxGetCurrent(ctypes.byref(current)) == 0 and current.value:
        return
    device, ctx = ctypes.c_int(), ctypes.c_void_p()
    cuda.cuInit(0)
    cuda.cuDeviceGet(ctypes.byref(device), device_index)
    cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device)
    cuda.cuCtxSetCurrent(ctx)
