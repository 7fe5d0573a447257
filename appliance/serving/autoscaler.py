"""Autoscaling decisions from a plain snapshot of one model's instances: scale up on queue depth,
keep min_instances, retire idle instances. Deciding only; the instance manager acts."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.serving.instance import ACTIVE_STATES, Instance, InstanceState


@dataclass(frozen=True)
class InstanceLoad:
    """What the autoscaler sees of one instance."""

    job_id: int
    state: InstanceState
    routable: bool
    inflight: int
    last_used: float

    @classmethod
    def of(cls, inst: Instance) -> InstanceLoad:
        return cls(inst.job_id, inst.state, inst.routable, inst.inflight, inst.last_used)


@dataclass(frozen=True)
class ModelSnapshot:
    """One model's instances and limits at time `now`."""

    model: str
    now: float
    instances: tuple[InstanceLoad, ...]
    min_instances: int
    max_instances: int
    idle_limit_s: float
    """Retire an instance idle this long (above min_instances); 0 or less: never."""
    recent_failures: int = 0
    """Start failures within the cooldown: no new instance to keep min_instances meanwhile."""
    scaling_up: bool = False
    """A scale-up launch is already under way."""

    @property
    def active(self) -> list[InstanceLoad]:
        return [i for i in self.instances if i.state in ACTIVE_STATES]


@dataclass(frozen=True)
class Launch:
    """Start one more instance of `model`."""

    model: str
    reason: str


@dataclass(frozen=True)
class Retire:
    """Stop instance `job_id`."""

    job_id: int
    reason: str


class Autoscaler:
    """Decides when a model gets another instance and when one of its instances goes."""

    def __init__(self, scale_up_queue_depth: float):
        self.scale_up_queue_depth = scale_up_queue_depth

    def scale_up(self, snap: ModelSnapshot) -> Launch | None:
        """On a request: one more instance when the requests in flight per ready instance reach
        the queue depth, none is coming already and max_instances allows it."""
        ready = [i for i in snap.instances if i.routable]
        coming = [
            i for i in snap.instances if i.state in (InstanceState.PENDING, InstanceState.STARTING)
        ]
        if not ready or coming or len(ready) + len(coming) >= snap.max_instances:
            return None
        depth = sum(i.inflight for i in ready) / len(ready)
        if depth < self.scale_up_queue_depth or snap.scaling_up:
            return None
        return Launch(snap.model, f"{depth:.1f} requests in flight per instance")

    def next_step(self, snap: ModelSnapshot) -> Launch | Retire | None:
        """On a tick: the next thing to do for the model (ask again after a retirement; a launch
        is the model's last step of the tick). Below min_instances an instance starts unless
        starts failed lately; above it the idlest instance past the idle limit goes."""
        active = snap.active
        if len(active) < snap.min_instances:
            if snap.recent_failures:
                return None
            return Launch(snap.model, "below min_instances")
        if snap.idle_limit_s <= 0 or len(active) <= snap.min_instances:
            return None
        for inst in sorted(active, key=lambda i: i.last_used):
            if (
                inst.routable
                and inst.inflight == 0
                and snap.now - inst.last_used >= snap.idle_limit_s
            ):
                return Retire(inst.job_id, f"idle for {snap.idle_limit_s:g} s")
        return None
