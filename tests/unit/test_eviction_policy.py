"""Eviction for a waiting model, from plain snapshots: the least recently used idle instance of
another model goes; busy, protected and useless ones never do (no Slurm, no event loop)."""

from __future__ import annotations

from appliance.serving.eviction import Holder, LeastRecentlyUsedIdle, RoomWanted
from appliance.serving.instance import InstanceState

READY, PARKED = InstanceState.READY, InstanceState.PARKED
POLICY = LeastRecentlyUsedIdle()


def holder(job_id, model="a", state=READY, inflight=0, last_used=0.0, gpu=False, protected=False):
    return Holder(job_id, model, state, inflight, last_used, gpu, protected)


def want(model="b", gpu=False) -> RoomWanted:
    return RoomWanted(model, 99, gpu, waiting_requests=1)


def test_the_least_recently_used_idle_instance_of_another_model_goes():
    older, newer = holder(1, last_used=10), holder(2, last_used=20)
    assert POLICY.victim(want(), [newer, older]) == older
    parked = holder(3, state=PARKED, last_used=5)
    assert POLICY.victim(want(), [newer, older, parked]) == parked


def test_never_busy_protected_starting_or_of_the_waiting_model():
    busy = holder(1, inflight=2, last_used=1)
    kept = holder(2, protected=True, last_used=2)
    coming = holder(3, state=InstanceState.STARTING, last_used=3)
    own = holder(4, model="b", last_used=4)
    assert POLICY.victim(want(), [busy, kept, coming, own]) is None


def test_a_gpu_model_only_takes_room_from_gpu_instances():
    cpu, gpu = holder(1, last_used=1), holder(2, gpu=True, last_used=9)
    assert POLICY.victim(want(gpu=True), [cpu, gpu]) == gpu
    assert POLICY.victim(want(gpu=True), [cpu]) is None
    assert POLICY.victim(want(gpu=False), [cpu, gpu]) == cpu
