"""Autoscaling decisions from a plain snapshot of one model's instances: scale up on queue depth,
keep min_instances, park idle instances that can sleep, retire idle ones. Deciding only; the
instance manager acts."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.serving.instance import ACTIVE_STATES, COMING_STATES, Instance, InstanceState


@dataclass(frozen=True)
class InstanceLoad:
    """What the autoscaler sees of one instance."""

    job_id: int
    state: InstanceState
    routable: bool
    inflight: int
    last_used: float
    can_sleep: bool = False

    @classmethod
    def of(cls, inst: Instance) -> InstanceLoad:
        return cls(
            inst.job_id, inst.state, inst.routable, inst.inflight, inst.last_used, inst.can_sleep
        )


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
    park_after_s: float = 0.0
    """Park an instance that can sleep when idle this long (above min_instances); 0: never."""

    @property
    def active(self) -> list[InstanceLoad]:
        return [i for i in self.instances if i.state in ACTIVE_STATES]


@dataclass(frozen=True)
class Launch:
    """Start one more instance of `model`."""

    model: str
    reason: str


@dataclass(frozen=True)
class Park:
    """Put instance `job_id` to sleep: its GPU memory is freed, its job kept."""

    job_id: int
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
        coming = [i for i in snap.instances if i.state in COMING_STATES]
        if not ready or coming or len(ready) + len(coming) >= snap.max_instances:
            return None
        depth = sum(i.inflight for i in ready) / len(ready)
        if depth < self.scale_up_queue_depth or snap.scaling_up:
            return None
        return Launch(snap.model, f"{depth:.1f} requests in flight per instance")

    def next_step(self, snap: ModelSnapshot) -> Launch | Park | Retire | None:
        """On a tick: the next thing to do for the model (ask again after a retirement or a
        parking; a launch is the model's last step of the tick). Below min_instances an instance
        starts unless starts failed lately; above it the idlest instance past the idle limit
        goes, else the idlest awake one past the parking limit sleeps."""
        active = snap.active
        if len(active) < snap.min_instances:
            if snap.recent_failures:
                return None
            return Launch(snap.model, "below min_instances")
        idle = sorted(
            (
                i
                for i in active
                if i.inflight == 0 and (i.routable or i.state is InstanceState.PARKED)
            ),
            key=lambda i: i.last_used,
        )
        if snap.idle_limit_s > 0 and len(active) > snap.min_instances:
            for inst in idle:
                if snap.now - inst.last_used >= snap.idle_limit_s:
                    return Retire(inst.job_id, f"idle for {snap.idle_limit_s:g} s")
        awake = [i for i in active if i.state is not InstanceState.PARKED]
        if snap.park_after_s > 0 and len(awake) > snap.min_instances:
            for inst in idle:
                if (
                    inst.routable
                    and inst.can_sleep
                    and snap.now - inst.last_used >= snap.park_after_s
                ):
                    return Park(inst.job_id, f"idle for {snap.park_after_s:g} s")
        return None
