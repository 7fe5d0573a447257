"""Preemptible serving against Slurm output captured from a real preemption (22.05): the job
list shows it, the instance manager drains the instance, replaces it away from its node, and
pins a model's first min_instances instances where batch jobs cannot take them; and the
rebalancer's decisions (busy to idle, consolidation, the cost model)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from appliance.config import ApplianceSettings
from appliance.config.cluster import ClusterSettings
from appliance.gateway.migration import StreamRecord
from appliance.models.catalog import Catalog, ModelSpec
from appliance.serving.access import DirectAccess
from appliance.serving.breaker.actions import BreakerActions
from appliance.serving.breaker.client import BreakerAccess
from appliance.serving.instance import Instance, InstanceState
from appliance.serving.manager import InstanceManager
from appliance.slurm.client import SlurmClient
from appliance.slurm.records import parse_sinfo_json, parse_squeue_json
from appliance.slurm.runner import CommandResult
from tests.unit.slurm_replay import TESTDATA, ReplayRunner, capture

PREEMPTED = (TESTDATA / "squeue_preempted.stdout").read_text()
GRACE_END = next(j["end_time"] for j in json.loads(PREEMPTED)["jobs"] if j["preempt_time"])
# The capture's cluster name: its jobs are <cluster>-inst-tiny and <cluster>-batch.
CLUSTER = next(
    j["name"].split("-inst-")[0] for j in json.loads(PREEMPTED)["jobs"] if "-inst-" in j["name"]
)


def test_a_preempted_job_shows_when_its_grace_time_began_and_ends():
    jobs = {j.name.removeprefix(CLUSTER + "-"): j for j in parse_squeue_json(PREEMPTED)}
    inst, batch = jobs["inst-tiny"], jobs["batch"]
    assert (inst.state, inst.partition) == ("RUNNING", "appliance-preemptible")
    assert inst.preempt_time and inst.end_time == inst.preempt_time + 60  # GraceTime=60
    assert (batch.state, batch.partition, batch.preempt_time) == ("PENDING", "batch", None)
    assert (inst.node, inst.grace_end, batch.node, batch.grace_end) == ("n1", GRACE_END, "", None)


def breaker_listing(actions: BreakerActions) -> list[dict]:
    """What `list-instances` answers, from the cluster side's actions."""

    async def listed() -> list[dict]:
        async with actions:
            return await actions._instances()

    return asyncio.run(listed())


def test_the_breakers_listing_carries_what_the_gateway_reads_of_a_job(tmp_path):
    settings = ApplianceSettings(
        state_dir=tmp_path, cluster=ClusterSettings(name=CLUSTER, mode="existing")
    )
    # The preempted instance on n2, which this capture shows drained.
    moved = PREEMPTED.replace('"nodes": "n1"', '"nodes": "n2"')
    runner = ReplayRunner().replay("sinfo_drained")
    runner.answer(["squeue", "--json"], CommandResult(["squeue", "--json"], 0, moved, ""))
    listing = breaker_listing(BreakerActions(settings, SlurmClient(runner, settings.slurm_conf)))
    drained = {n.name for n in parse_sinfo_json(capture("sinfo_drained").stdout) if n.drained}
    jobs = {j.job_id: j for j in parse_squeue_json(moved)}
    for entry in json.loads(json.dumps(listing)):
        job, got = jobs[entry["job_id"]], BreakerAccess(settings)._job(entry)
        seen = (got.name, got.state, got.reason, got.node, got.submit_time, got.partition)
        assert seen == (job.name, job.state, job.reason, job.node, job.submit_time, job.partition)
        assert (got.preempt_time, got.grace_end) == (job.preempt_time, job.grace_end)
        # The time limit too: a successor starts before it (serving/time_limit.py).
        assert got.end_time == job.end_time and job.end_time
        assert got.node_drained == (job.node in drained)
        # Where it may run (--nodelist): making room for a pending job looks only there.
        assert got.required_nodes == job.required_nodes == ["n1"]
    assert any(e["preempted_at"] and e["node_drained"] for e in listing)


async def manager(tmp_path: Path, **spec) -> tuple[InstanceManager, ReplayRunner]:
    """A manager on captured output: one running instance job of `tiny` that is preempted."""
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    settings = ApplianceSettings(
        state_dir=tmp_path / "state",
        cluster=ClusterSettings(name=CLUSTER, mode="existing"),
    )
    catalog = Catalog([ModelSpec(name="tiny", source=f"dir:{model_dir}", **spec)], settings)
    runner = ReplayRunner().replay("squeue_preempted", "sinfo_idle", "sbatch_ok")
    runner.answer(["scancel", "1"], CommandResult(["scancel", "1"], 0, "", ""))
    slurm = SlurmClient(runner, settings.slurm_conf)
    access = DirectAccess(settings, slurm, aiohttp.ClientSession())
    return InstanceManager(settings, catalog, access), runner


def before_preemption() -> CommandResult:
    """The captured listing as it was a moment earlier: the same jobs, none preempted yet."""
    data = json.loads(PREEMPTED)
    for job in data["jobs"]:
        job["preempt_time"] = job["end_time"] = 0
    return CommandResult(["squeue", "--json"], 0, json.dumps(data), "")


def sbatch_scripts(runner: ReplayRunner) -> list[str]:
    return [c.input or "" for c in runner.calls if c.argv[0] == "sbatch"]


def cancelled(runner: ReplayRunner) -> list[str]:
    return [c.argv[-1] for c in runner.calls if c.argv[0] == "scancel"]


def run(scenario) -> None:
    async def wrapped():
        mgr, _ = await scenario()
        await mgr.access.client.close()
        await mgr.access.close()

    asyncio.run(wrapped())


def test_an_instance_preempted_while_starting_just_stops(tmp_path):
    async def scenario():
        mgr, runner = await manager(tmp_path, max_instances=2, preemptible=True)
        await mgr.health.poll_jobs()  # adopts the running job, learns of the preemption
        [inst] = mgr.instances()
        assert inst.preemptible and inst.node == "n1"
        assert inst.state is InstanceState.STOPPING and "preempted" in inst.reason
        assert cancelled(runner) == ["1"] and sbatch_scripts(runner) == []
        return mgr, runner

    run(scenario)


def test_a_serving_instance_drains_and_a_replacement_starts_off_its_node(tmp_path):
    async def scenario():
        mgr, runner = await manager(tmp_path, max_instances=2, preemptible=True)
        runner.answer(["squeue", "--json"], before_preemption())
        await mgr.health.poll_jobs()
        [inst] = mgr.instances()
        # Serving one stream when the preemption is seen:
        inst.state, inst.url, inst.inflight = InstanceState.READY, "http://n1:1", 1
        runner.replay("squeue_preempted")
        await mgr.health.poll_jobs()
        assert inst.state is InstanceState.DRAINING and inst.move_quota == 1
        assert not inst.routable and inst.leave_by == GRACE_END
        # Nowhere to move to: a new instance starts now, not on the preempted node.
        [script] = sbatch_scripts(runner)
        assert "#SBATCH --exclude=n1" in script
        assert "#SBATCH --partition=appliance-preemptible" in script
        # Once its stream has moved, it is released at once (the batch job need not wait).
        await mgr._finish_draining(GRACE_END - 30)
        assert cancelled(runner) == []
        inst.inflight = 0
        await mgr._finish_draining(GRACE_END - 30)
        assert inst.state is InstanceState.STOPPING and cancelled(runner) == ["1"]
        return mgr, runner

    run(scenario)


def test_the_first_min_instances_are_pinned_where_batch_jobs_cannot_preempt(tmp_path):
    async def scenario():
        mgr, runner = await manager(tmp_path, min_instances=1, max_instances=3, preemptible=True)
        first = await mgr.launch("tiny")
        second = await mgr.launch("tiny")
        assert (first.preemptible, second.preemptible) == (False, True)
        pinned, spare = sbatch_scripts(runner)
        assert "#SBATCH --partition=appliance\n" in pinned
        assert "#SBATCH --partition=appliance-preemptible\n" in spare
        return mgr, runner

    run(scenario)


def test_without_preemptible_serving_every_instance_is_pinned(tmp_path):
    async def scenario():
        mgr, runner = await manager(tmp_path, max_instances=2)  # serving.preemptible: false
        assert not (await mgr.launch("tiny")).preemptible
        assert "#SBATCH --partition=appliance\n" in sbatch_scripts(runner)[0]
        return mgr, runner

    run(scenario)


def ready(mgr: InstanceManager, job_id: int, inflight: int, **fields) -> Instance:
    inst = Instance(
        job_id=job_id,
        model="tiny",
        state=InstanceState.READY,
        submitted_at=0.0,
        url=f"http://n1:{job_id}",
        inflight=inflight,
        **fields,
    )
    mgr.registry.add(inst)
    return inst


def stream(prompt: int, generated: int, max_tokens: int | None) -> StreamRecord:
    body = {"model": "tiny", "messages": [], "stream": True}
    if max_tokens:
        body["max_tokens"] = max_tokens
    record = StreamRecord.open("/v1/chat/completions", json.dumps(body).encode())
    record.prompt_ids, record.generated = list(range(prompt)), list(range(generated))
    record.complete = generated
    return record


def test_a_busy_instance_hands_half_the_difference_to_an_idle_one(tmp_path):
    async def scenario():
        mgr, runner = await manager(tmp_path, max_instances=2)
        busy, idle = ready(mgr, 11, 5), ready(mgr, 12, 1)
        await mgr._rebalancer.tick(now=0.0)
        assert (busy.move_quota, idle.move_quota) == (2, 0)
        # Only streams the cost model approves move: K=20 by default.
        assert mgr.should_move(busy, stream(prompt=100, generated=50, max_tokens=400))
        assert not mgr.should_move(busy, stream(prompt=400, generated=90, max_tokens=100))
        assert not mgr.should_move(idle, stream(prompt=1, generated=1, max_tokens=400))
        mgr.moved(busy)
        mgr.moved(busy)
        assert busy.move_quota == 0
        # An administrator's moves skip the check; a draining instance's streams all move.
        mgr.request_moves(idle, 1, forced=True)
        assert mgr.should_move(idle, stream(prompt=400, generated=90, max_tokens=100))
        return mgr, runner

    run(scenario)


def test_an_instance_the_others_can_cover_is_consolidated_away(tmp_path):
    async def scenario():
        mgr, runner = await manager(tmp_path, max_instances=3)
        now = 1000.0
        old = ready(mgr, 21, 1, last_acquired=now - 120, preemptible=True)
        old.streams.add(stream(prompt=20, generated=10, max_tokens=200))
        fresh = ready(mgr, 22, 1, last_acquired=now - 5)
        fresh.streams.add(stream(prompt=20, generated=10, max_tokens=200))
        await mgr._rebalancer.tick(now)
        assert old.state is InstanceState.DRAINING and "consolidating" in old.reason
        assert fresh.state is InstanceState.READY
        return mgr, runner

    run(scenario)


def test_no_consolidation_when_a_stream_could_not_move(tmp_path):
    async def scenario():
        mgr, runner = await manager(tmp_path, max_instances=3)
        now = 1000.0
        old = ready(mgr, 21, 2, last_acquired=now - 120)
        old.streams.add(stream(prompt=20, generated=10, max_tokens=200))  # the other: n=2
        ready(mgr, 22, 1, last_acquired=now - 5)
        await mgr._rebalancer.tick(now)
        assert old.state is InstanceState.READY
        return mgr, runner

    run(scenario)
