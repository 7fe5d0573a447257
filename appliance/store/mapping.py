"""Memory mappings of files and memfds, and their addresses for ctypes and CUDA calls."""

from __future__ import annotations

import ctypes
import mmap


def map_file(fd: int, nbytes: int) -> tuple[mmap.mmap, int]:
    """A private read mapping of a whole file and its address (pages fault in on first use)."""
    # Writable only so ctypes can take its address; it is private and never written.
    mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(anchor)
    del anchor  # no export left, so the map can be closed
    return mm, addr


def mapping_address(mm: mmap.mmap) -> int:
    """The address of a read-only mapping (ctypes.from_buffer wants a writable buffer)."""
    import numpy as np

    view = np.frombuffer(mm, dtype=np.uint8)
    addr = int(view.ctypes.data)
    del view  # no export may outlive the map
    return addr
