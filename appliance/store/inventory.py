"""What one node's store holds, in which tier, and how fast each tier reads (measured on the node).

Tiers, fastest first: `gpu` (an instance on the node has it loaded; the gateway knows those),
`host` (decrypted in the node's host-memory tier), `page_cache` (its file is in the page cache),
`disk` (local disk), `shared` (a network filesystem)."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.store.format import DATA_FILE, HEADER_FILE, StoreHeader
from appliance.store.mapping import mapping_address

TIERS = ("gpu", "host", "page_cache", "disk", "shared")
# Filesystems that are storage on the network, not this node's disk.
SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "beegfs", "glusterfs")
# A file counts as in the page cache when this much of it is resident.
RESIDENT_ENOUGH = 0.9
_libc = ctypes.CDLL(None, use_errno=True)
_LOW_BIT = bytes(b & 1 for b in range(256))


@dataclass
class Holding:
    """One model on one node: its fastest tier and its size."""

    model_id: str
    tier: str
    nbytes: int
    resident: float = 0.0  # fraction of the file in the page cache


@dataclass
class NodeInventory:
    """A node's models and its measured read bandwidth per tier (GB/s)."""

    node: str
    holdings: dict[str, Holding] = field(default_factory=dict)
    bandwidth_gbps: dict[str, float] = field(default_factory=dict)
    scanned_at: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NodeInventory:
        return cls(
            node=d["node"],
            holdings={k: Holding(**v) for k, v in d.get("holdings", {}).items()},
            bandwidth_gbps=dict(d.get("bandwidth_gbps", {})),
            scanned_at=float(d.get("scanned_at", 0.0)),
        )


def resident_fraction(path: Path) -> float:
    """How much of a file is in the page cache (mincore over a mapping; nothing is read)."""
    size = path.stat().st_size
    if size == 0:
        return 1.0
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        rc = _libc.mincore(ctypes.c_void_p(mapping_address(mm)), ctypes.c_size_t(size), vec)
        if rc != 0:
            return 0.0
    resident = bytes(vec).translate(_LOW_BIT)
    return (pages - resident.count(0)) / pages


def filesystem_type(path: Path) -> str:
    """The type of the filesystem `path` is on (from /proc/mounts: longest matching mount)."""
    best, fstype = "", "unknown"
    target = str(path.resolve())
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return fstype
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
            best
        ):
            best, fstype = mount, parts[2]
    return fstype


def scan(store_root: Path, node: str, host_models: dict[str, int] | None = None) -> NodeInventory:
    """The models under `store_root` with the fastest tier each is in on this node."""
    inv = NodeInventory(node=node, scanned_at=time.time())
    fstype = filesystem_type(store_root) if store_root.exists() else "unknown"
    shared = fstype.split(".")[0] in SHARED_FS
    for d in sorted(store_root.iterdir()) if store_root.is_dir() else []:
        if not (d / HEADER_FILE).exists() or d.name.startswith("."):
            continue
        try:
            header = StoreHeader.read(d)
        except ApplianceError:
            continue
        data = d / DATA_FILE
        resident = resident_fraction(data) if data.exists() else 0.0
        tier = "shared" if shared else "disk"
        if resident >= RESIDENT_ENOUGH:
            tier = "page_cache"
        if host_models and header.model_id in host_models:
            tier = "host"
        inv.holdings[header.model_id] = Holding(
            header.model_id, tier, header.data_bytes, round(resident, 3)
        )
    return inv


def measure_bandwidths(store_root: Path, sample_bytes: int = 256 << 20) -> dict[str, float]:
    """Read bandwidth (GB/s) of this node's disk (O_DIRECT, so the page cache does not flatter
    it) and page cache, on a sample of the largest stored file; pinned host-to-GPU copies when
    there is a GPU. Tiers that cannot be measured are left out (the estimate then uses defaults)."""
    files = sorted(
        (p for p in store_root.glob(f"*/{DATA_FILE}") if p.is_file()),
        key=lambda p: p.stat().st_size,
        reverse=True,
    )
    out: dict[str, float] = {}
    if files:
        path = files[0]
        n = min(sample_bytes, path.stat().st_size) // mmap.PAGESIZE * mmap.PAGESIZE
        if n:
            buf = mmap.mmap(-1, n)  # page-aligned, as O_DIRECT wants
            for tier, flags in (("disk", os.O_DIRECT), ("page_cache", 0)):
                try:
                    fd = os.open(path, os.O_RDONLY | flags)
                except OSError:
                    continue  # e.g. tmpfs refuses O_DIRECT
                try:
                    os.preadv(fd, [buf], 0)  # first pass fills the cache for the second tier
                    t0 = time.perf_counter()
                    got = os.preadv(fd, [buf], 0)
                    out[tier] = round(got / (time.perf_counter() - t0) / 1e9, 2)
                except OSError:
                    pass
                finally:
                    os.close(fd)
            buf.close()
    out.update(_gpu_bandwidth())
    return out


def _gpu_bandwidth() -> dict[str, float]:
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
        host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty_like(host, device="cuda")
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        return {"host": round(host.numel() / (time.perf_counter() - t0) / 1e9, 2)}
    except Exception:  # no usable GPU: the host tier is then not faster than memory itself
        return {}
