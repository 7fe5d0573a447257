"""Eviction for a waiting model, from plain snapshots: the least recently used idle instance of
another model goes; busy, protected and useless ones never do (no Slurm, no event loop)."""

from __future__ import annotations

from appliance.serving.eviction import Holder, LeastRecentlyUsedIdle, RoomWanted
from appliance.serving.instance import InstanceState

READY, PARKED = InstanceState.READY, InstanceState.PARKED
POLICY = LeastRecentlyUsedIdle()


def holder(
    job_id, model="a", state=READY, inflight=0, last_used=0.0, gpu=False, protected=False, node=""
):
    return Holder(job_id, model, state, inflight, last_used, gpu, protected, node=node)


def want(model="b", gpu=False, nodes=()) -> RoomWanted:
    return RoomWanted(model, 99, gpu, waiting_requests=1, nodes=frozenset(nodes))


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


def test_a_job_pinned_to_a_node_only_takes_room_there():
    # A stored model's job waits for the node the store placed it on (--nodelist=n2): the
    # least recently used idle instance on n1 frees nothing it can use, so it stays.
    on_n1, on_n2 = holder(1, last_used=1, node="n1"), holder(2, last_used=9, node="n2")
    assert POLICY.victim(want(nodes=["n2"]), [on_n1, on_n2]) == on_n2
    assert POLICY.victim(want(nodes=["n2"]), [on_n1]) is None
    # Where an instance runs is not known yet: it is not taken for a pinned job.
    assert POLICY.victim(want(nodes=["n2"]), [holder(3, node="")]) is None
    # Pinned to several nodes: room on any of them; not pinned: any node, as before.
    assert POLICY.victim(want(nodes=["n1", "n2"]), [on_n2, on_n1]) == on_n1
    assert POLICY.victim(want(), [on_n2, on_n1]) == on_n1


def test_the_node_is_checked_with_the_other_rules():
    busy = holder(1, inflight=1, last_used=1, node="n2")
    cpu = holder(2, last_used=2, node="n2")
    gpu_elsewhere = holder(3, gpu=True, last_used=3, node="n1")
    gpu_there = holder(4, gpu=True, last_used=4, node="n2")
    holders = [busy, cpu, gpu_elsewhere, gpu_there]
    assert POLICY.victim(want(gpu=True, nodes=["n2"]), holders) == gpu_there
    assert POLICY.victim(want(gpu=True, nodes=["n2"]), holders[:3]) is None
