"""Making room for a waiting model: which idle instance of another model to stop when a model's
instance waits in Slurm's queue for resources while requests wait for it. A policy over a
snapshot of the instances; the instance manager acts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from appliance.serving.instance import InstanceState


@dataclass(frozen=True)
class Holder:
    """An instance holding resources, as eviction sees it."""

    job_id: int
    model: str
    state: InstanceState
    inflight: int
    last_used: float
    uses_gpu: bool
    protected: bool
    """One of its model's min_instances: never evicted."""


@dataclass(frozen=True)
class RoomWanted:
    """A model whose instance job is pending on resources while requests wait for it."""

    model: str
    job_id: int
    uses_gpu: bool
    waiting_requests: int


class EvictionPolicy(Protocol):
    """Chooses the instance to stop so that a waiting model's job can start (None: none)."""

    def victim(self, wanted: RoomWanted, holders: Sequence[Holder]) -> Holder | None: ...


class LeastRecentlyUsedIdle:
    """The least recently used idle instance of another model: never one with requests in
    flight, never one its model keeps for min_instances, and for a GPU model only one that
    holds a GPU (stopping a CPU instance frees nothing it can use)."""

    def victim(self, wanted: RoomWanted, holders: Sequence[Holder]) -> Holder | None:
        idle = [
            h
            for h in holders
            if h.model != wanted.model
            and h.state in (InstanceState.READY, InstanceState.PARKED)
            and h.inflight == 0
            and not h.protected
            and (h.uses_gpu or not wanted.uses_gpu)
        ]
        return min(idle, key=lambda h: h.last_used, default=None)
