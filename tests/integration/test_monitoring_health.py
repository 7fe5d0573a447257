"""The node health check as Slurm's HealthCheckProgram on a real 2-node local cluster: a full
scratch filesystem (a 1 MiB tmpfs, filled) drains the node with the reason, a new instance is
placed on the other node, and the node is resumed once there is space again."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from appliance.slurm.client import SlurmClient
from appliance.slurm.runner import LocalRunner
from appliance_dev.stack import (
    free_port,
    local_cluster_settings,
    running_gateway,
    running_local_cluster,
)
from tests.slurm_fixtures import require_local_slurm, tiny_catalog, wait_for
from tests.tmpfs import tiny_tmpfs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_full_scratch_drains_the_node_and_instances_go_elsewhere(cluster_dir, tiny_model_dir):
    require_local_slurm()
    (cluster_dir / "catalog.yaml").write_text(tiny_catalog(tiny_model_dir))
    settings = local_cluster_settings(
        cluster_dir / "state",
        nodes=2,
        monitoring={
            "health_interval_s": 10,
            "scratch_dirs": [str(cluster_dir / "scratch" / "{node}")],
            "min_free_bytes": 64 * 1024,
        },
        gateway={"port": free_port(), "health_interval_s": 1.0},
        catalog={"files": [str(cluster_dir / "catalog.yaml")], "include_presets": False},
    )
    with running_local_cluster(settings), tiny_tmpfs(cluster_dir / "scratch" / "n1") as scratch:
        client = SlurmClient(LocalRunner(), settings.slurm_conf)

        def node(name):
            return next(n for n in client.nodes() if n.name == name)

        with contextlib.suppress(OSError):
            (scratch / "fill").write_bytes(b"\0" * (2 * 1024 * 1024))  # ENOSPC at 1 MiB
        n1 = wait_for(lambda: node("n1") if node("n1").drained else None, 60, "n1 drained")
        assert n1.reason.startswith("health:") and "is full" in n1.reason, n1.reason
        assert not node("n2").drained
        with running_gateway(settings) as url:
            started = httpx.post(url + "/admin/models/tiny-chat/start", timeout=30)
            assert started.status_code == 202, started.text

            def placed():
                insts = httpx.get(url + "/admin/instances", timeout=10).json()["instances"]
                return insts[0]["node"] if insts and insts[0]["node"] else None

            assert wait_for(placed, 60, "the instance to be placed") == "n2"
        (scratch / "fill").unlink()
        wait_for(lambda: not node("n1").drained, 60, "n1 resumed")
        assert node("n1").reason == ""
