"""Placement by start-up time: queue wait plus size over the bandwidth of the fastest tier."""

from __future__ import annotations

from appliance.models.resources import InstanceRequest
from appliance.slurm.records import SlurmNode
from appliance.store.inventory import Holding, NodeInventory
from appliance.store.placement import BUSY_WAIT_S, choose_node, fits_now

GB = 10**9
CPU_REQ = InstanceRequest(cpus=2, mem_mb=4000, gres=None, gpu_memory_utilization=None)
GPU_REQ = InstanceRequest(cpus=2, mem_mb=4000, gres="gpu:1", gpu_memory_utilization=None)


def node(name, state="idle", alloc_cpus=0, gres="gpu:2", gres_used="gpu:0(IDX:N/A)"):
    return SlurmNode(
        name=name,
        state=state,
        cpus=16,
        alloc_cpus=alloc_cpus,
        real_memory_mb=64000,
        alloc_memory_mb=0,
        gres=gres,
        gres_used=gres_used,
    )


def inv(name, tier=None, nbytes=16 * GB, **bw):
    holdings = {"m": Holding("m", tier, nbytes)} if tier else {}
    return NodeInventory(name, holdings, bandwidth_gbps=bw)


def test_fastest_tier_wins():
    nodes = [node("n1"), node("n2"), node("n3")]
    invs = {
        "n1": inv("n1", "disk", disk=2.0),
        "n2": inv("n2", "page_cache", page_cache=20.0),
        "n3": inv("n3", "shared", shared=1.0),
    }
    chosen, ranking = choose_node("m", nodes, invs, CPU_REQ)
    assert chosen == "n2"
    assert [e.node for e in ranking] == ["n2", "n1", "n3"]
    assert ranking[0].load_s == 0.8 and ranking[1].load_s == 8.0


def test_a_busy_node_loses_to_a_slower_free_one():
    busy = node("n1", state="mixed", gres_used="gpu:2(IDX:0-1)")
    nodes = [busy, node("n2")]
    invs = {"n1": inv("n1", "host", host=50.0), "n2": inv("n2", "disk", disk=1.5)}
    chosen, ranking = choose_node("m", nodes, invs, GPU_REQ)
    assert chosen == "n2"
    assert ranking[-1].node == "n1" and ranking[-1].wait_s == BUSY_WAIT_S


def test_no_information_or_no_room_leaves_the_choice_to_slurm():
    nodes = [node("n1"), node("n2")]
    assert choose_node("m", nodes, {}, CPU_REQ) == (None, [])
    assert choose_node("m", nodes, {"n1": inv("n1")}, CPU_REQ)[0] is None  # n1 lacks the model
    full = [node("n1", alloc_cpus=16)]
    chosen, ranking = choose_node("m", full, {"n1": inv("n1", "disk")}, CPU_REQ)
    assert chosen is None and ranking[0].wait_s > 0


def test_fits_now_checks_state_cpus_and_gres():
    assert fits_now(node("n1"), GPU_REQ)
    assert not fits_now(node("n1", state="idle+drain"), GPU_REQ)
    assert not fits_now(node("n1", state="down"), CPU_REQ)
    assert not fits_now(node("n1", alloc_cpus=15), CPU_REQ)
    assert not fits_now(node("n1", gres_used="gpu:2(IDX:0-1)"), GPU_REQ)
    shard = InstanceRequest(cpus=1, mem_mb=100, gres="shard:2", gpu_memory_utilization=0.2)
    assert fits_now(node("n1", gres="gpu:2,shard:8", gres_used="gpu:0,shard:6(IDX:0-1)"), shard)
    assert not fits_now(node("n1", gres="gpu:2,shard:8", gres_used="gpu:0,shard:7"), shard)
