"""Making room for a job pinned to a node, against Slurm output captured from a real one (22.05):
n2 is full, the waiting model's job is pinned there (--nodelist=n2, as a stored model's job is),
and the only idle instance of another model runs on n1. Stopping it would free nothing the job
can use, so it stays; the listing through the breaker carries the pin too."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import aiohttp

from appliance.config import ApplianceSettings
from appliance.config.cluster import ClusterSettings
from appliance.models.catalog import Catalog, ModelSpec
from appliance.serving.access import DirectAccess
from appliance.serving.breaker.actions import BreakerActions
from appliance.serving.breaker.client import BreakerAccess
from appliance.serving.instance import InstanceState
from appliance.serving.manager import InstanceManager
from appliance.slurm.client import SlurmClient
from appliance.slurm.records import parse_squeue_json
from appliance.slurm.runner import CommandResult
from tests.unit.slurm_replay import TESTDATA, ReplayRunner
from tests.unit.test_preemption import breaker_listing

PINNED = (TESTDATA / "squeue_pinned_pending.stdout").read_text()
# The capture's cluster name: its instance jobs are <cluster>-inst-idle and <cluster>-inst-pinned.
CLUSTER = next(
    j["name"].split("-inst-")[0] for j in json.loads(PINNED)["jobs"] if "-inst-" in j["name"]
)
IDLE_JOB = next(j["job_id"] for j in json.loads(PINNED)["jobs"] if j["name"].endswith("-idle"))


def settings(tmp_path: Path) -> ApplianceSettings:
    return ApplianceSettings(
        state_dir=tmp_path / "state", cluster=ClusterSettings(name=CLUSTER, mode="existing")
    )


def squeue(text: str) -> CommandResult:
    return CommandResult(["squeue", "--json"], 0, text, "")


def pinned_to(node: str) -> str:
    """The same listing, with the waiting job pinned to `node` instead."""
    data = json.loads(PINNED)
    for job in data["jobs"]:
        if job["name"].endswith("-inst-pinned"):
            job["required_nodes"] = node
    return json.dumps(data)


def make_room(tmp_path: Path, listing: str) -> list[str]:
    """Adopt the listing's instance jobs, the one of `idle` ready and unused, a request waiting
    for `pinned`; one round of making room; the jobs cancelled."""

    async def scenario() -> list[str]:
        model_dir = tmp_path / "tiny"
        model_dir.mkdir(exist_ok=True)
        (model_dir / "config.json").write_text("{}")
        config = settings(tmp_path)
        specs = [ModelSpec(name=n, source=f"dir:{model_dir}") for n in ("idle", "pinned")]
        runner = ReplayRunner().replay("sinfo_idle").answer(["squeue", "--json"], squeue(listing))
        runner.answer(["scancel", str(IDLE_JOB)], CommandResult(["scancel"], 0, "", ""))
        async with aiohttp.ClientSession() as session:
            access = DirectAccess(config, SlurmClient(runner, config.slurm_conf), session)
            mgr = InstanceManager(config, Catalog(specs, config), access)
            await mgr.health.poll_jobs()
            [idle] = mgr.instances("idle")
            [pending] = mgr.instances("pinned")
            assert (idle.node, pending.state, pending.reason) == (
                "n1",
                InstanceState.PENDING,
                "Resources",
            )
            idle.state, idle.url, idle.last_used = InstanceState.READY, "http://n1:1", 0.0
            mgr._waiting["pinned"] = Counter({"someone": 1})
            await mgr._make_room()
            await access.close()
        return [c.argv[-1] for c in runner.calls if c.argv[0] == "scancel"]

    return asyncio.run(scenario())


def test_no_instance_is_stopped_on_a_node_the_waiting_job_cannot_use(tmp_path):
    assert make_room(tmp_path, PINNED) == []


def test_an_idle_instance_on_the_node_it_is_pinned_to_is_stopped(tmp_path):
    assert make_room(tmp_path, pinned_to("n1")) == [str(IDLE_JOB)]
    # Not pinned at all (as an older breaker's listing reads): room anywhere, as before.
    assert make_room(tmp_path, pinned_to("")) == [str(IDLE_JOB)]


def test_the_breakers_listing_carries_where_a_pending_job_may_run(tmp_path):
    config = settings(tmp_path)
    runner = ReplayRunner().replay("sinfo_idle").answer(["squeue", "--json"], squeue(PINNED))
    listing = breaker_listing(BreakerActions(config, SlurmClient(runner, config.slurm_conf)))
    jobs = {j.job_id: j for j in parse_squeue_json(PINNED)}
    access = BreakerAccess(config)
    read = {e["job_id"]: access._job(e) for e in json.loads(json.dumps(listing))}
    assert {i: j.required_nodes for i, j in read.items()} == {
        i: jobs[i].required_nodes for i in read
    }
    assert sorted(j.required_nodes for j in read.values()) == [["n1"], ["n2"]]
    # A breaker of an earlier release lists no such key: no restriction.
    older = {k: v for k, v in listing[0].items() if k != "required_nodes"}
    assert access._job(older).required_nodes == []
