"""The autoscaler's decisions from plain snapshots: scale up on queue depth, keep
min_instances, park idle instances that can sleep, retire idle instances (no Slurm, no event
loop)."""

from __future__ import annotations

from appliance.serving.autoscaler import (
    Autoscaler,
    InstanceLoad,
    Launch,
    ModelSnapshot,
    Park,
    Retire,
)
from appliance.serving.instance import InstanceState

NOW = 1000.0
READY = InstanceState.READY


PARKED = InstanceState.PARKED


def inst(
    job_id: int, state=READY, inflight: int = 0, idle_s: float = 0.0, can_sleep: bool = False
) -> InstanceLoad:
    return InstanceLoad(job_id, state, state is READY, inflight, NOW - idle_s, can_sleep)


def snap(*instances: InstanceLoad, **limits) -> ModelSnapshot:
    fields = {"min_instances": 0, "max_instances": 3, "idle_limit_s": 60.0, **limits}
    return ModelSnapshot(model="tiny", now=NOW, instances=instances, **fields)


SCALER = Autoscaler(scale_up_queue_depth=4)


def test_scales_up_when_the_queue_per_ready_instance_reaches_the_depth():
    launch = SCALER.scale_up(snap(inst(1, inflight=5), inst(2, inflight=3)))
    assert launch == Launch("tiny", "4.0 requests in flight per instance")
    assert SCALER.scale_up(snap(inst(1, inflight=4), inst(2, inflight=3))) is None


def test_no_scale_up_while_one_is_coming_running_out_or_under_way():
    busy = inst(1, inflight=9)
    assert SCALER.scale_up(snap(busy, inst(2, InstanceState.STARTING))) is None
    assert SCALER.scale_up(snap(busy, max_instances=1)) is None
    assert SCALER.scale_up(snap(busy, scaling_up=True)) is None
    assert SCALER.scale_up(snap(inst(1, InstanceState.UNHEALTHY, inflight=9))) is None


def test_starts_instances_up_to_min_instances_unless_starts_failed_lately():
    assert SCALER.next_step(snap(min_instances=1)) == Launch("tiny", "below min_instances")
    assert SCALER.next_step(snap(min_instances=1, recent_failures=1)) is None
    assert SCALER.next_step(snap(inst(1, InstanceState.PENDING), min_instances=1)) is None


def test_retires_the_idlest_instance_past_the_idle_limit_above_min_instances():
    idle, idler, busy = inst(1, idle_s=70), inst(2, idle_s=90), inst(3, inflight=1, idle_s=99)
    assert SCALER.next_step(snap(idle, idler, busy)) == Retire(2, "idle for 60 s")
    assert SCALER.next_step(snap(idle, busy, min_instances=2)) is None
    assert SCALER.next_step(snap(inst(1, idle_s=59))) is None
    assert SCALER.next_step(snap(idle, idle_limit_s=0)) is None


def test_a_retired_instance_no_longer_counts_toward_the_next_step():
    first = snap(inst(1, idle_s=90), inst(2, idle_s=80), min_instances=1)
    assert SCALER.next_step(first) == Retire(1, "idle for 60 s")
    after = snap(inst(1, InstanceState.STOPPING, idle_s=90), inst(2, idle_s=80), min_instances=1)
    assert SCALER.next_step(after) is None


def test_parks_the_idlest_instance_that_can_sleep_before_the_idle_limit():
    awake = inst(1, idle_s=40, can_sleep=True)
    idler = inst(2, idle_s=50, can_sleep=True)
    cannot = inst(3, idle_s=55)
    busy = inst(4, inflight=1, idle_s=59, can_sleep=True)
    step = SCALER.next_step(snap(awake, idler, cannot, busy, park_after_s=30, max_instances=4))
    assert step == Park(2, "idle for 30 s")
    assert SCALER.next_step(snap(awake, park_after_s=0)) is None
    assert SCALER.next_step(snap(inst(1, idle_s=20, can_sleep=True), park_after_s=30)) is None


def test_min_instances_stay_awake_and_a_parked_instance_still_retires():
    parked = inst(1, PARKED, idle_s=45, can_sleep=True)
    awake = inst(2, idle_s=45, can_sleep=True)
    # One parked, one awake with min_instances 1: the awake one stays awake.
    assert SCALER.next_step(snap(parked, awake, park_after_s=30, min_instances=1)) is None
    assert SCALER.next_step(snap(parked, awake, park_after_s=30)) == Park(2, "idle for 30 s")
    # Past the idle limit, the parked one goes like any idle instance (it is the idlest).
    old = inst(1, PARKED, idle_s=70, can_sleep=True)
    assert SCALER.next_step(snap(old, awake, park_after_s=30)) == Retire(1, "idle for 60 s")
    # A parked instance counts toward min_instances: it is woken, not replaced.
    assert SCALER.next_step(snap(parked, min_instances=1, park_after_s=30)) is None


def test_a_waking_instance_counts_as_coming():
    busy = inst(1, inflight=9)
    assert SCALER.scale_up(snap(busy, inst(2, InstanceState.WAKING))) is None
