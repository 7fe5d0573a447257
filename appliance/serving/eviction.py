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
    node: str = ""
    """Where its job runs ("" if not known yet)."""


@dataclass(frozen=True)
class RoomWanted:
    """A model whose instance job is pending on resources while requests wait for it."""

    model: str
    job_id: int
    uses_gpu: bool
    waiting_requests: int
    nodes: frozenset[str] = frozenset()
    """The nodes its job is pinned to (--nodelist: a stored model's job waits for the node the
    store placed it on); empty: any node. Room made on another node is of no use to it."""


class EvictionPolicy(Protocol):
    """Chooses the instance to stop so that a waiting model's job can start (None: none)."""

    def victim(self, wanted: RoomWanted, holders: Sequence[Holder]) -> Holder | None: ...


class LeastRecentlyUsedIdle:
    """The least recently used idle instance of another model: never one with requests in
    flight, never one its model keeps for min_instances, for a GPU model only one that holds a
    GPU, and for a job pinned to nodes only one on one of them (stopping any other frees nothing
    the job can use: a user's idle model would go for nothing, and the next eviction would wait
    until it was gone). A job pinned to several nodes needs all of them, so room on any one
    may be what it waits for."""

    def victim(self, wanted: RoomWanted, holders: Sequence[Holder]) -> Holder | None:
        idle = [
            h
            for h in holders
            if h.model != wanted.model
            and h.state in (InstanceState.READY, InstanceState.PARKED)
            and h.inflight == 0
            and not h.protected
            and (h.uses_gpu or not wanted.uses_gpu)
            and (not wanted.nodes or h.node in wanted.nodes)
        ]
        return min(idle, key=lambda h: h.last_used, default=None)
