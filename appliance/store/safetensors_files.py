"""Reads safetensors checkpoints without torch: headers, and tensor bytes through mmap."""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from appliance.store.format import DTYPE_SIZES, StoreFormatError

MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a source checkpoint: which file, where its bytes are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[list[SourceTensor], dict[str, str]]:
    """The tensors of one .safetensors file and its `__metadata__`; checks every offset."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StoreFormatError(f"{path.name}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise StoreFormatError(f"{path.name}: not a safetensors file (header size {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise StoreFormatError(f"{path.name}: malformed safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise StoreFormatError(f"{path.name}: malformed safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise StoreFormatError(f"{path.name}: malformed entry for {name}") from None
        if dtype not in DTYPE_SIZES:
            raise StoreFormatError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        count = 1
        for dim in shape:
            count *= dim
        if end - begin != count * DTYPE_SIZES[dtype] or begin < 0 or base + end > size:
            raise StoreFormatError(f"{path.name}: tensor {name} has inconsistent offsets")
        tensors.append(SourceTensor(name, dtype, shape, path, base + begin, end - begin))
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def checkpoint_files(src: Path) -> list[Path]:
    """The .safetensors shards of a Hugging Face checkpoint directory, in a stable order."""
    files = sorted(src.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = (
            f" (found {', '.join(pickled)}: pickled weights are not imported, since loading "
            "them can run code; convert them to safetensors first)"
            if pickled
            else ""
        )
        raise StoreFormatError(f"no .safetensors files in {src}{hint}")
    return files


class MappedFiles:
    """Read-only mmaps of the source files, opened once each."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def view(self, t: SourceTensor) -> memoryview:
        mm = self._maps.get(t.path)
        if mm is None:
            with t.path.open("rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[t.path] = mm
        return memoryview(mm)[t.start : t.start + t.nbytes]

    def close(self) -> None:
        for mm in self._maps.values():
            # A view still alive keeps its map open; the map goes with the view.
            with contextlib.suppress(BufferError):
                mm.close()
        self._maps.clear()
