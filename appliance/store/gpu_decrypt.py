"""Decrypts a stored model's chunks in GPU memory, where the loader copied their ciphertext:
plaintext never exists in host memory, and decryption runs at GPU speed behind the copies.

Every chunk's tag is checked before the weights are handed out; on a mismatch the device buffer
is zeroed and the load fails naming the chunk, as on the CPU path."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from appliance.store.cuda_rtc import CudaModule
from appliance.store.format import DATA_FILE, DATA_FILE_NO
from appliance.store.gcm_tables import gf_pow, ghash_key, kernel_tables, split
from appliance.store.model import StoredModel, StoreIntegrityError

if TYPE_CHECKING:
    import torch

SOURCE = Path(__file__).with_name("gcm_kernels.cu")
BLOCK_THREADS = 256
# Threads that share one chunk: 32 blocks each for a 4 MiB chunk.
MAX_LANES = 8192

_modules: dict[int, CudaModule] = {}
_modules_lock = threading.Lock()


def kernels(device: torch.device) -> CudaModule:
    """The GCM kernels loaded on `device` (compiled once per process, cached on disk)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    with _modules_lock:
        if index not in _modules:
            major, minor = torch.cuda.get_device_capability(index)
            _modules[index] = CudaModule(SOURCE.read_text(), index, major * 10 + minor)
        return _modules[index]


def _u64(x: int) -> ctypes.c_uint64:
    return ctypes.c_uint64(x)


class GpuDecryptor:
    """One model's decryption on one GPU: `decrypt` each range of whole chunks as it lands (on
    the stream that copied it), then `verify` once, after every range."""

    def __init__(self, model: StoredModel, device: str | torch.device):
        import torch

        if model.cipher is None:
            raise ValueError(f"{model.model_id} is not encrypted")
        chunk = model.header.chunk_bytes
        if chunk % 16 or model.data_bytes % 16:
            raise ValueError("GPU decryption needs chunks of whole 16-byte blocks")
        self.model = model
        self.device = torch.device(device)
        self.module = kernels(self.device)
        key = model.cipher.key_bytes()
        n = model.header.n_chunks
        self.h = ghash_key(key)
        full_blocks = chunk // 16
        self.lanes = min(MAX_LANES, -(-full_blocks // BLOCK_THREADS) * BLOCK_THREADS)
        stream = torch.cuda.current_stream(self.device)
        with torch.cuda.device(self.device):
            self.tables = torch.from_numpy(kernel_tables(key).view(np.int32)).to(self.device)
            self.hl_table = torch.empty(1024, dtype=torch.int64, device=self.device)
            hl_hi, hl_lo = split(gf_pow(self.h, self.lanes))
            self.module.launch(
                "gcm_mult_table",
                (2, 1, 1),
                BLOCK_THREADS,
                [_u64(hl_hi), _u64(hl_lo), ctypes.c_void_p(self.hl_table.data_ptr())],
                stream.cuda_stream,
            )
            self.blocks = [model.chunk_span(i)[1] // 16 for i in range(n)]
            self.powers = {c: self._lane_powers(c, stream) for c in set(self.blocks)}
            self.acc = torch.zeros(2 * n, dtype=torch.int64, device=self.device)
            stride = -(-max(len(a) for a in model.chunk_aads) // 16) * 16
            aad = np.zeros((n, stride), dtype=np.uint8)
            for i, a in enumerate(model.chunk_aads):
                aad[i, : len(a)] = np.frombuffer(a, dtype=np.uint8)
            self.aad_stride = stride
            self.aad = torch.from_numpy(aad).to(self.device)
            self.aad_len = torch.tensor([len(a) for a in model.chunk_aads], dtype=torch.int64).to(
                self.device
            )
            self.block_counts = torch.tensor(self.blocks, dtype=torch.int64).to(self.device)
            tags = np.frombuffer(model.tags, dtype=np.uint8).copy()
            self.tags = torch.from_numpy(tags).to(self.device)
        stream.synchronize()  # tables ready before other streams use them

    def _lane_powers(self, c_blocks: int, stream) -> torch.Tensor:
        import torch

        powers = torch.empty(2 * self.lanes, dtype=torch.int64, device=self.device)
        h_hi, h_lo = split(self.h)
        self.module.launch(
            "gcm_lane_powers",
            (self.lanes // BLOCK_THREADS, 1, 1),
            BLOCK_THREADS,
            [
                _u64(h_hi),
                _u64(h_lo),
                _u64(c_blocks),
                _u64(self.lanes),
                ctypes.c_void_p(powers.data_ptr()),
            ],
            stream.cuda_stream,
        )
        return powers

    def decrypt(self, data: torch.Tensor, first_chunk: int, stream) -> None:
        """Decrypt in place the whole chunks that `data` (uint8, on the device) holds, starting
        with chunk `first_chunk`; queued on `stream` after whatever filled `data`."""
        chunk = self.model.header.chunk_bytes
        count = -(-data.numel() // chunk)
        # Runs of chunks with the same length (all but possibly the last chunk of the model).
        start = 0
        while start < count:
            c = self.blocks[first_chunk + start]
            end = start + 1
            while end < count and self.blocks[first_chunk + end] == c:
                end += 1
            self.module.launch(
                "gcm_decrypt",
                (self.lanes // BLOCK_THREADS, end - start, 1),
                BLOCK_THREADS,
                [
                    ctypes.c_void_p(data.data_ptr() + start * chunk),
                    _u64(chunk),
                    _u64(c),
                    _u64(first_chunk + start),
                    ctypes.c_uint32(DATA_FILE_NO),
                    _u64(self.lanes),
                    ctypes.c_void_p(self.tables.data_ptr()),
                    ctypes.c_void_p(self.hl_table.data_ptr()),
                    ctypes.c_void_p(self.powers[c].data_ptr()),
                    ctypes.c_void_p(self.acc.data_ptr()),
                ],
                stream.cuda_stream,
            )
            start = end

    def restart(self, first: int, end: int, stream) -> None:
        """Forget what earlier `decrypt` calls summed for chunks first..end-1, on `stream`: a
        chunk that two loads share (the boundary of two windows) is decrypted twice."""
        import torch

        with torch.cuda.stream(stream):
            self.acc[2 * first : 2 * end].zero_()

    def verify(self, data: torch.Tensor, first: int = 0, end: int | None = None) -> None:
        """Check the tags of chunks first..end-1 (all by default), once their `decrypt` calls are
        done; on a mismatch zero `data` (their plaintext) and raise StoreIntegrityError naming
        the first bad chunk."""
        import torch

        end = self.model.header.n_chunks if end is None else end
        bad = torch.zeros(self.model.header.n_chunks, dtype=torch.int32, device=self.device)
        stream = torch.cuda.current_stream(self.device)
        h_hi, h_lo = split(self.h)
        self.module.launch(
            "gcm_check",
            (max(1, -(-(end - first) // BLOCK_THREADS)), 1, 1),
            BLOCK_THREADS,
            [
                ctypes.c_void_p(self.acc.data_ptr()),
                ctypes.c_void_p(self.aad.data_ptr()),
                ctypes.c_void_p(self.aad_len.data_ptr()),
                _u64(self.aad_stride),
                ctypes.c_void_p(self.block_counts.data_ptr()),
                _u64(first),
                _u64(end),
                ctypes.c_uint32(DATA_FILE_NO),
                ctypes.c_void_p(self.tables.data_ptr()),
                _u64(h_hi),
                _u64(h_lo),
                ctypes.c_void_p(self.tags.data_ptr()),
                ctypes.c_void_p(bad.data_ptr()),
            ],
            stream.cuda_stream,
        )
        failed = torch.nonzero(bad).flatten().tolist()  # waits for the check
        if failed:
            data.zero_()
            torch.cuda.synchronize(self.device)
            raise StoreIntegrityError(
                f"chunk {failed[0]} of {self.model.model_id}/{DATA_FILE} failed authentication "
                "(on the GPU): it was altered, swapped or truncated"
            )

    def close(self) -> None:
        """Zero the expanded key in device memory (freed memory goes back to torch's cache)."""
        self.tables.zero_()
