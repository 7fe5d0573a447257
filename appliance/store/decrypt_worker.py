"""A decrypt worker process (started by DecryptPool): fills staging slots with the plaintext of
a model's chunks, read from its file and decrypted on this process's own core and GIL."""

from __future__ import annotations

import mmap
import os
import sys
from multiprocessing.connection import Connection
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.store.model import StoredModel
from security.aesgcm import AesGcm, address_of
from security.process import disable_core_dumps

# Ciphertext is read in pieces of this size into a buffer that stays in the CPU's cache and
# decrypted from there into the staging slot, which is then written once instead of twice.
BOUNCE_BYTES = 1 << 20


def serve(conn: Connection, base: int) -> None:
    """Answer the pool's messages until it closes the connection."""
    model: StoredModel | None = None
    fd = -1
    bounce = memoryview(bytearray(BOUNCE_BYTES))
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        kind = message[0]
        if kind in ("model", "forget") and fd >= 0:
            os.close(fd)
            fd, model = -1, None
        if kind == "model":
            _, path, header, index, key = message
            model = StoredModel(Path(path), header, index, AesGcm(key))
            fd = os.open(model.data_path, os.O_RDONLY)
        elif kind == "fill":
            _, j, staging_offset, data_offset, n = message
            try:
                if model is None:
                    raise ApplianceError("no model was opened in this decrypt worker")
                chunk = model.header.chunk_bytes
                for i in range(data_offset // chunk, -(-(data_offset + n) // chunk)):
                    c_off, _ = model.chunk_span(i)
                    dst = base + staging_offset + (c_off - data_offset)
                    model.read_decrypt_chunk(fd, i, dst, bounce)
            except (ApplianceError, OSError) as exc:
                conn.send(("error", j, str(exc)))
            else:
                conn.send(("ok", j))


def main() -> int:
    disable_core_dumps()  # plaintext weights pass through this process
    mem_fd, sock_fd, size = (int(a) for a in sys.argv[1:4])
    staging = mmap.mmap(mem_fd, size)
    os.close(mem_fd)
    serve(Connection(sock_fd), address_of(staging))
    return 0


if __name__ == "__main__":
    sys.exit(main())
