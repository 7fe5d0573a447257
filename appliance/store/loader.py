"""Loads a stored model into host memory or onto a GPU: parallel reads, parallel decryption (the
GIL is released while decrypting), and host-to-GPU copies overlapped with reading, into one
device allocation per GPU. Plaintext exists only in memory."""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from appliance.store.model import StoredModel, read_exact
from security.aesgcm import address_of

if TYPE_CHECKING:
    import torch

    from appliance.store.gpu_decrypt import GpuDecryptor

log = logging.getLogger(__name__)

DEFAULT_THREADS = min(16, os.cpu_count() or 1)

# Bytes a GPU loader thread reads, decrypts and copies at a time (a multiple of the chunk size).
DEFAULT_UNIT_BYTES = 16 << 20


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16,
        "U32": torch.uint32,
        "U64": torch.uint64,
    }[name]


def tensor_views(model: StoredModel, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor (aliases included) as a view into `flat`, the model's bytes (uint8)."""
    out = {}
    for e in model.index.tensors:
        view = flat[e.offset : e.offset + e.nbytes].view(torch_dtype(e.dtype))
        out[e.name] = view.reshape(e.shape)
    for alias, target in model.index.aliases.items():
        out[alias] = out[target]
    return out


def _open(model: StoredModel, direct: bool) -> int:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    return os.open(model.data_path, flags)


def load_into(model: StoredModel, dest: memoryview, threads: int = DEFAULT_THREADS) -> None:
    """Read (and decrypt) all of tensors.bin into `dest` (data_bytes long, writable), in parallel
    threads, one chunk at a time each."""
    if len(dest) != model.data_bytes:
        raise ValueError(f"destination has {len(dest)} bytes, the model {model.data_bytes}")
    base = address_of(dest)
    fd = _open(model, direct=False)
    try:

        def one(i: int) -> None:
            offset, n = model.chunk_span(i)
            read_exact(fd, dest[offset : offset + n], offset)
            model.decrypt_chunk(i, base + offset, n)

        _run_parallel(one, model.header.n_chunks, threads)
    finally:
        os.close(fd)


def _run_parallel(work: Callable[[int], None], count: int, threads: int) -> None:
    """work(0..count-1) on `threads` threads; the first error stops the rest and is raised."""
    counter = itertools.count()
    failed = threading.Event()

    def worker() -> None:
        for i in counter:  # next() on itertools.count is atomic under the GIL
            if i >= count or failed.is_set():
                return
            try:
                work(i)
            except BaseException:
                failed.set()
                raise

    with ThreadPoolExecutor(max(1, threads)) as pool:
        futures = [pool.submit(worker) for _ in range(max(1, threads))]
    for f in futures:
        f.result()


def load_to_host(
    model: StoredModel, threads: int = DEFAULT_THREADS, pin: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's tensors in host memory: one flat buffer and named views into it. `pin` puts the
    buffer in page-locked memory (the host tier: copies to a GPU run at full PCIe speed)."""
    import torch

    if pin:
        flat = torch.empty(model.data_bytes, dtype=torch.uint8, pin_memory=True)
    else:
        from security.process import secret_buffer

        flat = torch.frombuffer(secret_buffer(model.data_bytes), dtype=torch.uint8)
    load_into(model, memoryview(flat.numpy()), threads)
    return flat, tensor_views(model, flat)


class PinnedRing:
    """Page-locked staging buffers, two per loader thread, kept for the next load (allocating
    pinned memory costs more than reading a few hundred MiB)."""

    def __init__(self, threads: int, unit_bytes: int):
        import torch

        self.unit_bytes = unit_bytes
        self.lock = threading.Lock()
        self.slots = [
            [torch.empty(unit_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            for _ in range(threads)
        ]

    @property
    def threads(self) -> int:
        return len(self.slots)

    def wipe(self) -> None:
        """Zero the staging buffers (they held plaintext)."""
        with self.lock:
            for pair in self.slots:
                for slot in pair:
                    slot.zero_()

    def wipe_later(self) -> None:
        """Zero the buffers in the background: the weights are already on the GPU, so the first
        token need not wait; the next load waits for the lock."""
        threading.Thread(target=self.wipe, name="pinned-ring-wipe", daemon=True).start()


def _gpu_decryptor(model: StoredModel, device) -> GpuDecryptor | None:
    """A GPU decryptor for the model, or None (decryption on CPU threads) where the kernels
    cannot be built here."""
    from appliance.store.cuda_rtc import CudaRtcError
    from appliance.store.gpu_decrypt import GpuDecryptor

    try:
        return GpuDecryptor(model, device)
    except CudaRtcError as exc:
        log.warning("decrypting %s on CPU threads: %s", model.model_id, exc)
        return None


def load_to_gpu(
    model: StoredModel,
    device: str | torch.device = "cuda",
    ring: PinnedRing | None = None,
    threads: int = DEFAULT_THREADS,
    direct: bool = False,
    gpu_decrypt: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's tensors on one GPU, loaded by threads of this process: one device allocation
    and named views into it.

    Each thread reads a unit into one of its two pinned slots, decrypts it there, and queues the
    copy to the GPU on its own stream; it reuses a slot only once that slot's copy is done, so
    reading, decryption and copies overlap. `direct` reads with O_DIRECT (cold files: no page
    cache churn). `gpu_decrypt` copies the ciphertext instead and decrypts it on the GPU, on the
    same stream, right behind its copy: the host never holds plaintext.
    """
    import torch

    decryptor = _gpu_decryptor(model, device) if gpu_decrypt and model.encrypted else None
    chunk = model.header.chunk_bytes
    ring = ring or PinnedRing(threads, max(chunk, DEFAULT_UNIT_BYTES // chunk * chunk))
    unit = ring.unit_bytes
    if unit % chunk:
        raise ValueError("the staging unit must be a multiple of the chunk size")
    flat = torch.empty(model.data_bytes, dtype=torch.uint8, device=device)
    n_units = -(-model.data_bytes // unit)
    per_unit = unit // chunk
    fd = _open(model, direct)
    slots_free = list(range(ring.threads))
    lock = threading.Lock()
    local = threading.local()

    def one(u: int) -> None:
        state = getattr(local, "state", None)
        if state is None:
            with lock:
                pair = ring.slots[slots_free.pop()]
            state = local.state = (pair, [None, None], torch.cuda.Stream(device), [0])
        pair, events, stream, turn = state
        k = turn[0]
        turn[0] ^= 1
        if events[k] is not None:
            events[k].synchronize()  # the slot's previous copy must be done before reuse
        slot = pair[k]
        offset = u * unit
        n = min(unit, model.data_bytes - offset)
        addr = slot.data_ptr()
        # One read per unit, then decryption in place: every call takes the GIL back, and with
        # 16 threads fewer, larger calls measured faster (reading through a small buffer in
        # 1 MiB pieces halved the rate; decrypting from an mmap of the file was slower too).
        read_exact(fd, memoryview(slot.numpy())[:n], offset)
        for j in range(-(-n // chunk) if decryptor is None else 0):
            i = u * per_unit + j
            c_off, c_n = model.chunk_span(i)
            model.decrypt_chunk(i, addr + (c_off - offset), c_n)
        with torch.cuda.stream(stream):
            flat[offset : offset + n].copy_(slot[:n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
            if decryptor is not None:
                decryptor.decrypt(flat[offset : offset + n], u * per_unit, stream)
        events[k] = ev

    try:
        with ring.lock:
            _run_parallel(one, n_units, ring.threads)
            torch.cuda.synchronize(device)
        if decryptor is not None:
            decryptor.verify(flat)
    finally:
        os.close(fd)
        if decryptor is not None:
            decryptor.close()
        elif model.encrypted:
            ring.wipe_later()
    return flat, tensor_views(model, flat)


def load_from_host(
    model: StoredModel, host_flat: torch.Tensor, device: str | torch.device = "cuda"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model on a GPU from the host tier (page-locked memory): one copy at PCIe speed."""
    import torch

    flat = torch.empty(model.data_bytes, dtype=torch.uint8, device=device)
    flat.copy_(host_flat, non_blocking=host_flat.is_pinned())
    torch.cuda.synchronize(device)
    return flat, tensor_views(model, flat)


def load_from_mapping(
    model: StoredModel, mm, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's tensors from a mapping of its decrypted bytes (the host tier): views straight
    into the mapping on CPU, one copy on a GPU (page-locked for the copy when CUDA allows
    registering the mapping)."""
    import torch

    host = torch.frombuffer(mm, dtype=torch.uint8)
    if torch.device(device).type != "cuda":
        return host, tensor_views(model, host)
    addr, n = address_of(mm), len(mm)
    cudart = torch.cuda.cudart()
    registered = cudart.cudaHostRegister(addr, n, 0) == 0
    try:
        flat = torch.empty(n, dtype=torch.uint8, device=device)
        flat.copy_(host, non_blocking=registered)
        torch.cuda.synchronize(device)
    finally:
        if registered:
            cudart.cudaHostUnregister(addr)
    return flat, tensor_views(model, flat)
