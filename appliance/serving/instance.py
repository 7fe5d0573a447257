"""What the gateway knows about one model instance (one Slurm job)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum


class InstanceState(StrEnum):
    """Life of an instance, from queued job to gone."""

    PENDING = "pending"  # queued in Slurm
    STARTING = "starting"  # job running, server not healthy yet
    READY = "ready"  # healthy: requests are routed to it
    PARKED = "parked"  # asleep (vLLM sleep mode): GPU memory freed, job kept; a request wakes it
    WAKING = "waking"  # being woken for a request
    UNHEALTHY = "unhealthy"  # failing health checks: not routed to
    DRAINING = "draining"  # about to go (preempted, node drained, consolidated): its running
    # requests move to other instances, no new ones come; then it is stopped
    STOPPING = "stopping"  # cancelled, waiting for Slurm to end it
    GONE = "gone"  # the job has ended


ACTIVE_STATES = (
    InstanceState.PENDING,
    InstanceState.STARTING,
    InstanceState.READY,
    InstanceState.PARKED,
    InstanceState.WAKING,
)
# On its way to serving: a request waits for one of these rather than starting another.
COMING_STATES = (InstanceState.PENDING, InstanceState.STARTING, InstanceState.WAKING)


@dataclass
class Instance:
    """One model server running (or about to run) as a Slurm job."""

    job_id: int
    model: str
    state: InstanceState
    submitted_at: float
    node: str = ""
    required_nodes: tuple[str, ...] = ()
    """The nodes its job is pinned to (a stored model's job runs where the store placed it);
    empty: Slurm may start it anywhere. Room made elsewhere does not help it while it pends."""
    url: str | None = None
    inflight: int = 0
    served: int = 0
    last_used: float = field(default_factory=time.time)
    last_acquired: float = field(default_factory=time.time)
    """When a request was last routed to it (releases do not count)."""
    ready_at: float | None = None
    reason: str = ""
    health_failures: int = 0
    last_probe: float = 0.0
    # When a stream from this instance last delivered bytes: proof of life when a health probe
    # times out because the machine is busy generating.
    last_data: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    can_sleep: bool = False
    """Its server runs with vLLM's sleep mode: it can be parked (its launcher says so)."""
    preemptible: bool = False
    """Runs in the preemptible partition (batch jobs may take its resources back)."""
    ends_at: float | None = None
    """When Slurm ends its job (its time limit); a successor takes over before (time_limit.py)."""
    successor: int | None = None
    """The job id of the instance started to take over from it at its time limit."""
    leave_by: float | None = None
    """While draining: when it will be gone (a preempted job's end of grace time)."""
    move_quota: int = 0
    """How many of its streams should move to another instance (rebalancing); while it is
    draining, all of them do."""
    move_forced: bool = False
    """The moves were asked for by an administrator: no cost check."""
    streams: set = field(default_factory=set, repr=False)
    """The resumable streams it is serving (appliance/gateway/migration.py StreamRecord)."""
    moves_wanted: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)
    """Set while streams should leave it (draining, or moves asked for): a stream stalled on it
    then moves at once instead of at its next look."""

    @property
    def routable(self) -> bool:
        return self.state is InstanceState.READY and self.url is not None

    def describe(self) -> dict:
        """JSON-friendly view for the admin API and `appliance instances`."""
        return {
            "job_id": self.job_id,
            "model": self.model,
            "state": self.state.value,
            "node": self.node,
            "url": self.url,
            "inflight": self.inflight,
            "served": self.served,
            "idle_s": round(time.time() - self.last_used, 1) if self.inflight == 0 else 0.0,
            "reason": self.reason,
            "submitted_at": self.submitted_at,
            "ready_at": self.ready_at,
            "phases": self.phases,
            "preemptible": self.preemptible,
            "can_sleep": self.can_sleep,
            "leave_by": self.leave_by,
            "resumable_streams": len(self.streams),
            "move_quota": self.move_quota,
        }
