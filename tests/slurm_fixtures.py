"""Pytest fixtures that start a real local Slurm cluster on free ports and always stop it.

`slurm_cluster` (session scope) yields the settings of a running 2-node cluster with 2 simulated
GPUs per node and 4 shards per GPU; submit jobs to it with
``SlurmClient(LocalRunner(), settings.slurm_conf)``. Name jobs with the ``settings.cluster.name``
prefix so `down()` cancels them. For a cluster of another shape, use `running_local_cluster`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import ApplianceSettings, load_settings
from appliance_dev.stack import free_port, local_cluster_settings, running_local_cluster


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


@pytest.fixture
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for a test's own cluster, with a short path: slurmstepd's sockets go under it
    and Unix socket paths have 107 characters (a test's tmp_path, named after the test, under a
    pytest-xdist worker's folder, can be too long)."""
    return tmp_path_factory.mktemp("c")


def tiny_catalog(tiny_model_dir: Path, extra: str = "") -> str:
    """A catalog (YAML) with the tiny chat model sized for the test cluster, plus `extra`."""
    return (
        f"models:\n  - name: tiny-chat\n    source: dir:{tiny_model_dir}\n"
        "    max_model_len: 512\n    resources: {cpus: 1, memory_gb: 3}\n" + extra
    )


def stack_settings(
    slurm_cluster: ApplianceSettings, state_dir: Path, catalog: str, **sections: dict
) -> ApplianceSettings:
    """Settings of a gateway on a free port that uses the running `slurm_cluster`, with its own
    state under `state_dir` and `catalog` (YAML) as its only catalog; `sections` are merged in."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "catalog.yaml").write_text(catalog)
    base = slurm_cluster.model_dump(mode="json")
    base["cluster"].update(mode="existing", slurm_conf=str(slurm_cluster.slurm_conf))
    base["state_dir"] = str(state_dir / "state")
    base["gateway"].update(port=free_port(), health_interval_s=1.0, start_timeout_s=240)
    base["catalog"] = {"files": [str(state_dir / "catalog.yaml")], "include_presets": False}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return load_settings(**base)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """The first truthy value of `predicate()`, polled until `timeout`; AssertionError after."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
