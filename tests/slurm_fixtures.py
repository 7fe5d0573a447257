"""Pytest fixtures that start a real local Slurm cluster on free ports and always stop it.

`slurm_cluster` (session scope) yields the settings of a running 2-node cluster with 2 simulated
GPUs per node and 4 shards per GPU; submit jobs to it with
``SlurmClient(LocalRunner(), settings.slurm_conf)``. Name jobs with the ``settings.cluster.name``
prefix so `down()` cancels them. For a cluster of another shape, use `running_local_cluster`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from appliance.config import ApplianceSettings
from appliance.devstack import local_cluster_settings, running_local_cluster


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
    settings = local_cluster_settings(state_dir, nodes=2, gpus_per_node=2)
    with running_local_cluster(settings):
        yield settings
