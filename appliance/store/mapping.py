"""Memory mappings of files and memfds, and their addresses for ctypes and CUDA calls."""

from __future__ import annotations

import mmap


def mapping_address(mm: mmap.mmap) -> int:
    """The address of a read-only mapping (ctypes.from_buffer wants a writable buffer)."""
    import numpy as np

    view = np.frombuffer(mm, dtype=np.uint8)
    addr = int(view.ctypes.data)
    del view  # no export may outlive the map
    return addr
