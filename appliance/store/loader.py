"""Loads a stored model into host memory or onto a GPU: parallel reads, parallel decryption (the
GIL is released while decrypting), and host-to-GPU copies overlapped with reading, into one
device allocation per GPU. Plaintext exists only in memory."""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.security.aesgcm import address_of
from appliance.security.process import secret_buffer
from appliance.store.format import TensorEntry
from appliance.store.model import StoredModel, StoreIntegrityError, read_exact
from appliance.store.sharding import (
    LlamaSharding,
    Shard,
    byte_range,
    tensor_shards,
    zero_outside,
)

if TYPE_CHECKING:
    import torch

    from appliance.store.gpu_decrypt import GpuDecryptor

log = logging.getLogger(__name__)

DEFAULT_THREADS = min(16, os.cpu_count() or 1)

# Bytes a GPU loader thread reads, decrypts and copies at a time (a multiple of the chunk size).
DEFAULT_UNIT_BYTES = 16 << 20
# Device memory a streaming load stages through; a larger tensor (an 8B model's 1 GiB embedding)
# gets a window of its own size. 256 MiB keeps 16 threads busy with whole units.
DEFAULT_WINDOW_BYTES = 256 << 20


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
    # GPU decryption only: these load CUDA's runtime compiler.
    from appliance.store.cuda_rtc import CudaRtcError
    from appliance.store.gpu_decrypt import GpuDecryptor

    try:
        return GpuDecryptor(model, device)
    except CudaRtcError as exc:
        log.warning("decrypting %s on CPU threads: %s", model.model_id, exc)
        return None


class _GpuFiller:
    """Fills device memory with a range of a stored model's chunks, with threads of this process.

    Each thread reads a unit into one of its two pinned slots, decrypts it there, and queues the
    copy to the GPU on its own stream; it reuses a slot only once that slot's copy is done, so
    reading, decryption and copies overlap. With a GPU decryptor the ciphertext is copied instead
    and decrypted on the GPU, on the same stream, right behind its copy: the host never holds
    plaintext. A range is authenticated before `fill` returns. With `mapping` (the host tier:
    the model's plaintext, mapped) the threads copy from it instead of reading the file."""

    def __init__(
        self, model: StoredModel, device, ring, threads, direct, gpu_decrypt, mapping=None
    ):
        self.model = model
        self.device = device
        self.mapping = address_of(mapping) if mapping is not None else None
        encrypted = model.encrypted and mapping is None
        self.decryptor = _gpu_decryptor(model, device) if gpu_decrypt and encrypted else None
        self.cpu_decrypt = encrypted and self.decryptor is None
        chunk = model.header.chunk_bytes
        self.ring = ring or PinnedRing(threads, max(chunk, DEFAULT_UNIT_BYTES // chunk * chunk))
        if self.ring.unit_bytes % chunk:
            raise ValueError("the staging unit must be a multiple of the chunk size")
        self.fd = _open(model, direct) if mapping is None else -1

    def fill(
        self,
        dest: torch.Tensor,
        first: int,
        end: int,
        reads: tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        """Chunks first..end-1, plaintext, into `dest` (uint8 on the device, chunk `first` at its
        start). With `reads`, disjoint ranges (a, b) of those chunks, only chunks a..b-1 of each
        are read, decrypted and authenticated; the rest of `dest` is left as it was."""
        import torch

        model, ring, decryptor = self.model, self.ring, self.decryptor
        chunk, unit = model.header.chunk_bytes, self.ring.unit_bytes
        base = first * chunk
        reads = ((first, end),) if reads is None else reads
        # (offset in the file, bytes, its first chunk) of each unit, range by range.
        units = []
        for a, b in reads:
            lo, hi = a * chunk, min(b * chunk, model.data_bytes)
            units += [(o, min(unit, hi - o), o // chunk) for o in range(lo, hi, unit)]
        slots_free = list(range(ring.threads))
        lock = threading.Lock()
        local = threading.local()
        if decryptor is not None:
            current = torch.cuda.current_stream(self.device)
            for a, b in reads:
                decryptor.restart(a, b, current)
        # Whoever read `dest` before is done with it, and the sums are reset before any
        # decryption on the threads' streams.
        torch.cuda.synchronize(self.device)

        def one(u: int) -> None:
            state = getattr(local, "state", None)
            if state is None:
                with lock:
                    pair = ring.slots[slots_free.pop()]
                state = local.state = (pair, [None, None], torch.cuda.Stream(self.device), [0])
            pair, events, stream, turn = state
            k = turn[0]
            turn[0] ^= 1
            if events[k] is not None:
                events[k].synchronize()  # the slot's previous copy must be done before reuse
            slot = pair[k]
            offset, n, c0 = units[u]
            addr = slot.data_ptr()
            # One read per unit, then decryption in place: every call takes the GIL back, and
            # with 16 threads fewer, larger calls measured faster (reading through a small buffer
            # in 1 MiB pieces halved the rate; decrypting from an mmap of the file was slower).
            if self.mapping is not None:
                ctypes.memmove(addr, self.mapping + offset, n)  # releases the GIL
            else:
                read_exact(self.fd, memoryview(slot.numpy())[:n], offset)
            for j in range(-(-n // chunk) if self.cpu_decrypt else 0):
                i = c0 + j
                c_off, c_n = model.chunk_span(i)
                model.decrypt_chunk(i, addr + (c_off - offset), c_n)
            with torch.cuda.stream(stream):
                target = dest[offset - base : offset - base + n]
                target.copy_(slot[:n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
                if decryptor is not None:
                    decryptor.decrypt(target, c0, stream)
            events[k] = ev

        with ring.lock:
            _run_parallel(one, len(units), ring.threads)
            torch.cuda.synchronize(self.device)
        if decryptor is not None:
            try:
                for a, b in reads:
                    stop = min(b * chunk, model.data_bytes)
                    decryptor.verify(dest[a * chunk - base : stop - base], a, b)
            except StoreIntegrityError:
                dest.zero_()  # the other ranges' plaintext too
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        if self.decryptor is not None:
            self.decryptor.close()
        elif self.model.encrypted:
            self.ring.wipe_later()  # the slots held plaintext


def load_to_gpu(
    model: StoredModel,
    device: str | torch.device = "cuda",
    ring: PinnedRing | None = None,
    threads: int = DEFAULT_THREADS,
    direct: bool = False,
    gpu_decrypt: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's tensors on one GPU: one device allocation and named views into it.

    `direct` reads with O_DIRECT (cold files: no page cache churn). `gpu_decrypt` decrypts on
    the GPU (see _GpuFiller)."""
    import torch

    filler = _GpuFiller(model, device, ring, threads, direct, gpu_decrypt)
    try:
        flat = torch.empty(model.data_bytes, dtype=torch.uint8, device=device)
        filler.fill(flat, 0, model.header.n_chunks)
    finally:
        filler.close()
    return flat, tensor_views(model, flat)


@dataclass(frozen=True)
class Window:
    """Chunks first..end-1 of a stored model, and the tensors that lie wholly inside them."""

    first: int
    end: int
    tensors: tuple[TensorEntry, ...]
    # The ranges of chunks (a, b) to read: all of first..end-1 unless a tensor-parallel rank
    # needs only parts of the tensors.
    reads: tuple[tuple[int, int], ...]
    # Each tensor's part the rank needs (None: all of it), in the order of `tensors`.
    shards: tuple[Shard | None, ...]


def plan_windows(
    model: StoredModel, window_bytes: int, shards: LlamaSharding | None = None
) -> list[Window]:
    """The model's tensors, in file order, grouped into windows of whole chunks of at most
    `window_bytes` (a larger tensor gets a window of its own). Neighbouring windows may share a
    chunk, which is then read twice. With `shards` (a tensor-parallel rank's split of the
    model), a window reads only the chunks that hold the parts of its tensors the rank needs."""
    chunk = model.header.chunk_bytes
    parts = tensor_shards(model.index, shards) if shards is not None else {}
    windows: list[Window] = []
    group: list[TensorEntry] = []
    for e in sorted(model.index.tensors, key=lambda e: e.offset):
        if group:
            first = group[0].offset // chunk
            end = -(-(e.offset + e.nbytes) // chunk)
            if (end - first) * chunk > window_bytes:
                windows.append(_window(group, chunk, parts))
                group = []
        group.append(e)
    if group:
        windows.append(_window(group, chunk, parts))
    return windows


def _window(group: list[TensorEntry], chunk: int, parts: dict[str, Shard]) -> Window:
    last = max(e.offset + e.nbytes for e in group)
    first, end = group[0].offset // chunk, -(-last // chunk)
    shards = tuple(parts.get(e.name) for e in group)
    if not parts:
        return Window(first, end, tuple(group), ((first, end),), shards)
    spans = []
    for e, part in zip(group, shards, strict=True):
        lo, hi = byte_range(e, part)
        if hi > lo:
            spans.append((lo // chunk, -(-hi // chunk)))
    reads: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if reads and a <= reads[-1][1]:  # overlapping or adjacent: one range
            reads[-1] = (reads[-1][0], max(b, reads[-1][1]))
        else:
            reads.append((a, b))
    return Window(first, end, tuple(group), tuple(reads), shards)


def read_bytes(model: StoredModel, windows: list[Window]) -> int:
    """Bytes of tensors.bin a load through `windows` reads (a chunk two windows share counts
    twice)."""
    chunk = model.header.chunk_bytes
    return sum(min(b * chunk, model.data_bytes) - a * chunk for w in windows for a, b in w.reads)


def stream_to_gpu(
    model: StoredModel,
    device: str | torch.device = "cuda",
    ring: PinnedRing | None = None,
    threads: int = DEFAULT_THREADS,
    direct: bool = False,
    gpu_decrypt: bool = True,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    mapping=None,
    shards: LlamaSharding | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor on the GPU) for every tensor (aliases after their target), through one
    device window of about `window_bytes` (or the largest tensor): the model is never on the GPU
    twice. A window is authenticated before any of its tensors is handed out, and is reused once
    the consumer asks for the next window's first tensor, so the consumer must copy each tensor
    before it asks for the next window (vLLM's `load_weights` copies each into its parameter).
    `mapping`: the model's decrypted bytes from the host tier, copied through the pinned ring
    (measured: page-locking a whole 16 GB mapping and copying tensor by tensor took 9.4 s on an
    H100, against 1.1 s for the store's file through the ring).
    `shards`: a tensor-parallel rank's split of the model (see sharding.py). Each tensor is still
    handed out whole-shaped (vLLM's weight loaders narrow it), but only the part the rank needs
    holds the weights and the rest is zero; only the chunks of those parts are read, decrypted
    and authenticated."""
    import torch

    windows = plan_windows(model, window_bytes, shards)
    chunk = model.header.chunk_bytes
    span = max((w.end - w.first) * chunk for w in windows) if windows else 0
    aliases: dict[str, list[str]] = {}
    for alias, target in model.index.aliases.items():
        aliases.setdefault(target, []).append(alias)
    filler = _GpuFiller(model, device, ring, threads, direct, gpu_decrypt, mapping)
    buf = torch.empty(min(span, model.data_bytes), dtype=torch.uint8, device=device)
    try:
        for w in windows:
            filler.fill(buf, w.first, w.end, w.reads)
            base = w.first * chunk
            tensors = []
            for e, part in zip(w.tensors, w.shards, strict=True):
                view = buf[e.offset - base : e.offset - base + e.nbytes]
                tensor = view.view(torch_dtype(e.dtype)).reshape(e.shape)
                if part is not None:
                    zero_outside(tensor, part)  # chunks not read, or other ranks' rows
                tensors.append(tensor)
            for e, tensor in zip(w.tensors, tensors, strict=True):
                yield e.name, tensor
                for alias in aliases.get(e.name, ()):
                    yield alias, tensor
        torch.cuda.synchronize(device)
    finally:
        buf.zero_()  # it held plaintext weights
        filler.close()
        del buf


def load_from_host(
    model: StoredModel, host_flat: torch.Tensor, device: str | torch.device = "cuda"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model on a GPU from the host tier (page-locked memory): one copy at PCIe speed."""
    import torch

    flat = torch.empty(model.data_bytes, dtype=torch.uint8, device=device)
    flat.copy_(host_flat, non_blocking=host_flat.is_pinned())
    torch.cuda.synchronize(device)
    return flat, tensor_views(model, flat)


def load_from_mapping(model: StoredModel, mm) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's tensors as views straight into a mapping of its decrypted bytes (the host
    tier), for a CPU instance; a GPU loads from the mapping through `stream_to_gpu`."""
    import torch

    host = torch.frombuffer(mm, dtype=torch.uint8)
    return host, tensor_views(model, host)
