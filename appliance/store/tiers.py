"""The host-memory tier of a node: decrypted models in page-locked memory, evicted least recently
used first under a byte budget, so a cold start copies to the GPU at PCIe speed."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from appliance.errors import ApplianceError


class HostBuffer(Protocol):
    """Memory holding one decrypted model."""

    def wipe(self) -> None:
        """Zero the plaintext and give the memory back."""


class TierFull(ApplianceError):
    """A model does not fit in the tier even after evicting everything that may be evicted."""


@dataclass
class HostEntry:
    """One model held in host memory: its buffer and how many loads are using it."""

    model_id: str
    buffer: HostBuffer
    nbytes: int
    users: int = 0


class HostTier:
    """Models in host memory under `budget_bytes`; entries in use are never evicted."""

    def __init__(self, budget_bytes: int, on_evict: Callable[[str], None] | None = None):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, HostEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._on_evict = on_evict

    @property
    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def holds(self) -> list[str]:
        """Model ids held, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, model_id: str) -> HostEntry | None:
        """The entry, marked as just used and taken (give it back with `release`)."""
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is not None:
                self._entries.move_to_end(model_id)
                entry.users += 1
            return entry

    def release(self, entry: HostEntry) -> None:
        with self._lock:
            entry.users = max(0, entry.users - 1)

    def put(self, model_id: str, nbytes: int, fill: Callable[[], HostBuffer]) -> HostEntry:
        """Make room for nbytes (evicting LRU entries), then hold what `fill` returns. The
        returned entry is taken, as by `get`."""
        if nbytes > self.budget_bytes:
            raise TierFull(
                f"model {model_id} ({nbytes} bytes) is larger than the host tier's budget "
                f"({self.budget_bytes} bytes)"
            )
        with self._lock:
            if model_id in self._entries:
                entry = self._entries[model_id]
                entry.users += 1
                self._entries.move_to_end(model_id)
                return entry
            for victim in list(self._entries.values()):
                if self.used_bytes + nbytes <= self.budget_bytes:
                    break
                if victim.users == 0:
                    self._evict(victim)
            if self.used_bytes + nbytes > self.budget_bytes:
                raise TierFull(
                    f"no room for model {model_id} in the host tier: "
                    f"{', '.join(m for m, e in self._entries.items() if e.users)} are in use"
                )
        buffer = fill()
        with self._lock:
            entry = HostEntry(model_id, buffer, nbytes, users=1)
            self._entries[model_id] = entry
            return entry

    def evict(self, model_id: str) -> bool:
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None or entry.users:
                return False
            self._evict(entry)
            return True

    def _evict(self, entry: HostEntry) -> None:
        del self._entries[entry.model_id]
        # Plaintext weights: zeroed before the memory goes back.
        entry.buffer.wipe()
        if self._on_evict is not None:
            self._on_evict(entry.model_id)
