"""The local Slurm cluster for real: GRES placement on simulated GPUs, shards, multi-node jobs,
idempotent start-up, and a clean stop. Every wait is bounded; every daemon is stopped."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.slurm.client import SlurmClient, SlurmJob
from appliance.slurm.daemons import find_daemons
from appliance.slurm.local_cluster import LocalCluster
from appliance.slurm.runner import LocalRunner
from appliance_dev.stack import local_cluster_settings, running_local_cluster, stop_local_cluster
from tests.slurm_fixtures import require_local_slurm, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120)]


class Jobs:
    """Submits small batch jobs named with the cluster's prefix and reads their output."""

    def __init__(self, settings: ApplianceSettings, out: Path):
        self.slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
        self.prefix = settings.cluster.name
        self.out = out

    def submit(self, role: str, body: str, *options: str) -> int:
        lines = [
            "#!/bin/bash",
            f"#SBATCH --job-name={self.prefix}-{role}",
            f"#SBATCH --output={self.out}/%j.out",
            "#SBATCH --mem=100M",
            *(f"#SBATCH {o}" for o in options),
            body,
        ]
        return self.slurm.submit("\n".join(lines) + "\n")

    def job(self, job_id: int) -> SlurmJob:
        job = self.slurm.job(job_id)
        assert job is not None, f"Slurm lost job {job_id}"
        return job

    def wait_state(self, job_id: int, *states: str, timeout: float = 20) -> SlurmJob:
        return wait_for(
            lambda: (j := self.job(job_id)).state in states and j,
            timeout,
            f"job {job_id} to be {'/'.join(states)}",
        )

    def output(self, job_id: int) -> dict[str, str]:
        """KEY=VALUE lines the job printed."""
        text = (self.out / f"{job_id}.out").read_text()
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def wait_output(self, job_id: int, key: str, timeout: float = 20) -> dict[str, str]:
        def ready() -> dict[str, str] | None:
            path = self.out / f"{job_id}.out"
            if path.exists() and key in (values := self.output(job_id)):
                return values
            return None

        return wait_for(ready, timeout, f"{key} in the output of job {job_id}")

    def cancel_all(self) -> None:
        for job in self.slurm.jobs(self.prefix):
            if job.active:
                self.slurm.cancel(job.job_id)
        wait_for(
            lambda: not any(j.active for j in self.slurm.jobs(self.prefix)) or None,
            20,
            "cancelled jobs to end",
        )


PRINT_GPUS = 'echo "CUDA=${CUDA_VISIBLE_DEVICES-}"; echo "JOB_GPUS=${SLURM_JOB_GPUS-}"; '


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[ApplianceSettings, LocalCluster]]:
    require_local_slurm()
    state = tmp_path_factory.mktemp("lc")
    settings = local_cluster_settings(state, nodes=2, gpus_per_node=2, shards_per_gpu=4)
    with running_local_cluster(settings) as local:
        yield settings, local


@pytest.fixture
def jobs(cluster, tmp_path) -> Iterator[Jobs]:
    helper = Jobs(cluster[0], tmp_path)
    yield helper
    helper.cancel_all()  # each test starts on an empty cluster


def test_up_gives_two_idle_nodes_with_two_gpus_each(cluster):
    settings, local = cluster
    status = local.status()
    assert status.running and status.controller_reachable
    assert [d.name for d in status.daemons] == ["slurmctld", "slurmd n1", "slurmd n2"]
    assert all(d.pid for d in status.daemons)
    assert [(n.name, n.state, n.gres) for n in status.nodes] == [
        ("n1", "idle", "gpu:2,shard:8"),
        ("n2", "idle", "gpu:2,shard:8"),
    ]
    # Each node has its own device files, so GRES bookkeeping is per node as on real hardware.
    for node in ("n1", "n2"):
        assert (settings.slurm_dir / "dev" / node / "gpu1").is_char_device()
    assert "slurmd n2" in status.render() and "gpu:2,shard:8" in status.render()


def test_gpu_job_sees_its_gpu(jobs):
    job_id = jobs.submit("gpu", PRINT_GPUS, "--gres=gpu:1")
    values = jobs.wait_output(job_id, "JOB_GPUS")
    assert values["CUDA"] in ("0", "1")
    assert values["JOB_GPUS"] == values["CUDA"]
    done = jobs.wait_state(job_id, "COMPLETED")
    assert done.exit_code == 0 and len(done.nodes) == 1


def test_whole_node_gpu_jobs_land_on_different_nodes_and_more_waits(jobs):
    first = jobs.submit("both-a", PRINT_GPUS + "sleep 60", "--gres=gpu:2")
    second = jobs.submit("both-b", PRINT_GPUS + "sleep 60", "--gres=gpu:2")
    a = jobs.wait_state(first, "RUNNING")
    b = jobs.wait_state(second, "RUNNING")
    assert sorted(a.nodes + b.nodes) == ["n1", "n2"]
    assert jobs.wait_output(first, "CUDA")["CUDA"] == "0,1"
    # Every GPU is taken: one more GPU waits, and Slurm says why.
    third = jobs.submit("over", "true", "--gres=gpu:1")
    waiting = wait_for(
        lambda: (j := jobs.job(third)).reason and j, 10, "a pending reason for the third job"
    )
    assert waiting.state == "PENDING" and waiting.reason == "Resources"
    # It starts as soon as GPUs are freed.
    jobs.slurm.cancel(first)
    assert jobs.wait_state(third, "RUNNING", "COMPLETING", "COMPLETED").nodes == a.nodes


def test_shard_jobs_share_one_gpu(jobs):
    # Two CPUs per node bound it to two jobs at once; pin both to n1 so they meet there.
    ids = [
        jobs.submit(f"shard-{i}", PRINT_GPUS + "sleep 60", "--gres=shard:1", "-w", "n1")
        for i in range(2)
    ]
    running = [jobs.wait_state(i, "RUNNING") for i in ids]
    assert all(j.nodes == ["n1"] for j in running)
    gpus = [jobs.wait_output(i, "CUDA")["CUDA"] for i in ids]
    assert gpus[0] == gpus[1] and gpus[0] in ("0", "1")
    # Both at the same time: sharing, not taking turns.
    assert [jobs.job(i).state for i in ids] == ["RUNNING", "RUNNING"]


def test_shards_do_not_keep_whole_gpu_jobs_off_their_gpu(jobs):
    """Slurm 22.05 limitation, pinned here so an upgrade that fixes it is noticed: GPU and
    shard allocations of one device are not exclusive, and one job cannot ask for both."""
    shard = jobs.submit("shard", PRINT_GPUS + "sleep 60", "--gres=shard:1", "-w", "n1")
    jobs.wait_state(shard, "RUNNING")
    whole = jobs.submit("whole", PRINT_GPUS + "sleep 60", "--gres=gpu:2", "-w", "n1")
    jobs.wait_state(whole, "RUNNING")
    assert jobs.wait_output(whole, "CUDA")["CUDA"] == "0,1"
    with pytest.raises(ApplianceError, match="Invalid generic resource"):
        jobs.submit("both", "true", "--gres=gpu:1,shard:1")


def test_two_node_job(jobs):
    job_id = jobs.submit("multi", 'echo "HOSTS=$(srun hostname | wc -l)"', "-N2")
    assert jobs.wait_output(job_id, "HOSTS")["HOSTS"] == "2"
    assert jobs.wait_state(job_id, "COMPLETED").nodes == ["n1", "n2"]


def test_up_twice_keeps_the_same_daemons(cluster):
    settings, _ = cluster
    before = {k: d.pid for k, d in find_daemons(settings.slurm_conf).items()}
    start = time.monotonic()
    status = LocalCluster(settings).up()
    assert time.monotonic() - start < 10
    after = {k: d.pid for k, d in find_daemons(settings.slurm_conf).items()}
    assert before == after and set(after) == {"slurmctld", "slurmd:n1", "slurmd:n2"}
    assert status.running


def test_up_restarts_a_daemon_that_died(cluster):
    settings, local = cluster
    victim = find_daemons(settings.slurm_conf)["slurmd:n2"]
    os.kill(victim.pid, signal.SIGKILL)
    wait_for(lambda: "slurmd:n2" not in find_daemons(settings.slurm_conf), 10, "slurmd n2 to die")
    assert not local.status().running
    status = LocalCluster(settings).up()
    assert status.running
    daemons = find_daemons(settings.slurm_conf)
    assert daemons["slurmd:n2"].pid != victim.pid and "slurmctld" in daemons


def test_changed_config_restarts_and_drained_nodes_are_resumed(cluster_dir):
    require_local_slurm()
    settings = local_cluster_settings(cluster_dir, nodes=2, gpus_per_node=0)
    local = LocalCluster(settings)
    try:
        local.up()
        slurm = SlurmClient(LocalRunner(), settings.slurm_conf)
        slurm.update_node("n2", "drain", "test drain")
        old = {k: d.pid for k, d in find_daemons(settings.slurm_conf).items()}
        # Same state dir, one GPU per node now: the config changes, so every daemon restarts and
        # the drain saved in the state dir is lifted.
        changed = settings.model_copy(
            update={"cluster": settings.cluster.model_copy(update={"gpus_per_node": 1})}
        )
        status = LocalCluster(changed).up()
        new = {k: d.pid for k, d in find_daemons(settings.slurm_conf).items()}
        assert set(new) == set(old) and not set(new.values()) & set(old.values())
        assert [(n.name, n.state, n.gres) for n in status.nodes] == [
            ("n1", "idle", "gpu:1,shard:4"),
            ("n2", "idle", "gpu:1,shard:4"),
        ]
    finally:
        stop_local_cluster(local)


def test_down_stops_every_daemon_and_cancels_the_stacks_jobs(cluster_dir):
    require_local_slurm()
    settings = local_cluster_settings(cluster_dir / "state", nodes=1, gpus_per_node=0)
    with running_local_cluster(settings) as local:
        helper = Jobs(settings, cluster_dir)
        job_id = helper.submit("sleeper", "sleep 300")
        helper.wait_state(job_id, "RUNNING")
        local.down()
        assert find_daemons(settings.slurm_conf) == {}
        conf = str(settings.slurm_conf)
        leftovers = [
            p.name for p in Path("/proc").iterdir() if p.name.isdigit() and conf in _cmdline(p)
        ]
        assert leftovers == []
        status = local.status()
        assert not status.running and all(d.pid is None for d in status.daemons)
        local.down()  # stopping a stopped cluster is fine
        # The job was cancelled before the daemons stopped; the state dir remembers it.
        status = local.up()
        assert status.running
        assert helper.job(job_id).state == "CANCELLED"


def test_daemon_that_dies_at_start_up_is_reported_with_its_log(cluster_dir):
    require_local_slurm()
    settings = local_cluster_settings(cluster_dir, nodes=1, gpus_per_node=0)
    local = LocalCluster(settings)
    # Hold the first node's port: slurmd cannot bind it and exits.
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("0.0.0.0", settings.cluster.node_port_base))
        blocker.listen()
        try:
            with pytest.raises(ApplianceError) as err:
                local.up()
        finally:
            stop_local_cluster(local)
    text = str(err.value)
    assert "slurmd for node n1 stopped right after it started" in text
    assert "Address already in use" in text and "slurmd-n1.out" in text
    assert find_daemons(settings.slurm_conf) == {}


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
