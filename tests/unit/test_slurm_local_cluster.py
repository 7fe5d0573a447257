"""LocalCluster checks that need no daemons, and the status report built from captured nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import ApplianceSettings
from appliance.config.cluster import ClusterSettings
from appliance.errors import ApplianceError
from appliance.slurm.client import SlurmClient
from appliance.slurm.local_cluster import ClusterStatus, DaemonStatus, LocalCluster, node_ready
from tests.unit.slurm_replay import ReplayRunner


def test_a_state_dir_too_long_for_slurm_sockets_is_refused_before_anything_starts(tmp_path):
    state = tmp_path / ("d" * 90)
    settings = ApplianceSettings(state_dir=state, cluster=ClusterSettings(controller_port=29900))
    with pytest.raises(ApplianceError, match="too long for Slurm"):
        LocalCluster(settings, runner=ReplayRunner()).up()  # fails before running anything
    assert not (state / "slurm" / "slurm.conf").exists()


@pytest.mark.parametrize("action", ["up", "down"])
def test_an_existing_cluster_is_not_started_or_stopped_by_the_stack(tmp_path, action):
    settings = ApplianceSettings(
        state_dir=tmp_path, cluster=ClusterSettings(mode="existing", slurm_conf=Path("/x.conf"))
    )
    with pytest.raises(ApplianceError, match=r"cluster\.mode is 'existing'"):
        getattr(LocalCluster(settings, runner=ReplayRunner()), action)()


def test_node_readiness_and_the_status_report():
    nodes = SlurmClient(ReplayRunner().replay("sinfo_drained")).nodes()
    assert [node_ready(n) for n in nodes] == [True, False]  # allocated is ready; drained is not
    status = ClusterStatus(
        name="lab",
        mode="local",
        slurm_conf=Path("/s/slurm.conf"),
        daemons=[DaemonStatus("slurmctld", 10, 16817, Path("/s/log/slurmctld.log"))],
        controller_reachable=True,
        nodes=nodes,
    )
    assert not status.running
    text = status.render()
    assert "slurmctld  running  10" in text
    assert "n2    mixed+drain" in text and "captured drain" in text
    assert "controller: reachable" in text
