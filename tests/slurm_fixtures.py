"""Pytest fixtures that start a real local Slurm cluster on free ports and always stop it.

`slurm_cluster` (session scope) yields the settings of a running 2-node cluster with 2 simulated
GPUs per node and 4 shards per GPU; submit jobs to it with
``SlurmClient(LocalRunner(), settings.slurm_conf)``. Name jobs with the ``settings.cluster.name``
prefix so `down()` cancels them. For a cluster of another shape, use `running_local_cluster`.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ApplianceSettings
from appliance.config.cluster import ClusterSettings
from appliance.slurm.client import SlurmClient
from appliance.slurm.daemons import find_daemons, stop_processes
from appliance.slurm.local_cluster import LocalCluster
from appliance.slurm.runner import LocalRunner, SlurmCommandError

# Ports are drawn from here; it avoids the defaults (16817, 17001...) and the ephemeral range.
_PORT_RANGE = (20000, 32000)


def _port_free(port: int) -> bool:
    # slurmctld and slurmd listen on all addresses; test both the wildcard and loopback.
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port_block(count: int, attempts: int = 200) -> int:
    """The first of `count` consecutive TCP ports that are free right now."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(_PORT_RANGE[0], _PORT_RANGE[1] - count)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no block of {count} free ports found in {_PORT_RANGE}")


def unique_cluster_name() -> str:
    """A ClusterName no other run uses (job names start with it too)."""
    return f"t{os.getpid()}x{random.randrange(16**4):04x}"


def local_cluster_settings(
    state_dir: Path, *, nodes: int, gpus_per_node: int, shards_per_gpu: int = 4, **cluster: Any
) -> ApplianceSettings:
    """Settings for a test cluster under `state_dir` on free ports, with a unique name."""
    base = free_port_block(nodes + 1)
    values: dict[str, Any] = {
        "mode": "local",
        "name": unique_cluster_name(),
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "shards_per_gpu": shards_per_gpu,
        "controller_port": base,
        "node_port_base": base + 1,
        "kill_wait_s": 1,  # tests cancel jobs; no need to wait long for them to exit
        "ready_timeout_s": 60.0,
    }
    values.update(cluster)
    # Built directly, not with load_settings: a host's /etc/appliance/config.yaml must not leak in.
    return ApplianceSettings(state_dir=state_dir, cluster=ClusterSettings(**values))


def start_local_cluster(
    state_dir: Path, *, nodes: int, gpus_per_node: int, shards_per_gpu: int = 4
) -> tuple[ApplianceSettings, LocalCluster]:
    """Start a local cluster on free ports; if start-up fails, nothing is left running."""
    settings = local_cluster_settings(
        state_dir, nodes=nodes, gpus_per_node=gpus_per_node, shards_per_gpu=shards_per_gpu
    )
    cluster = LocalCluster(settings)
    try:
        cluster.up()
    except BaseException:
        stop_local_cluster(cluster)
        raise
    return settings, cluster


def stop_local_cluster(cluster: LocalCluster) -> None:
    """Cancel every job, run down(), then SIGKILL any daemon of this cluster that is left."""
    client = SlurmClient(LocalRunner(), cluster.paths.slurm_conf, timeout=10)
    with suppress(SlurmCommandError):
        # Tests own the whole cluster: cancel all jobs, not only those with the stack's prefix.
        if cluster.paths.slurm_conf.exists() and client.ping():
            for job in client.jobs():
                if job.active:
                    client.cancel(job.job_id)
    try:
        cluster.down()
    finally:
        left = find_daemons(cluster.paths.slurm_conf)
        if left:
            stop_processes([d.pid for d in left.values()], timeout=2.0)


@contextmanager
def running_local_cluster(
    state_dir: Path, *, nodes: int, gpus_per_node: int, shards_per_gpu: int = 4
) -> Iterator[tuple[ApplianceSettings, LocalCluster]]:
    """A started local cluster that is stopped on exit, whether the body passed or failed."""
    settings, cluster = start_local_cluster(
        state_dir, nodes=nodes, gpus_per_node=gpus_per_node, shards_per_gpu=shards_per_gpu
    )
    try:
        yield settings, cluster
    finally:
        stop_local_cluster(cluster)


def require_local_slurm() -> None:
    """Skip unless this host can run a local cluster (root, for mknod and apt-get)."""
    if os.geteuid() != 0:
        pytest.skip(
            "the local Slurm cluster needs root (simulated GPU devices are made with mknod)"
        )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceSettings]:
    """Settings of a running 2-node cluster with 2 simulated GPUs (4 shards each) per node."""
    require_local_slurm()
    state_dir = tmp_path_factory.mktemp("slurm")
    with running_local_cluster(state_dir, nodes=2, gpus_per_node=2) as (settings, _cluster):
        yield settings
